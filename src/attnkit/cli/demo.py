"""``attnkit demo``: run every implemented variant on its default workload, check it against a
float64 reference, and print a table (variant, backend, max error, time, peak memory).

Rows come from the modules in ``attnkit.cli.demo_cases`` (each exports ``cases()``). A case
that cannot run prints its reason below the table and gets no row.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import statistics
import time

import torch

from .. import _memory
from ..tolerances import TOL
from . import demo_cases
from .demo_api import DemoCase


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default=None, help="run only variants whose name contains this text")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")


def all_cases() -> list[DemoCase]:
    out = []
    for info in sorted(pkgutil.iter_modules(demo_cases.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"{demo_cases.__name__}.{info.name}")
        out.extend(mod.cases())
    return out


def _measure(case: DemoCase, repeats: int) -> dict:
    prep = case.prepare()
    base = _memory.rss_mib()
    _memory.reset_peak_rss()
    out = prep.run()  # warm-up (and the value we check); counted in the peak
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prep.run()
        times.append(time.perf_counter() - t0)
    peak = _memory.peak_rss_mib()
    ref = prep.reference()
    err = (out.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs().max().item()
    if prep.expected_error is not None:
        ok = err <= prep.expected_error
        bound = prep.expected_error
    else:
        atol, rtol = TOL[out.dtype]
        bound = 4 * (atol + rtol * ref.abs().max().item())  # 4 = the tiled backends' factor
        ok = err <= bound
    return {
        "variant": case.variant, "backend": prep.backend, "max_error": err, "bound": bound, "ok": ok,
        "time_ms": 1e3 * statistics.median(times),
        "peak_mib": None if peak is None or base is None else max(peak - base, 0.0),
    }


def _fmt_table(rows: list[dict]) -> str:
    head = ["variant", "backend", "max error", "bound", "check", "time ms", "peak MiB"]
    body = [[r["variant"], r["backend"], f"{r['max_error']:.2e}", f"{r['bound']:.1e}", "ok" if r["ok"] else "FAIL",
             f"{r['time_ms']:.1f}", "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in all_cases() if args.only is None or args.only in c.variant]
    print(f"attnkit demo: {len(cases)} variants, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "error is max |fast - float64 reference|; peak MiB is the RSS growth from just before the first run\n"
          "(memory freed by earlier rows and reused is not counted: `attnkit bench` measures each case in a fresh process)\n")
    rows, skipped = [], []
    for case in cases:
        try:
            rows.append(_measure(case, max(1, args.repeats)))
        except Exception as e:  # noqa: BLE001  (reported, and the case gets no row)
            skipped.append((case.variant, f"{type(e).__name__}: {e}"))
    print(_fmt_table(rows))
    for name, why in skipped:
        print(f"\nnot run: {name}: {why}")
    if args.csv:
        import csv
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["variant"])
            w.writeheader()
            w.writerows(rows)
    failed = [r["variant"] for r in rows if not r["ok"]]
    if failed:
        print(f"\nFAILED the float64 check: {', '.join(failed)}")
    print(f"\n{len(rows)} ran, {len(failed)} failed, {len(skipped)} could not run")
    return 1 if failed or skipped else 0
