"""Selective copying (Mamba, Gu & Dao 2023): copy the non-noise tokens, in order.

Legend: B batch, L seq_len (the region), K num_tokens, V vocab (0 = noise, 1 = separator).

A region of L positions holds K data tokens (from [2, V)) at random positions, noise (0)
elsewhere; then the separator and the K tokens in order. The causal model is trained to predict
each of the K tokens after the separator (teacher forcing), so it must find the i-th data token
of the region by content, not by a fixed offset. Accuracy: per copied token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import IGNORE, Batch, Defaults, GeneratedTask, pos_int

NOISE, SEP = 0, 1


def selective_copy_batch(b: int, *, vocab: int, seq_len: int, num_tokens: int,
                         g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, L + K) tokens and y (b, L + K) targets (the data tokens after the separator)."""
    L, K = seq_len, num_tokens
    data = torch.randint(2, vocab, (b, K), generator=g)                    # (b, K)
    where = torch.rand(b, L, generator=g).argsort(dim=1)[:, :K].sort(dim=1).values  # (b, K) increasing
    region = torch.full((b, L), NOISE, dtype=torch.long).scatter_(1, where, data)
    seq = torch.cat([region, torch.full((b, 1), SEP, dtype=torch.long), data], dim=1)  # (b, L + 1 + K)
    x, y = seq[:, :-1], seq[:, 1:].clone()                                 # (b, L + K)
    y[:, :L] = IGNORE                                                       # loss only on the copy
    return x, y


@dataclass(frozen=True)
class SelectiveCopy(GeneratedTask):
    """vocab V (>= 3), seq_len L of the region, num_tokens K <= L to copy, num_eval test size."""

    vocab: int = 16
    seq_len: int = 64
    num_tokens: int = 8
    num_eval: int = 1000

    name = "selective_copy"
    kind = "lm"
    metric = "accuracy"
    defaults = Defaults(layers=2, dim=64, heads=4, steps=1000, batch=64, lr=3e-3, position="learned", eval_every=100)

    def __post_init__(self):
        for f in ("seq_len", "num_tokens", "num_eval"):
            pos_int("selective_copy", f, getattr(self, f))
        pos_int("selective_copy", "vocab", self.vocab, 3)
        if self.num_tokens > self.seq_len:
            raise ValueError(f"selective_copy: num_tokens={self.num_tokens} must be <= seq_len={self.seq_len}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def max_len(self) -> int:
        return self.seq_len + self.num_tokens

    def _batch(self, b: int, g: torch.Generator) -> Batch:
        x, y = selective_copy_batch(b, vocab=self.vocab, seq_len=self.seq_len, num_tokens=self.num_tokens, g=g)
        return Batch(x, y)


__all__ = ["SelectiveCopy", "selective_copy_batch", "NOISE", "SEP"]
