"""``attnkit demo``: run every implemented variant on its default workload, check it against a
float64 reference, and print a table (variant, max error, bound, check, time, peak memory,
backend), one row as each variant finishes.

Rows come from the modules in ``attnkit.cli.demo_cases`` (each exports ``cases()``). A case
that cannot run prints its reason below the table and gets no row. Check column: ``ok`` = an
exact path within the dtype tolerance; ``approx`` = an approximation of exact attention
(Performer, Nystrom, LSH) within the error bound its docs state, so a large error there is
expected; ``FAIL`` = outside its tolerance or bound (exit status 1).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import pkgutil
import statistics
import time

import torch

from .. import _memory
from ..tolerances import TOL
from . import demo_cases
from .demo_api import DemoCase

CSV_FIELDS = ["variant", "backend", "max_error", "bound", "check", "time_ms", "peak_mib"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default=None, help="run only variants whose name contains this text (see --list)")
    p.add_argument("--list", action="store_true", help="list the variant names and exit")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant, >= 1 (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, >= 1 (default: torch's)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file (as they finish)")


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
    if prep.expected_error is not None:  # an approximation: its documented bound
        bound, passed, label = prep.expected_error, err <= prep.expected_error, "approx"
    else:
        atol, rtol = TOL[out.dtype]
        bound = 4 * (atol + rtol * ref.abs().max().item())  # 4 = the tiled backends' factor
        passed, label = err <= bound, "ok"
    return {
        "variant": case.variant, "backend": prep.backend, "max_error": err, "bound": bound,
        "check": label if passed else "FAIL", "bound_source": prep.bound_source,
        "time_ms": 1e3 * statistics.median(times),
        "peak_mib": None if peak is None or base is None else max(peak - base, 0.0),
    }


class _Table:
    """Fixed-width rows printed as they come; the backend (free text) is the last column."""

    HEAD = ["variant", "max error", "bound", "check", "time ms", "peak MiB", "backend"]

    def __init__(self, variant_width: int):
        self.widths = [max(variant_width, len(self.HEAD[0])), 9, 9, 6, 8, 8, 0]

    def _line(self, cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, self.widths)).rstrip()

    def header(self) -> str:
        return "\n".join([self._line(self.HEAD), self._line(["-" * max(w, len(h)) for h, w in zip(self.HEAD, self.widths)])])

    def row(self, r: dict) -> str:
        return self._line([r["variant"], f"{r['max_error']:.2e}", f"{r['bound']:.1e}", r["check"], f"{r['time_ms']:.1f}",
                           "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}", r["backend"]])


def select(only: str | None) -> list[DemoCase]:
    cases = all_cases()
    if only is None:
        return cases
    chosen = [c for c in cases if only in c.variant]
    if not chosen:
        raise ValueError(f"--only {only!r} matches no demo variant (attnkit demo --list shows the {len(cases)} names)")
    return chosen


def run(args) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    cases = select(args.only)
    if args.list:
        print("\n".join(c.variant for c in cases))
        return 0
    csv_file = open(args.csv, "w", newline="") if args.csv else None  # fails now if it cannot be written
    try:
        return _run(cases, args, csv.DictWriter(csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore") if csv_file else None)
    finally:
        if csv_file:
            csv_file.close()


def _run(cases: list[DemoCase], args, csv_writer) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"attnkit demo: {len(cases)} variants, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "error is max |fast - float64 reference|; peak MiB is the RSS growth from just before the first run\n"
          "(memory freed by earlier rows and reused is not counted: `attnkit bench` measures each case in a fresh process)\n",
          flush=True)
    table = _Table(max(len(c.variant) for c in cases))
    print(table.header(), flush=True)
    if csv_writer:
        csv_writer.writeheader()
    rows, skipped = [], []
    for case in cases:
        try:
            r = _measure(case, args.repeats)
        except Exception as e:  # noqa: BLE001  (reported, and the case gets no row)
            skipped.append((case.variant, f"{type(e).__name__}: {e}"))
            continue
        rows.append(r)
        print(table.row(r), flush=True)
        if csv_writer:
            csv_writer.writerow(r)
    approx = [r for r in rows if r["bound_source"]]
    if approx:
        print("\napprox = an approximation of exact attention, compared with exact attention: a large error is "
              "expected; it passes when within the bound its docs state:")
        for r in approx:
            print(f"  {r['variant']}: max error {r['max_error']:.2e}, documented bound {r['bound']:.2g} "
                  f"({r['bound_source']})")
    for name, why in skipped:
        print(f"\nnot run: {name}: {why}")
    failed = [r["variant"] for r in rows if r["check"] == "FAIL"]
    if failed:
        print(f"\nFAILED the float64 check: {', '.join(failed)}")
    print(f"\n{len(rows)} ran, {len(failed)} failed, {len(skipped)} could not run")
    return 1 if failed or skipped else 0
