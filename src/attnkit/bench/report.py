"""Bench reports: a markdown table, a CSV and a log-log PNG (time and peak memory vs N), and the
one-line progress note per finished task.

One row per (family, variant, impl, mode); one column per N with "median s / peak RSS MiB"
(or the failure reason). The CSV has one line per task with every measured number.

``memory=False`` (``attnkit bench --quick``, all tasks in one process) leaves peak RSS out of the
table, the CSV and the plot: a process's high-water mark then includes every earlier task's
memory, so it would not describe the task in its row.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict

from .runner import Result

CSV_FIELDS = ["family", "variant", "impl", "N", "mode", "status", "reason", "median_s", "min_s", "max_s", "first_s",
              "peak_rss_mib", "rss_before_mib", "alloc_peak_mib", "gflops", "matmul_ratio", "vs_sdpa", "best_peer",
              "vs_best_peer"]


def is_peer(impl: str) -> bool:
    return not impl.startswith("attnkit.")


def ratios(results: list[Result]) -> dict:
    """(family, variant, mode, N, impl) -> (time / sdpa's, best peer's name, time / its) from the
    same run; None where sdpa or every peer failed or was skipped. The best peer is the fastest
    implementation that is not attnkit's (sdpa included)."""
    groups = defaultdict(dict)
    for r in results:
        if r.status == "ok" and r.median_s:
            groups[(r.family, r.variant, r.mode, r.N)][r.impl] = r.median_s
    out = {}
    for key, times in groups.items():
        sdpa = times.get("sdpa")
        peers = {i: t for i, t in times.items() if is_peer(i)}
        best = min(peers, key=peers.get) if peers else None
        for impl, t in times.items():
            out[(*key, impl)] = (t / sdpa if sdpa else None, best, t / peers[best] if best else None)
    return out


PROCESS_MEMORY_FIELDS = ("peak_rss_mib", "rss_before_mib")  # process-wide readings: per task only in a fresh process


def write_csv(results: list[Result], path: str, *, memory: bool = True) -> None:
    rat = ratios(results)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            row = {k: "" if not memory and k in PROCESS_MEMORY_FIELDS else getattr(r, k) for k in CSV_FIELDS
                   if hasattr(r, k)}
            vs_sdpa, best, vs_best = rat.get((r.family, r.variant, r.mode, r.N, r.impl), (None, None, None))
            w.writerow(dict(row, vs_sdpa=vs_sdpa, best_peer=best, vs_best_peer=vs_best))


def progress(r: Result, done: int, total: int) -> str:
    """``[3/24] softmax/dense/sdpa N=512 fwd: ok``: what finished, not its numbers (the table has them)."""
    why = "" if r.status == "ok" else f" ({r.reason})"
    return f"[{done}/{total}] {r.family}/{r.variant}/{r.impl} N={r.N} {r.mode}: {r.status}{why}"


def _cell(r: Result, memory: bool, rat=None) -> str:
    if r.status != "ok":
        return f"{r.status}: {r.reason[:40]}"
    s = f"{r.median_s:.3f} ({r.min_s:.3f}-{r.max_s:.3f})"
    if memory:
        s += f" / {r.peak_rss_mib:.0f}"
    if r.gflops:
        s += f" / {r.gflops:.0f}"
        if r.matmul_ratio:
            s += f" ({100 * r.matmul_ratio:.0f}%)"
    if rat:
        vs_sdpa, best, vs_best = rat
        if vs_sdpa is not None and r.impl != "sdpa":
            s += f" / {vs_sdpa:.2f}x SDPA"
        if best is not None and best != r.impl and best != "sdpa":
            s += f" / {vs_best:.2f}x {best}"
    return s


def markdown(results: list[Result], matmul_gflops: float | None, header: str = "", *, memory: bool = True) -> str:
    sizes = sorted({r.N for r in results})
    rows = defaultdict(dict)
    for r in results:
        rows[(r.family, r.variant, r.mode, r.impl)][r.N] = r
    lines = []
    if header:
        lines += [header, ""]
    if matmul_gflops:
        lines += [f"fp32 matmul rate (2048^3, same threads): {matmul_gflops:.1f} GFLOP/s", ""]
    cells = "median s (min-max) / peak RSS MiB / useful GFLOP/s" if memory else (
        "median s (min-max) / useful GFLOP/s (no peak RSS: all tasks share one process)")
    lines += [f"Cells: {cells} (% of the matmul rate) / time as a multiple of SDPA's and of the fastest "
              "peer's (any impl not attnkit's), same run. 'first' = first call (includes compile).", ""]
    rat = ratios(results)
    lines.append("| family | variant | mode | impl | " + " | ".join(f"N={n}" for n in sizes) + " | first call s |")
    lines.append("|---" * (5 + len(sizes)) + "|")
    for key in sorted(rows):
        fam, var, mode, impl = key
        cells = [(_cell(rows[key][n], memory, rat.get((fam, var, mode, n, impl))) if n in rows[key] else "")
                 for n in sizes]
        firsts = [f"{rows[key][n].first_s:.2f}" for n in sizes if n in rows[key] and rows[key][n].first_s is not None]
        lines.append(f"| {fam} | {var} | {mode} | {impl} | " + " | ".join(cells) + f" | {', '.join(firsts)} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: str, *, memory: bool = True) -> str | None:
    """Log-log time (and, with ``memory``, peak RSS) vs N, one panel row per (family, variant).

    Returns None when written, else why not (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e})"
    groups = defaultdict(list)
    for r in results:
        if r.status == "ok":
            groups[(r.family, r.variant)].append(r)
    if not groups:
        return "no successful results to plot"
    keys = sorted(groups)
    panels = (("time (s)", "median_s"), ("peak RSS (MiB)", "peak_rss_mib"))[:2 if memory else 1]
    fig, axes = plt.subplots(len(keys), len(panels), figsize=(5.5 * len(panels), 3.2 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        series = defaultdict(list)
        for r in groups[key]:
            series[(r.impl, r.mode)].append(r)
        for (impl, mode), rs in sorted(series.items()):
            rs.sort(key=lambda r: r.N)
            style = "-" if mode == "fwd" else "--"
            ns = [r.N for r in rs]
            for col, (_, field) in enumerate(panels):
                axes[row][col].plot(ns, [getattr(r, field) for r in rs], style, marker="o", label=f"{impl} {mode}")
        for col, (ylabel, _) in enumerate(panels):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{key[0]}/{key[1]}")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
