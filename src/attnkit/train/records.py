"""What a run writes into its folder, and the progress bar.

- ``metrics.json``: task, attention, position, params, steps, seconds (wall, resumed runs
  included), eval (metric name -> number: ``accuracy``, ``val_loss`` or ``val_loss@<length>``),
  and train_seconds, tokens_per_s, peak_memory_mib (process peak RSS on CPU, peak allocated on
  CUDA), device, seed, config, final_train_loss.
- ``curve.csv``: step, train_loss, and the eval metric at evaluated steps (empty elsewhere).
- ``loss.png``: train loss (and the eval metric on a second axis) against steps.
- ``checkpoint.pt``: see ``attnkit.train.loop``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

METRICS, CURVE, PLOT = "metrics.json", "curve.csv", "loss.png"


def write_run(out: Path, metrics: dict, curve: list, task) -> None:
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    metric = task.metric_names()[0]
    with open(out / CURVE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train_loss", metric])
        for step, loss, m in curve:
            w.writerow([int(step), f"{loss:.6f}", "" if math.isnan(m) else f"{m:.6f}"])
    plot_run(out / PLOT, curve, metric, title=f"{metrics['task']}  attention={metrics['attention']}  "
                                             f"position={metrics['position']}")


def read_curve(path: Path) -> list[tuple[int, float, float]]:
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            vals = list(r.values())
            rows.append((int(vals[0]), float(vals[1]), float(vals[2]) if vals[2] else float("nan")))
    return rows


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing mean over k values (k >= 1)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None with a note when it is missing."""
    try:
        import matplotlib
    except ImportError:
        print("note: no PNG written (matplotlib is missing: pip install 'attnkit[cli]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(path: Path, curve: list, metric: str, title: str) -> None:
    plt = pyplot()
    if plt is None or not curve:
        return
    steps = [r[0] for r in curve]
    losses = [r[1] for r in curve]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="0.75", lw=0.8, label="train loss")
    ax.plot(steps, smooth(losses, max(1, len(losses) // 50)), color="C0", lw=1.5, label="train loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ev = [(s, m) for s, _, m in curve if not math.isnan(m)]
    if ev:
        ax2 = ax if metric.startswith("val_loss") else ax.twinx()
        ax2.plot([s for s, _ in ev], [m for _, m in ev], "o-", color="C3", label=metric)
        if ax2 is not ax:
            ax2.set_ylabel(metric)
            ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Bar:
    """tqdm (or rich) progress bar with loss, accuracy, tokens/s and ETA; silent when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                print("note: no progress bar (tqdm is missing: pip install 'attnkit[train]')", file=sys.stderr)
                return
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)
        self.metric = None

    def update(self, n: int, *, loss: float, acc: float, tok_s: float, metric: float) -> None:
        if self.bar is None:
            return
        if not math.isnan(metric):
            self.metric = metric
        self.bar.update(n)
        post = {"loss": f"{loss:.3f}", "acc": f"{acc:.3f}", "tok/s": f"{tok_s:,.0f}"}
        if self.metric is not None:
            post["eval"] = f"{self.metric:.4f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(total: int, initial: int, enabled: bool, desc: str) -> _Bar:
    return _Bar(total, initial, enabled, desc)


__all__ = ["write_run", "read_curve", "plot_run", "progress_bar", "smooth", "pyplot", "METRICS", "CURVE", "PLOT"]
