"""What a learning task gives the training loop: seeded batches, a fixed evaluation set, defaults.

Legend: B batch, N tokens, V vocab size, C classes.

A task is a small frozen dataclass holding its own parameters (``mqar:num_kv_pairs=16`` sets a
field). ``kind`` says which model it trains: ``"lm"`` (a causal ``DecoderLM``; targets (B, N)
with -100 where no loss is taken) or ``"classify"`` (a ``SequenceClassifier``; targets (B,)).
``metric`` is ``"accuracy"`` (over the targets that count) or ``"val_loss"`` (nats per token).
Training batch ``step`` is a pure function of (seed, step): a resumed run sees the same data.
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

IGNORE = -100  # target value that takes no loss (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Batch:
    """x (B, N) int64 tokens; y (B, N) targets with IGNORE (lm) or (B,) classes (classify);
    padding_mask (B, N) bool, True = padding (classify); group: the metric suffix ('' or a length)."""

    x: torch.Tensor
    y: torch.Tensor
    padding_mask: torch.Tensor | None = None
    group: str = ""

    def to(self, device) -> Batch:
        pm = None if self.padding_mask is None else self.padding_mask.to(device)
        return Batch(self.x.to(device), self.y.to(device), pm, self.group)

    @property
    def tokens(self) -> int:
        return self.x.numel()


@dataclass(frozen=True)
class Defaults:
    """Training hyper-parameters a task chooses for a meaningful result in minutes on 2 CPU cores."""

    layers: int = 2
    dim: int = 64
    heads: int = 4
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-3
    position: str = "learned"
    eval_every: int = 100


class Task(abc.ABC):
    """Base of the tasks (mixed into frozen dataclasses). A task states its vocabulary, its longest
    sequence, and gives seeded training batches and a fixed evaluation set."""

    name: ClassVar[str] = "?"
    kind: ClassVar[str] = "lm"
    metric: ClassVar[str] = "accuracy"
    defaults: ClassVar[Defaults] = Defaults()
    num_classes: ClassVar[int | None] = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Token ids are in [0, vocab_size)."""

    @property
    @abc.abstractmethod
    def max_len(self) -> int:
        """The longest sequence the model sees (training or evaluation)."""

    @abc.abstractmethod
    def train_batch(self, step: int, batch: int, seed: int) -> Batch:
        """Training batch ``step`` of run ``seed`` (the same for the same arguments)."""

    @abc.abstractmethod
    def eval_batches(self, batch: int) -> list[Batch]:
        """The fixed evaluation set, in batches of at most ``batch``."""

    def metric_names(self) -> list[str]:
        """The keys of ``metrics.json``'s ``eval`` (the first is the one curves and plots show)."""
        return [self.metric]


class GeneratedTask(Task):
    """A task drawn from a seeded generator ``_batch(b, g)`` (mqar, selective_copy): training
    batch ``step`` of run ``seed`` from its own generator, the test set of ``num_eval`` sequences
    from a fixed one."""

    num_eval: int  # a dataclass field of the subclass

    @abc.abstractmethod
    def _batch(self, b: int, g: torch.Generator) -> Batch:
        """b sequences drawn with generator g."""

    def train_batch(self, step: int, batch: int, seed: int) -> Batch:
        return self._batch(batch, torch_gen(seed, step))

    @cached_property
    def _eval(self) -> Batch:
        return self._batch(self.num_eval, torch_gen(0, 0, EVAL_SALT))

    def eval_batches(self, batch: int) -> list[Batch]:
        e = self._eval
        return [Batch(e.x[i:i + batch], e.y[i:i + batch]) for i in range(0, self.num_eval, batch)]


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 63-bit seed for training batch ``step`` of run ``seed`` (evaluation uses salt != 0)."""
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729 + 12_345) % (2**63 - 1)


def torch_gen(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, salt))


def py_rng(seed: int, step: int, salt: int = 0) -> random.Random:
    return random.Random(step_seed(seed, step, salt))


def pos_int(task: str, name: str, val, minimum: int = 1) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"{task}: {name} must be an int >= {minimum}, got {val!r}")


EVAL_SALT = 1  # evaluation sets come from seeds no training step uses


__all__ = ["Task", "GeneratedTask", "Batch", "Defaults", "IGNORE", "step_seed", "torch_gen", "py_rng", "pos_int", "EVAL_SALT"]
