"""One benchmark task in a fresh process: ``python -m attnkit.bench.worker [TASKS.json]`` reads a
JSON task list (from the file, else stdin) and prints one JSON result per line on stdout.

Task: {"case": "family/variant/impl", "shape": {B, H, N, D, dtype}, "mode": "fwd"|"bwd",
"warmup": int, "repeats": int, "threads": int}. Result: the task plus "status" ("ok", "skip",
"fail"), "reason", "times" (seconds of each timed repeat), "first_s" (the first call, which
includes any compile), "rss_before_mib" (resident memory after building inputs), "peak_rss_mib"
(VmHWM of the process), "alloc_peak_mib" (CUDA allocator peak, None on CPU).

Peak RSS: the kernel's high-water mark, read from /proc/self/status; before the timed steps it is
reset to the current RSS (writing "5" to /proc/self/clear_refs) so the peak belongs to the steps
and not to input construction; where the reset is not allowed the process peak is reported.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback

from .._memory import read_status_kib, reset_peak_rss


def matmul_rate(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul rate in GFLOP/s (median of ``repeats`` n x n x n products)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 2.0 * n ** 3 / ts[len(ts) // 2] / 1e9


def run_task(task: dict) -> dict:
    import torch

    from .registry import CASES, BenchShape
    from .runner import discover

    discover()
    torch.set_num_threads(int(task["threads"]))
    res = dict(task, status="fail", reason="", times=[], first_s=None, rss_before_mib=None, peak_rss_mib=None,
               alloc_peak_mib=None)
    case = CASES.get(task["case"])
    if case is None:
        res["reason"] = f"unknown case {task['case']}"
        return res
    sh = dict(task["shape"])
    sh["dtype"] = getattr(torch, sh.get("dtype", "float32"))
    shape = BenchShape(**sh)
    try:
        why = case.available(shape, task["mode"])
        if why:
            res.update(status="skip", reason=str(why))
            return res
        step = case.make(shape, task["mode"])
        gc.collect()
        cuda = torch.cuda.is_available() and shape.dtype is not None and _uses_cuda()
        res["rss_before_mib"] = (read_status_kib("VmRSS") or 0) / 1024
        reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        _sync(cuda)
        res["first_s"] = time.perf_counter() - t0
        for _ in range(max(0, int(task["warmup"]) - 1)):
            step()
        _sync(cuda)
        times = []
        for _ in range(int(task["repeats"])):
            t0 = time.perf_counter()
            step()
            _sync(cuda)
            times.append(time.perf_counter() - t0)
        res["times"] = times
        hwm = read_status_kib("VmHWM")
        res["peak_rss_mib"] = hwm / 1024 if hwm is not None else None
        if cuda:
            res["alloc_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a failing case is reported, not fatal
        msg = str(e).strip().splitlines()
        res["reason"] = f"{type(e).__name__}: {msg[0][:200] if msg else ''}"
        res["traceback"] = traceback.format_exc()[-2000:]
    return res


def _uses_cuda() -> bool:
    import os

    return os.environ.get("ATTNKIT_BENCH_DEVICE", "cpu") == "cuda"


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def main() -> int:
    if len(sys.argv) > 1:
        with open(sys.argv[1]) as f:
            tasks = json.load(f)
    else:
        tasks = json.load(sys.stdin)
    for task in tasks:
        if task.get("case") == "__matmul__":
            out = dict(task, status="ok", gflops=matmul_rate(int(task["threads"])))
        else:
            out = run_task(task)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
