"""``attnkit train TASK``: train one model on a learning task and write its metrics, curve, plot
and checkpoint (see ``attnkit.train``).

    attnkit train mqar --attention performer --out runs/mqar-performer
    attnkit train "mqar:num_kv_pairs=16,seq_len=128" --attention "softmax:sliding_window(15)"
    attnkit train shakespeare --steps 2000 --out runs/baby-gpt      # nanoGPT's CPU baby GPT
    attnkit train listops --out runs/lo --resume                   # continue an interrupted run

Options left out take the task's defaults (printed at the start of the run).
"""

from __future__ import annotations

import argparse
import sys

from ..tasks import TASKS
from ..variants import REGISTRY

OPTIONS = (  # name, type, help
    ("layers", int, "number of Transformer layers"),
    ("dim", int, "model width (d_model)"),
    ("heads", int, "attention heads"),
    ("steps", int, "optimiser steps"),
    ("batch", int, "sequences per step"),
    ("lr", float, "peak learning rate (warm-up, cosine decay to lr/10)"),
    ("eval_every", int, "evaluate and checkpoint every this many steps"),
)


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help=f"task word, optionally with options: {', '.join(TASKS)} (e.g. 'mqar:num_kv_pairs=16')")
    for name, typ, help_ in OPTIONS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None, help=f"{help_} (task default)")
    p.add_argument("--seed", type=int, default=None, help="seed of the initialisation and data (default 0)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest on a busy shared machine)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    p.add_argument("--attention", default=None,
                   help=f"variant word[:options]: {', '.join(REGISTRY)}; e.g. 'softmax:sliding_window(63)', "
                        "'performer:num_features=64' (default softmax)")
    p.add_argument("--position", default=None,
                   help="none, sinusoidal, learned, rope, alibi, t5, shaw, xl (with options, e.g. 't5:num_buckets=16'; "
                        "default: the task's)")
    p.add_argument("--out", default=None, help="output folder (default runs/<task>-<attention>)")


def base_config(args, **extra):
    """A RunConfig from the parsed options and the set of option names given."""
    from ..train import RunConfig

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be an int >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)

    given = {name: getattr(args, name) for name, _, _ in OPTIONS if getattr(args, name) is not None}
    for name in ("seed", "device"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    given.update({k: v for k, v in extra.items() if v is not None})
    return RunConfig(task=args.task, **given), set(given)


def run(args) -> int:
    from ..train import Interrupted, train
    from ..train.compare import slug
    from ..train.loop import resume_config

    cfg, given = base_config(args, attention=args.attention, position=args.position)
    out = args.out or f"runs/{slug(args.task, cfg.attention)}"
    if args.resume:
        cfg = resume_config(cfg, given, out)
    r = cfg.resolved()
    r.specs()  # bad words fail here, before anything is written
    print(f"attnkit train {r.task}: attention={r.attention} position={r.position} layers={r.layers} dim={r.dim} "
          f"heads={r.heads} steps={r.steps} batch={r.batch} lr={r.lr} seed={r.seed} device={r.device} -> {out}")
    try:
        m = train(r, out, resume=args.resume, progress=args.progress)
    except Interrupted as e:
        print(f"attnkit train: {e}", file=sys.stderr)
        return 130
    ev = ", ".join(f"{k} {v:.4f}" for k, v in m["eval"].items())
    mem = "" if m["peak_memory_mib"] is None else f", peak memory {m['peak_memory_mib']:.0f} MiB"
    print(f"{ev}; params {m['params']:,}, {m['seconds']:.1f} s, {m['tokens_per_s']:,.0f} tokens/s{mem}; wrote {out}/")
    return 0
