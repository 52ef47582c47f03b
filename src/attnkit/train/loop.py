"""The training loop of ``attnkit train``: seeded, resumable, evaluated on a fixed set.

Legend: B batch, N tokens, C classes or vocab.

- Optimiser: AdamW (betas 0.9, 0.99; weight decay 0.1 on matrices, none on biases, norms and
  embeddings' 1-d parameters), linear warm-up over min(100, steps / 10) steps, cosine decay to
  lr / 10 at the last step, gradients clipped to norm 1 (nanoGPT's recipe).
- Data: batch ``step`` is a pure function of (seed, step) (``Task.train_batch``), made one step
  ahead in a thread while the model computes. The model is initialised after
  ``torch.manual_seed(seed)``: the same seed gives the same metrics on CPU.
- Evaluation every ``eval_every`` steps and at the end, on the task's fixed set.
- Checkpoint ``checkpoint.pt`` (plain tensors and Python values: ``torch.load(weights_only=True)``)
  after each evaluation, on Ctrl-C, and at the end; ``resume=True`` continues from it with the
  same model, optimiser, RNG and curve, so a resumed run ends with the metrics of an
  uninterrupted one.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from .._memory import peak_rss_mib, reset_peak_rss
from ..tasks import IGNORE, Batch, Task
from . import records
from .config import RunConfig

CHECKPOINT = "checkpoint.pt"
FORMAT = "attnkit-train-1"


class Interrupted(Exception):
    """Training stopped before its last step; the checkpoint holds ``step`` completed steps."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted after step {step}; checkpoint {path}: continue with --resume")
        self.step, self.path = step, path


def lr_at(step: int, steps: int, lr: float) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to lr / 10."""
    warmup = max(1, min(100, steps // 10))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def logits_of(model, b: Batch) -> torch.Tensor:
    """(B, N, V) for language models, (B, C) for classifiers."""
    return model(b.x, padding_mask=b.padding_mask)


def loss_and_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over the targets that count, the number right, and their count."""
    flat = logits.reshape(-1, logits.shape[-1]).float()          # (B N, C) or (B, C)
    t = y.reshape(-1)
    keep = t != IGNORE
    loss = F.cross_entropy(flat, t, ignore_index=IGNORE, reduction="sum")
    hits = int((flat.argmax(-1)[keep] == t[keep]).sum())
    return loss, hits, int(keep.sum())


@torch.no_grad()
def evaluate(model, task: Task, batch: int, device) -> dict[str, float]:
    """``metrics.json``'s ``eval``: accuracy, or val_loss (nats per token) per length group."""
    was = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    for b in task.eval_batches(batch):
        b = b.to(device)
        loss, hits, n = loss_and_hits(logits_of(model, b), b.y)
        s = sums.setdefault(b.group, [0.0, 0, 0])
        s[0] += float(loss)
        s[1] += hits
        s[2] += n
    model.train(was)
    out = {}
    for group, (loss, hits, n) in sums.items():
        key = task.metric if not group else f"{task.metric}@{group}"
        out[key] = hits / n if task.metric == "accuracy" else loss / n
    return {k: out[k] for k in task.metric_names()}


def _peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(out: Path) -> dict:
    path = Path(out) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state.get("format") != FORMAT:
        raise ValueError(f"--resume: {path} is not an attnkit train checkpoint")
    return state


def resume_config(cfg: RunConfig, given: set[str], out: Path) -> RunConfig:
    """The checkpoint's config; options given on the command line must agree with it."""
    saved = RunConfig.from_dict(load_checkpoint(out)["config"])
    for name in sorted(given):
        if name != "device" and getattr(cfg, name) != getattr(saved, name):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} differs from the checkpoint's "
                             f"{getattr(saved, name)!r} (resume continues the same run; use another --out)")
    return RunConfig.from_dict({**saved.to_dict(), "device": cfg.device})


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train one run and write its files into ``out`` (see ``records``); returns metrics.json's dict.

    stop_after: stop (as Ctrl-C would) once this many steps are done, raising ``Interrupted``.
    """
    out = Path(out)
    cfg = cfg.resolved()
    task = cfg.get_task()
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = cfg.build_model().to(device)
    opt = make_optimizer(model, cfg.lr)
    params = sum(p.numel() for p in model.parameters())
    start, curve, seconds, train_seconds, tokens = 0, [], 0.0, 0.0, 0
    if resume:
        state = load_checkpoint(out)
        if {**state["config"], "device": cfg.device} != cfg.to_dict():
            raise ValueError(f"--resume: the checkpoint in {out} is of another run ({state['config']})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, curve = state["step"], [list(r) for r in state["curve"]]
        seconds, train_seconds, tokens = state["seconds"], state["train_seconds"], state["tokens"]
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint(step: int) -> None:
        _save(out / CHECKPOINT, {"format": FORMAT, "config": cfg.to_dict(), "step": step, "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "curve": curve, "rng": torch.get_rng_state(),
                                 "seconds": seconds + (time.perf_counter() - t0), "train_seconds": train_seconds,
                                 "tokens": tokens, "params": params})

    _reset_peak(device)
    t0 = time.perf_counter()
    bar = records.progress_bar(total=cfg.steps, initial=start, enabled=progress, desc=f"{task.name} {cfg.attention}")
    model.train()
    final_eval = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(task.train_batch, start, cfg.batch, cfg.seed) if start < cfg.steps else None
        try:
            for step in range(start, cfg.steps):
                ts = time.perf_counter()
                b = nxt.result().to(device)
                if step + 1 < cfg.steps:
                    nxt = pool.submit(task.train_batch, step + 1, cfg.batch, cfg.seed)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg.steps, cfg.lr)
                loss_sum, hits, n = loss_and_hits(logits_of(model, b), b.y)
                loss = loss_sum / max(n, 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                train_seconds += time.perf_counter() - ts
                tokens += b.tokens
                row = [step + 1, float(loss.detach()), float("nan")]
                curve.append(row)  # before evaluating: a Ctrl-C from here on checkpoints this step
                done = step + 1
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    final_eval = evaluate(model, task, cfg.batch, device)
                    row[2] = final_eval[task.metric_names()[0]]
                bar.update(1, loss=row[1], acc=hits / max(n, 1), tok_s=tokens / max(train_seconds, 1e-9),
                           metric=row[2])
                if done % cfg.eval_every == 0 and done < cfg.steps:
                    checkpoint(done)
                if stop_after is not None and done >= stop_after and done < cfg.steps:
                    checkpoint(done)
                    raise Interrupted(done, out / CHECKPOINT)
        except KeyboardInterrupt:
            done = len(curve)
            checkpoint(done)
            raise Interrupted(done, out / CHECKPOINT) from None
        finally:
            bar.close()
    if final_eval is None:  # resumed a finished run
        final_eval = evaluate(model, task, cfg.batch, device)
    checkpoint(cfg.steps)
    seconds += time.perf_counter() - t0
    metrics = {
        "task": cfg.task, "attention": cfg.attention, "position": cfg.position, "params": params,
        "steps": cfg.steps, "seconds": round(seconds, 3), "eval": final_eval,
        "train_seconds": round(train_seconds, 3), "tokens_per_s": round(tokens / max(train_seconds, 1e-9), 1),
        "peak_memory_mib": _round(_peak_memory_mib(device)), "device": str(device), "seed": cfg.seed,
        "config": cfg.to_dict(), "final_train_loss": curve[-1][1] if curve else None,
    }
    records.write_run(out, metrics, curve, task)
    return metrics


def _round(x):
    return None if x is None else round(x, 1)


__all__ = ["train", "evaluate", "lr_at", "make_optimizer", "load_checkpoint", "resume_config", "Interrupted", "CHECKPOINT"]
