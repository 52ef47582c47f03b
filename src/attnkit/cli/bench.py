"""``attnkit bench``: sweep variants x implementations x sequence lengths x fwd / fwd+bwd.

Each (case, N, mode) runs in a fresh subprocess with warm-up and repeats; the report gives median
and min-max time, peak RSS, useful GFLOP/s and its ratio to the measured fp32 matmul rate, and is
written as bench.md, bench.csv and bench.png under --out.

Examples:
    attnkit bench --quick
    attnkit bench --variants swa256 --sizes 16384 --modes fwd,bwd
    attnkit bench --families softmax --impls 'attnkit.*,sdpa' --sizes 1024,4096,16384
"""

from __future__ import annotations

import argparse
import os
import time

DEFAULT_SIZES = (1024, 4096)
QUICK_SIZES = (512,)


def _csv(kind):
    def parse(s: str):
        try:
            return tuple(kind(x) for x in s.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {s!r}") from e
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="under a minute: N=512, one repeat, attnkit + sdpa impls only, all in one process")
    p.add_argument("--families", type=_csv(str), default=(), help="comma list (default: all), e.g. softmax,positions")
    p.add_argument("--variants", type=_csv(str), default=(), help="comma list; a trailing * matches a prefix")
    p.add_argument("--impls", type=_csv(str), default=(), help="comma list, e.g. 'attnkit.*,sdpa,flex'")
    p.add_argument("--sizes", type=_csv(int), default=None, help=f"sequence lengths (default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--modes", type=_csv(str), default=("fwd", "bwd"), help="fwd, bwd (= forward + backward)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per task (median and min-max reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (the first is reported separately)")
    p.add_argument("--batch", type=int, default=1, help="B")
    p.add_argument("--heads", type=int, default=8, help="H")
    p.add_argument("--head-dim", type=int, default=64, help="D")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=2, help="torch threads per task (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per task before it is killed")
    p.add_argument("--max-rss-gib", type=float, default=10.0, help="kill a task whose resident memory exceeds this")
    p.add_argument("--out", default="./bench-out", help="directory for bench.md, bench.csv, bench.png")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")


def config_from_args(args):
    from ..bench.runner import BenchConfig

    for m in args.modes:
        if m not in ("fwd", "bwd"):
            raise SystemExit(f"attnkit bench: --modes takes fwd and/or bwd, got {m!r}")
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if any(n <= 0 for n in sizes):
        raise SystemExit(f"attnkit bench: --sizes must be positive, got {sizes}")
    impls = args.impls
    if args.quick and not impls:
        impls = ("attnkit.*", "sdpa")
    return BenchConfig(
        sizes=tuple(sizes), modes=tuple(args.modes), families=args.families, variants=args.variants, impls=impls,
        B=args.batch, H=args.heads, D=args.head_dim, dtype=args.dtype, warmup=1 if args.quick else args.warmup,
        repeats=1 if args.quick else args.repeats, threads=args.threads, timeout_s=args.timeout,
        max_rss_gib=args.max_rss_gib, per_process="all" if args.quick else "task",
    )


def run(args) -> int:
    from ..bench import report, runner

    cfg = config_from_args(args)
    keys = runner.select_cases(cfg)
    for name, err in runner.IMPORT_ERRORS.items():
        print(f"warning: could not import {name}: {err}")
    if args.list:
        print("\n".join(keys))
        return 0
    if not keys:
        print("attnkit bench: no case matches the filters (use --list to see the cases)")
        return 2
    print(f"attnkit bench: {len(keys)} cases x {len(cfg.sizes)} sizes x {len(cfg.modes)} modes, "
          f"B={cfg.B} H={cfg.H} D={cfg.D} {cfg.dtype}, {cfg.threads} threads")
    t0 = time.time()
    results, matmul = runner.run(cfg)
    os.makedirs(args.out, exist_ok=True)
    header = (f"attnkit bench, B={cfg.B} H={cfg.H} D={cfg.D} {cfg.dtype}, {cfg.threads} threads, "
              f"{cfg.repeats} repeats after {cfg.warmup} warm-up, one process per {cfg.per_process}")
    md = report.markdown(results, matmul, header)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    report.write_csv(results, os.path.join(args.out, "bench.csv"))
    why = report.plot(results, os.path.join(args.out, "bench.png"))
    print(md)
    print(f"wrote {args.out}/bench.md, bench.csv" + (", bench.png" if why is None else f" (no plot: {why})")
          + f" in {time.time() - t0:.0f} s")
    return 0
