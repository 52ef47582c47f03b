"""The benchmark runner: which tasks, in which processes, and the summary of each.

A task is (case, N, mode). Each runs in a fresh Python process (``attnkit.bench.worker``) with the
requested thread count, so peak memory belongs to that task alone and no allocator or compile
cache carries over. The parent watches the child's resident memory and kills it above
``max_rss_gib`` (reported as "fail: > X GiB") and after ``timeout_s``. When a (case, mode) fails
at some N, larger N are skipped ("skipped: failed at N=...").

Summary per task: median and min / max of the timed repeats, peak RSS, useful GFLOP/s (the case's
``flops(shape, mode)`` over the median time) and its ratio to the fp32 matmul rate measured on
the same machine with the same threads at the start of the run.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from .registry import CASES, BenchShape


def discover() -> dict:
    """Import every ``attnkit.bench.cases_*`` module (each registers its cases); return CASES.

    A module that fails to import is reported as a pseudo-case error instead of hiding the rest.
    """
    from .. import bench as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("cases_"):
            name = f"{pkg.__name__}.{info.name}"
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - keep the other modules' cases usable
                IMPORT_ERRORS[name] = f"{type(e).__name__}: {e}"
    return CASES


IMPORT_ERRORS: dict[str, str] = {}


@dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[int, ...] = (1024, 4096)
    modes: tuple[str, ...] = ("fwd", "bwd")
    families: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    impls: tuple[str, ...] = ()
    B: int = 1
    H: int = 8
    D: int = 64
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 3
    threads: int = 2
    timeout_s: float = 300.0
    max_rss_gib: float = 10.0
    per_process: str = "task"  # "task": one process per (case, N, mode); "case": one per case; "all": one
    device: str = "cpu"
    rounds: int = 1  # repeat the whole sweep, interleaved (round 1 of every task, then round 2, ...)


@dataclass
class Result:
    family: str
    variant: str
    impl: str
    N: int
    mode: str
    status: str
    reason: str = ""
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    first_s: float | None = None
    peak_rss_mib: float | None = None
    rss_before_mib: float | None = None
    alloc_peak_mib: float | None = None
    gflops: float | None = None
    matmul_ratio: float | None = None
    times: list = field(default_factory=list)


def _match(value: str, wanted: tuple[str, ...]) -> bool:
    """Empty filter matches all; otherwise exact name or a prefix ending in '*'."""
    if not wanted:
        return True
    return any(value == w or (w.endswith("*") and value.startswith(w[:-1])) for w in wanted)


def select_cases(cfg: BenchConfig) -> list[str]:
    discover()
    return [key for key, c in sorted(CASES.items())
            if _match(c.family, cfg.families) and _match(c.variant, cfg.variants) and _match(c.impl, cfg.impls)]


def _spawn(tasks: list[dict], cfg: BenchConfig, log) -> list[dict]:
    """Run tasks in one child process; enforce timeout and RSS limit; return result dicts."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads),
               ATTNKIT_BENCH_DEVICE=cfg.device, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="attnkit-bench-") as tmp:
        tin, tout, terr = (os.path.join(tmp, n) for n in ("tasks.json", "out.jsonl", "err.txt"))
        with open(tin, "w") as f:
            json.dump(tasks, f)
        with open(tout, "w") as fo, open(terr, "w") as fe:
            proc = subprocess.Popen([sys.executable, "-m", "attnkit.bench.worker", tin], stdin=subprocess.DEVNULL,
                                    stdout=fo, stderr=fe, env=env, text=True)
            killed = _watch(proc, cfg, cfg.timeout_s * len(tasks))
        with open(tout) as f:
            out = f.read()
        with open(terr) as f:
            err = f.read()
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    done = len(results)
    for task in tasks[done:]:
        reason = killed or f"worker exited with code {proc.returncode}: {err.strip().splitlines()[-1][:200] if err.strip() else ''}"
        results.append(dict(task, status="fail", reason=reason, times=[]))
        killed = killed and "skipped: earlier task in this process failed"
    return results


def _watch(proc, cfg: BenchConfig, budget: float) -> str:
    """Wait for the child; kill it above the RSS limit or the time budget; return why, or ''."""
    from .._memory import read_status_kib

    t0 = time.monotonic()
    while proc.poll() is None:
        rss = read_status_kib("VmRSS", str(proc.pid)) or 0
        why = ""
        if rss > cfg.max_rss_gib * 2 ** 20:
            why = f"> {cfg.max_rss_gib:g} GiB"
        elif time.monotonic() - t0 > budget:
            why = f"timeout > {budget:g} s"
        if why:
            proc.kill()
            proc.wait()
            return why
        time.sleep(0.05)
    return ""


def _summarise(r: dict, matmul_gflops: float | None) -> Result:
    from .registry import CASES

    fam, var, impl = r["case"].split("/", 2)
    res = Result(fam, var, impl, int(r["shape"]["N"]), r["mode"], r["status"], r.get("reason", ""),
                 first_s=r.get("first_s"), peak_rss_mib=r.get("peak_rss_mib"), rss_before_mib=r.get("rss_before_mib"),
                 alloc_peak_mib=r.get("alloc_peak_mib"), times=list(r.get("times") or []))
    if res.status == "ok" and res.times:
        res.median_s = statistics.median(res.times)
        res.min_s, res.max_s = min(res.times), max(res.times)
        case = CASES.get(r["case"])
        if case is not None and case.flops is not None:
            import torch

            sh = dict(r["shape"])
            sh["dtype"] = getattr(torch, sh.get("dtype", "float32"))
            fl = case.flops(BenchShape(**sh), r["mode"])
            if fl:
                res.gflops = fl / res.median_s / 1e9
                if matmul_gflops:
                    res.matmul_ratio = res.gflops / matmul_gflops
    return res


def run(cfg: BenchConfig, log=print, on_result=None) -> tuple[list[Result], float | None]:
    """Run the sweep; returns the results and the measured fp32 matmul rate (GFLOP/s).

    ``on_result(result)`` is called as each task finishes (default: ``log`` a summary line).
    """
    on_result = on_result or (lambda res: log(_line(res)))
    keys = select_cases(cfg)
    base = dict(warmup=cfg.warmup, repeats=cfg.repeats, threads=cfg.threads)
    mm = _spawn([dict(base, case="__matmul__")], cfg, log)
    matmul = mm[0].get("gflops") if mm and mm[0].get("status") == "ok" else None
    if matmul:
        log(f"fp32 matmul 2048^3 on {cfg.threads} threads: {matmul:.1f} GFLOP/s")
    results: list[Result] = []
    if cfg.per_process == "all":  # --quick: one process for everything (startup dominates tiny tasks)
        tasks = [dict(base, case=key, mode=mode, shape=dict(B=cfg.B, H=cfg.H, N=n, D=cfg.D, dtype=cfg.dtype))
                 for key in keys for mode in cfg.modes for n in cfg.sizes]
        for r in _spawn(tasks, cfg, log):
            res = _summarise(r, matmul)
            results.append(res)
            on_result(res)
        keys = []
    merged: dict = {}  # (case, mode, N) -> raw result with the times of every round
    failed_at: dict = {}
    for rnd in range(max(1, cfg.rounds)):
        if cfg.rounds > 1:
            log(f"round {rnd + 1} of {cfg.rounds}")
        for key in keys:
            for mode in cfg.modes:
                tasks = [dict(base, case=key, mode=mode,
                              shape=dict(B=cfg.B, H=cfg.H, N=n, D=cfg.D, dtype=cfg.dtype)) for n in cfg.sizes]
                if cfg.per_process == "case":
                    raw = _spawn(tasks, cfg, log)
                else:
                    raw = []
                    for t in tasks:
                        if (key, mode) in failed_at:
                            raw.append(dict(t, status="fail", reason=f"skipped: failed at N={failed_at[key, mode]}",
                                            times=[]))
                            continue
                        r = _spawn([t], cfg, log)[0]
                        raw.append(r)
                        if r["status"] == "fail":
                            failed_at[key, mode] = t["shape"]["N"]
                for r in raw:
                    _fold(merged, r)
                    on_result(_summarise(r, matmul))
    results += [_summarise(r, matmul) for r in merged.values()]
    for name, err in IMPORT_ERRORS.items():
        log(f"could not import {name}: {err}")
    return results, matmul


def _fold(merged: dict, r: dict) -> None:
    """Add one round's raw result: times accumulate; first call and peak memory keep the max."""
    key = (r["case"], r["mode"], r["shape"]["N"])
    old = merged.get(key)
    if old is None or old["status"] != "ok":
        merged[key] = dict(r, times=list(r.get("times") or []))
        return
    if r["status"] != "ok":
        return
    old["times"] += list(r.get("times") or [])
    for name in ("first_s", "peak_rss_mib", "alloc_peak_mib"):
        if r.get(name) is not None:
            old[name] = max(old.get(name) or 0.0, r[name])


def _line(r: Result) -> str:
    head = f"{r.family}/{r.variant}/{r.impl} N={r.N} {r.mode}: "
    if r.status != "ok":
        return head + f"{r.status}: {r.reason}"
    gf = f", {r.gflops:.1f} GFLOP/s" if r.gflops else ""
    return head + f"{r.median_s:.4f} s ({r.min_s:.4f}-{r.max_s:.4f}), peak RSS {r.peak_rss_mib:.0f} MiB{gf}"


def results_as_dicts(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]
