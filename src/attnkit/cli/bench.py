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
import sys
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
                   help="N=512, one repeat, attnkit + sdpa impls only, all in one process (no peak RSS column)")
    p.add_argument("--families", type=_csv(str), default=(), help="comma list (default: all), e.g. softmax,positions")
    p.add_argument("--variants", type=_csv(str), default=(), help="comma list; a trailing * matches a prefix")
    p.add_argument("--impls", type=_csv(str), default=(), help="comma list, e.g. 'attnkit.*,sdpa,flex'")
    p.add_argument("--sizes", type=_csv(int), default=None, help=f"sequence lengths (default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--modes", type=_csv(str), default=("fwd", "bwd"), help="fwd, bwd (= forward + backward)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per task, >= 1 (default 3; --quick 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole sweep this many times, interleaved (medians over all rounds' repeats), >= 1")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first, >= 0 (default 1; the first is reported separately)")
    p.add_argument("--batch", type=int, default=1, help="B, >= 1")
    p.add_argument("--heads", type=int, default=8, help="H, >= 1")
    p.add_argument("--head-dim", type=int, default=64, help="D, >= 1")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=2, help="torch threads per task, >= 1 (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per task before it is killed, > 0")
    p.add_argument("--max-rss-gib", type=float, default=10.0, help="kill a task whose resident memory exceeds this, > 0")
    p.add_argument("--out", default="./bench-out", help="directory for bench.md, bench.csv, bench.png")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")


def _at_least(option: str, value, low) -> None:
    if not value >= low:  # also rejects nan
        raise ValueError(f"{option} must be >= {low}, got {value}")


def _positive(option: str, value) -> None:
    if not value > 0:  # also rejects nan
        raise ValueError(f"{option} must be > 0, got {value}")


def config_from_args(args):
    """A checked ``BenchConfig``: every option value is validated here, before anything runs."""
    from ..bench.runner import BenchConfig

    if not args.modes:
        raise ValueError("--modes needs at least one of fwd, bwd")
    for m in args.modes:
        if m not in ("fwd", "bwd"):
            raise ValueError(f"--modes takes fwd and/or bwd, got {m!r}")
    if args.sizes is not None and not args.sizes:
        raise ValueError("--sizes needs at least one sequence length")
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if any(n <= 0 for n in sizes):
        raise ValueError(f"--sizes must be positive, got {','.join(map(str, sizes))}")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else 1
    for option, value in (("--repeats", repeats), ("--batch", args.batch), ("--heads", args.heads),
                          ("--head-dim", args.head_dim), ("--threads", args.threads)):
        _at_least(option, value, 1)
    _at_least("--rounds", args.rounds, 1)
    _at_least("--warmup", warmup, 0)
    _positive("--timeout", args.timeout)
    _positive("--max-rss-gib", args.max_rss_gib)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file; it must be a directory (for bench.md, bench.csv, bench.png)")
    impls = args.impls
    if args.quick and not impls:
        impls = ("attnkit.*", "sdpa")
    return BenchConfig(
        sizes=tuple(sizes), modes=tuple(args.modes), families=args.families, variants=args.variants, impls=impls,
        B=args.batch, H=args.heads, D=args.head_dim, dtype=args.dtype, warmup=warmup, repeats=repeats,
        threads=args.threads, timeout_s=args.timeout, max_rss_gib=args.max_rss_gib,
        per_process="all" if args.quick else "task", rounds=args.rounds,
    )


PROCESS_NOTE = {"all": "all tasks in one process", "case": "one process per case", "task": "one process per task"}


def run(args) -> int:
    from ..bench import report, runner

    cfg = config_from_args(args)
    keys = runner.select_cases(cfg)
    for name, err in runner.IMPORT_ERRORS.items():
        print(f"warning: could not import {name}: {err}", file=sys.stderr)
    if args.list:
        print("\n".join(keys))
        return 0
    if not keys:
        raise ValueError("no case matches the filters (use --list to see the cases)")
    os.makedirs(args.out, exist_ok=True)  # fails now, not after the run, if it cannot be made
    total = len(keys) * len(cfg.sizes) * len(cfg.modes) * cfg.rounds
    print(f"attnkit bench: {len(keys)} cases x {len(cfg.sizes)} sizes x {len(cfg.modes)} modes = {total} tasks, "
          f"B={cfg.B} H={cfg.H} D={cfg.D} {cfg.dtype}, {cfg.threads} threads; progress on stderr", flush=True)
    done = 0

    def progress(res) -> None:  # what finished, on stderr; the numbers are printed once, in the table
        nonlocal done
        done += 1
        print(report.progress(res, done, total), file=sys.stderr, flush=True)

    t0 = time.time()
    results, matmul = runner.run(cfg, log=lambda line: print(line, file=sys.stderr, flush=True), on_result=progress)
    memory = cfg.per_process != "all"  # one process for everything: its peak RSS is cumulative
    header = (f"attnkit bench, B={cfg.B} H={cfg.H} D={cfg.D} {cfg.dtype}, {cfg.threads} threads, "
              f"{cfg.repeats} repeats after {cfg.warmup} warm-up, {PROCESS_NOTE[cfg.per_process]}"
              + (f", {cfg.rounds} interleaved rounds" if cfg.rounds > 1 else ""))
    md = report.markdown(results, matmul, header, memory=memory)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    report.write_csv(results, os.path.join(args.out, "bench.csv"), memory=memory)
    why = report.plot(results, os.path.join(args.out, "bench.png"), memory=memory)
    print(md)
    print(f"wrote {args.out}/bench.md, bench.csv" + (", bench.png" if why is None else f" (no plot: {why})")
          + f" in {time.time() - t0:.0f} s")
    return 0
