"""``attnkit compare TASK --variants a,b,c [--positions p,q]``: train every (variant, position)
and write results.md, results.csv and three plots (see ``attnkit.train.compare``).

    attnkit compare mqar --variants softmax,linear,performer --out runs/mqar
    attnkit compare extrapolation --variants softmax --positions none,sinusoidal,learned,rope,alibi,t5
    attnkit compare listops --variants "softmax,softmax:sliding_window(15),linformer:proj_dim=64" --resume

A variant with options keeps its commas inside parentheses, and ``name=value`` pieces continue
the previous word (``performer:num_features=64,seed=1,linear`` is two variants).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..variants import REGISTRY
from .train import add_run_options, base_config


def add_arguments(p) -> None:
    add_run_options(p)
    p.add_argument("--variants", required=True, help=f"comma-separated variant words[:options] ({', '.join(REGISTRY)})")
    p.add_argument("--positions", default=None, help="comma-separated position schemes (default: the task's)")
    p.add_argument("--out", default=None, help="output folder (default runs/compare-<task>)")


def run(args) -> int:
    from ..train import Interrupted, compare
    from ..train.compare import slug
    from ..train.words import split_list

    base, _ = base_config(args)
    variants = split_list(args.variants)
    positions = split_list(args.positions) if args.positions else [None]
    out = args.out or f"runs/compare-{slug(args.task, '')}"
    command = "attnkit compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    try:
        results = compare(base, variants, positions, out, resume=args.resume, progress=args.progress, command=command)
    except Interrupted as e:
        print(f"attnkit compare: {e}; rerun with --resume to continue", file=sys.stderr)
        return 130
    print(Path(out, "results.md").read_text())  # the table
    print(f"wrote {out}/results.md, results.csv, metric.png, curves.png, frontier.png and {len(results)} run folders")
    return 0
