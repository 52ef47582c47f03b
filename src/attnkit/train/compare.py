"""``attnkit compare``: train several (variant, position) runs of one task and tabulate them.

Writes into ``out``: one folder per run (as ``attnkit train``), ``results.csv`` and
``results.md`` (variant, position, params, seconds, tokens/s, peak memory, the eval metrics,
the final train loss), and three plots: ``metric.png`` (the metric per run; per evaluation
length for extrapolation), ``curves.png`` (train loss curves overlaid) and ``frontier.png``
(the metric against wall seconds: the quality/speed frontier).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

from . import records
from .config import RunConfig
from .loop import CHECKPOINT, train


def slug(attention: str, position: str) -> str:
    s = f"{attention}__{position}"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")[:80]


def plan(base: RunConfig, variants: list[str], positions: list[str | None]) -> list[RunConfig]:
    """One resolved, checked config per (variant, position): every bad word fails before training."""
    if not variants:
        raise ValueError("--variants must name at least one variant")
    runs = []
    for p in positions or [None]:
        for v in variants:
            cfg = dataclasses.replace(base, attention=v, position=p).resolved()
            try:
                cfg.specs()
            except ValueError as e:
                raise ValueError(f"--variants/--positions {v} with {cfg.position}: {e}") from None
            runs.append(cfg)
    return runs


def compare(base: RunConfig, variants: list[str], positions: list[str | None], out: str | Path, *,
            resume: bool = False, progress: bool = True, command: str | None = None) -> list[dict]:
    """Train every run (reusing finished ones and resuming interrupted ones when ``resume``)."""
    out = Path(out)
    runs = plan(base, variants, positions)
    out.mkdir(parents=True, exist_ok=True)
    results, seen = [], set()
    for i, cfg in enumerate(runs):
        name = slug(cfg.attention, cfg.position)
        name = name if name not in seen else f"{name}_{i}"
        seen.add(name)
        d = out / name
        done = d / records.METRICS
        if resume and done.exists() and json.loads(done.read_text()).get("config") == cfg.to_dict():
            m = json.loads(done.read_text())
        else:
            m = train(cfg, d, resume=resume and (d / CHECKPOINT).exists(), progress=progress)
        m["dir"] = name
        results.append(m)
    write_results(out, results, command)
    return results


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 100 else f"{x:,.0f}"
    return str(x)


def write_results(out: Path, results: list[dict], command: str | None = None) -> None:
    metric_keys = list(results[0]["eval"])
    head = ["variant", "position", "params", "seconds", "tokens_per_s", "peak_memory_mib", *metric_keys,
            "final_train_loss"]
    rows = [[r["attention"], r["position"], r["params"], r["seconds"], r["tokens_per_s"], r["peak_memory_mib"],
             *[r["eval"].get(k) for k in metric_keys], r.get("final_train_loss")] for r in results]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(rows)
    cfg = results[0]["config"]
    lines = [f"# {cfg['task']}: {len(results)} runs", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Each run: {cfg['layers']} layers, width {cfg['dim']}, {cfg['heads']} heads, {cfg['steps']} steps of "
              f"batch {cfg['batch']}, lr {cfg['lr']}, seed {cfg['seed']}, device {results[0]['device']}. "
              "seconds: wall time of the run; peak memory: process peak RSS on CPU (MiB).", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(out, results, metric_keys)


def _label(r: dict) -> str:
    return f"{r['attention']} / {r['position']}"


def plot_results(out: Path, results: list[dict], metric_keys: list[str]) -> None:
    plt = records.pyplot()
    if plt is None:
        return
    labels = [_label(r) for r in results]
    key = metric_keys[0]
    # metric per run (per length when there are several)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(results) + 2), 4))
    if len(metric_keys) == 1:
        vals = [r["eval"][key] for r in results]
        ax.bar(range(len(vals)), vals, color=[f"C{i % 10}" for i in range(len(vals))])
        ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(key)
    else:
        xs = [int(k.split("@")[1]) if "@" in k else i for i, k in enumerate(metric_keys)]
        for i, r in enumerate(results):
            ax.plot(xs, [r["eval"][k] for k in metric_keys], "o-", color=f"C{i % 10}", label=labels[i])
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("evaluation length")
        ax.set_ylabel(key.split("@")[0])
        ax.legend(fontsize=7)
    ax.set_title(f"{results[0]['config']['task']}: {key.split('@')[0]} per run", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "metric.png", dpi=110)
    plt.close(fig)
    # train loss curves overlaid
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(results):
        curve = records.read_curve(out / r["dir"] / records.CURVE)
        losses = [c[1] for c in curve]
        ax.plot([c[0] for c in curve], records.smooth(losses, max(1, len(losses) // 40)), color=f"C{i % 10}",
                lw=1.2, label=labels[i])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (smoothed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    # quality / speed frontier
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, r in enumerate(results):
        y = r["eval"][key]
        if y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        ax.scatter(r["seconds"], y, color=f"C{i % 10}")
        ax.annotate(labels[i], (r["seconds"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("wall seconds per run")
    ax.set_ylabel(key)
    ax.set_title("quality vs time" + (" (higher is better)" if key == "accuracy" else " (lower is better)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)


__all__ = ["compare", "plan", "write_results", "slug"]
