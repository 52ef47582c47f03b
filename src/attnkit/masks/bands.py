"""Positional bands: causal, sliding windows, prefix LM (see ``masks.base`` for conventions).

Legend: i = query position (key coordinates), j = key position.
"""

from __future__ import annotations

import torch

from .._validate import shape_str
from .base import Mask, _classify, _tile_bounds


class Band(Mask):
    """Keys at offset k - q in [lo, hi] (either end may be None = unbounded)."""

    translation_invariant = True

    def __init__(self, lo: int | None, hi: int | None, name: str):
        self.lo, self.hi, self.name = lo, hi, name

    @property
    def is_causal(self) -> bool:
        return self.hi is not None and self.hi <= 0

    @property
    def window(self) -> int | None:
        return None if self.lo is None else max(0, -self.lo)

    def __eq__(self, other) -> bool:
        return isinstance(other, Band) and (self.lo, self.hi) == (other.lo, other.hi)

    def __hash__(self) -> int:
        return hash((Band, self.lo, self.hi))

    def data_tensors(self):
        return ()

    def allows(self, b, h, q, k, *, num_keys=None):
        d = k - q
        out = torch.ones_like(d, dtype=torch.bool)
        if self.lo is not None:
            out = out & (d >= self.lo)
        if self.hi is not None:
            out = out & (d <= self.hi)
        return out

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        q0, q1, k0, k1 = _tile_bounds(nq, nk, block_q, block_k, device)
        dmin, dmax = k0 - q1, k1 - q0
        full = torch.ones_like(dmin, dtype=torch.bool)
        empty = torch.zeros_like(dmin, dtype=torch.bool)
        if self.lo is not None:
            full &= dmin >= self.lo
            empty |= dmax < self.lo
        if self.hi is not None:
            full &= dmax <= self.hi
            empty |= dmin > self.hi
        return _classify(full, empty)

    def __repr__(self):
        return self.name


def causal() -> Mask:
    """Query at position i attends keys j <= i (bottom-right aligned when Nq != Nk)."""
    return Band(None, 0, "causal()")


def sliding_window(left: int, right: int = 0) -> Mask:
    """Keys j with i - left <= j <= i + right. right=0 is a causal sliding window.

    Mistral-style window W (including the query itself) is ``sliding_window(W - 1)``.
    """
    for name, val in (("left", left), ("right", right)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"sliding_window: {name} must be an int >= 0, got {val!r}")
    return Band(-left, right, f"sliding_window({left}, {right})")


class PrefixLM(Mask):
    """Bidirectional over the first ``prefix_len`` keys, causal after (T5/UniLM prefix LM)."""

    def __init__(self, prefix_len):
        if isinstance(prefix_len, torch.Tensor):
            if prefix_len.dim() != 1 or prefix_len.dtype in (torch.bool,) or prefix_len.is_floating_point():
                raise ValueError(f"prefix_lm: prefix_len tensor must be 1-D integer (B,), got {prefix_len.dtype} {shape_str(prefix_len)}")
            if (prefix_len < 0).any():
                raise ValueError(f"prefix_lm: prefix_len must be >= 0, got {prefix_len.tolist()}")
            self.prefix = prefix_len.to(torch.int64)
        elif isinstance(prefix_len, int) and not isinstance(prefix_len, bool) and prefix_len >= 0:
            self.prefix = prefix_len
        else:
            raise ValueError(f"prefix_lm: prefix_len must be an int >= 0 or a (B,) int tensor, got {prefix_len!r}")

    @property
    def batch_size(self) -> int | None:
        return None if isinstance(self.prefix, int) else self.prefix.shape[0]

    def _prefix(self, b):
        if isinstance(self.prefix, int):
            return self.prefix
        return self.prefix.to(b.device)[b]

    def allows(self, b, h, q, k, *, num_keys=None):
        return (k <= q) | (k < self._prefix(b))

    def data_tensors(self):
        return (self.prefix,) if isinstance(self.prefix, torch.Tensor) else ()

    @property
    def device(self):
        return self.prefix.device if isinstance(self.prefix, torch.Tensor) else torch.device("cpu")

    def check(self, nq, nk, *, batch=1, heads=1):
        if isinstance(self.prefix, torch.Tensor) and self.prefix.shape[0] != batch:
            raise ValueError(f"prefix_lm: prefix_len has {self.prefix.shape[0]} entries, expected batch size B={batch}")

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        self.check(nq, nk, batch=batch, heads=heads)
        q0, q1, k0, k1 = _tile_bounds(nq, nk, block_q, block_k, device)
        if isinstance(self.prefix, int):
            p = self.prefix
        else:
            p = self.prefix.to(q0.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        full = (k1 <= q0) | (k1 < p)
        empty = (k0 > q1) & (k0 >= p)
        return _classify(full, empty)

    def __repr__(self):
        p = self.prefix if isinstance(self.prefix, int) else f"tensor{tuple(self.prefix.shape)}"
        return f"prefix_lm({p})"


def prefix_lm(prefix_len) -> Mask:
    return PrefixLM(prefix_len)


