"""Prefill of a padded batch through a Hugging Face model: attnkit vs sdpa vs eager, as a table.

    PYTHONPATH=src python benchmarks/transformers_prefill.py --sizes 4096,16384

The workload is ``attnkit bench``'s "transformers" family (``attnkit.bench.cases_transformers``:
Llama-shaped and Mistral-shaped models, hidden 512, 8 heads, 2 kv heads, 2 layers, random init,
B=2 prompts of N tokens, the last row 25% left-padded; one forward with ``logits_to_keep=1``).
Each (variant, N, impl) runs in a fresh process that builds the model, then times ``--calls``
forwards (the first is a warm-up when --calls > 1); the process's peak RSS is reset after the model
is built, so "peak" is weights + libraries + the forward, and "+fwd" is the forward's own growth.

Time is reported twice: wall clock, and the process's CPU time (all its threads). On a shared
machine the wall clock of a 2-thread job grows with the other jobs' load, its CPU time much less;
ratios are taken from CPU time. The parent kills a process above --max-rss-gib (eager at large N
is refused before it starts, with the size it would need: see the case's ``available``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

IMPLS = ("attnkit.auto", "sdpa", "eager")


def child(task: dict) -> dict:
    import gc

    import torch

    from attnkit._memory import read_status_kib, reset_peak_rss
    from attnkit.bench.registry import CASES, BenchShape
    from attnkit.bench.runner import discover

    torch.set_num_threads(task["threads"])
    discover()
    case = CASES[f"transformers/{task['variant']}/{task['impl']}"]
    shape = BenchShape(B=task["B"], H=8, N=task["N"], D=64)
    why = case.available(shape, "fwd")
    if why:
        return dict(task, status="skip", reason=why)
    step = case.make(shape, "fwd")
    gc.collect()
    before = read_status_kib("VmRSS") / 1024
    reset_peak_rss()
    wall, cpu = [], []
    for _ in range(task["calls"]):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    timed = slice(1, None) if len(wall) > 1 else slice(None)
    return dict(task, status="ok", wall_s=min(wall[timed]), cpu_s=min(cpu[timed]), rss_before_mib=before,
                peak_rss_mib=read_status_kib("VmHWM") / 1024)


def spawn(task: dict, max_rss_gib: float, timeout_s: float) -> dict:
    """Run one task in a fresh process; the bench runner's watchdog kills it above the RSS limit."""
    from attnkit.bench.runner import BenchConfig, _watch

    env = dict(os.environ, OMP_NUM_THREADS=str(task["threads"]), MKL_NUM_THREADS=str(task["threads"]))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: no pipe can fill up
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(task)], stdout=out, stderr=err,
                                text=True, env=env)
        why = _watch(proc, BenchConfig(max_rss_gib=max_rss_gib), timeout_s)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        last_err = (err.read().strip().splitlines() or ["?"])[-1][:200]
    if why:
        return dict(task, status="fail", reason=f"killed: {why}")
    if proc.returncode or not lines:
        return dict(task, status="fail", reason=last_err)
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    rows = ["| model | N | impl | wall s | CPU s | CPU / sdpa's | peak RSS MiB | +fwd MiB | sdpa's peak / peak |",
            "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["variant"], r["N"], r["impl"]): r for r in results}
    for (variant, N, impl), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], IMPLS.index(kv[0][2]))):
        if r["status"] != "ok":
            rows.append(f"| {variant} | {N} | {impl} | {r['status']}: {r['reason']} | | | | | |")
            continue
        ref = by.get((variant, N, "sdpa"))
        ok = ref is not None and ref["status"] == "ok"
        cpu_ratio = f"{r['cpu_s'] / ref['cpu_s']:.2f}x" if ok else ""
        mem_ratio = f"{ref['peak_rss_mib'] / r['peak_rss_mib']:.2f}" if ok else ""
        rows.append(f"| {variant} | {N} | {impl} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {cpu_ratio} | "
                    f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} | {mem_ratio} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="4096,16384")
    p.add_argument("--variants", default="llama_pad,mistral_swa4096_pad")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--calls", type=int, default=2, help="forwards per process; the first is a warm-up if > 1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-rss-gib", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    variants = ("llama_pad", "mistral_swa4096_pad")
    for name, given, known in (("--impls", args.impls, IMPLS), ("--variants", args.variants, variants)):
        bad = [w for w in given.split(",") if w not in known]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    results = []
    for N in (int(n) for n in args.sizes.split(",")):
        for variant in args.variants.split(","):
            for impl in args.impls.split(","):
                task = dict(variant=variant, impl=impl, N=N, B=args.batch, calls=args.calls, threads=args.threads)
                r = spawn(task, args.max_rss_gib, args.timeout)
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\nB={args.batch}, {args.threads} threads, {args.calls} forward(s) per process; load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
