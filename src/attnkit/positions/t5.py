"""T5 relative position buckets (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", JMLR).

Legend: B batch, H query heads, Nq queries, Nk keys, NB num_buckets; q, k are positions (q in key
coordinates), relative position r = k - q (memory position minus query position).

bias(h, q, k) = table[bucket(k - q), h], added to *unscaled* scores: T5 uses scale=1.0.

Buckets (Mesh TensorFlow / Hugging Face ``T5Attention._relative_position_bucket``):
- bidirectional: half the buckets for r <= 0, half (offset NB/2) for r > 0, on |r|;
  unidirectional (decoder): r > 0 all map to bucket 0, the rest on -r;
- within a half of size M: exact buckets for distances < M/2, then logarithmic bins up to
  ``max_distance``; everything farther shares the last bucket.
The logarithm is evaluated in float32 with the same operation order as transformers, so the
buckets equal theirs exactly (tested for every r in [-1000, 1000]).

The spec gathers from the (NB, H) table per (q, k) index tile, never building Nq x Nk except in
``to_dense``, through a lookup table of the 4 max_distance + 1 relative offsets (or, when
max_distance > LUT_LIMIT / 2, the bucket formula per score, so memory never grows with it);
``tensors()`` returns the table so tiled backends route its gradient.
Cost: O(1) memory per score; table O(NB * H).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..biases import Bias


def _check_bucket_args(bidirectional: bool, num_buckets: int, max_distance: int) -> None:
    if not isinstance(num_buckets, int) or num_buckets < (4 if bidirectional else 2) or (bidirectional and num_buckets % 2):
        raise ValueError(
            f"num_buckets must be an int >= {4 if bidirectional else 2}"
            f"{' and even (bidirectional)' if bidirectional else ''}, got {num_buckets!r}"
        )
    half = num_buckets // 2 if bidirectional else num_buckets
    if not isinstance(max_distance, int) or max_distance <= half // 2:
        raise ValueError(f"max_distance must be an int > {half // 2} (the exact-bucket range), got {max_distance!r}")


def t5_relative_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                       max_distance: int = 128) -> torch.Tensor:
    """Bucket index in [0, num_buckets) of each relative position r = key - query (int64, same shape)."""
    if not isinstance(relative_position, torch.Tensor) or relative_position.is_floating_point() \
            or relative_position.dtype == torch.bool:
        raise TypeError("relative_position must be an integer tensor (key position - query position)")
    _check_bucket_args(bidirectional, num_buckets, max_distance)
    r = relative_position.to(torch.int64)
    buckets = torch.zeros_like(r)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (r > 0).to(torch.int64) * num_buckets
        r = r.abs()
    else:
        r = -torch.clamp(r, max=0)
    max_exact = num_buckets // 2
    is_small = r < max_exact
    # Same float32 operation order as transformers; the clamp only avoids log(0) where is_small is used.
    large = max_exact + (
        torch.log(r.clamp(min=max_exact).float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.int64)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, r, large)


# Largest c = 2 * max_distance served by a lookup table of relative offsets (2c + 1 entries): beyond
# it (T5's max_distance is 128) buckets are computed per score from the formula, so the memory does
# not grow with max_distance (a 4-million-entry table for max_distance=10**6 and 8 tokens).
LUT_LIMIT = 4096


class T5Bias(Bias):
    """Bias spec: ``bias(b, h, q, k) = table[bucket(k - q), h]`` with ``table`` (num_buckets, H).

    Usually obtained from ``T5RelativeBias.spec()``; a plain tensor table works too.
    """

    def __init__(self, table: torch.Tensor, *, bidirectional: bool = True, max_distance: int = 128):
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or not table.is_floating_point():
            got = f"{table.dtype} {tuple(table.shape)}" if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(f"T5Bias: table must be a float tensor (num_buckets, num_heads), got {got}")
        _check_bucket_args(bidirectional, table.shape[0], max_distance)
        self.table, self.bidirectional, self.max_distance = table, bool(bidirectional), max_distance
        self._luts: dict[torch.device, torch.Tensor] = {}

    @property
    def num_buckets(self) -> int:
        return self.table.shape[0]

    @property
    def num_heads(self) -> int:
        return self.table.shape[1]

    @property
    def device(self) -> torch.device:
        return self.table.device

    def check(self, nq: int, nk: int, *, batch: int = 1, heads: int = 1) -> None:
        if heads != self.num_heads:
            raise ValueError(f"T5Bias table has {self.num_heads} heads but the input has Hq={heads} query heads")

    def _lut(self, device) -> tuple[torch.Tensor, int]:
        """Buckets of r in [-c, c], c = 2 * max_distance (int64 (2c + 1,)), cached per device.

        Every |r| >= max_distance + 1 is in the last bucket of its half (the float32 logarithm's
        value exceeds the last bucket by a relative margin >> float32 rounding for |r| >= 2 *
        max_distance), so clamping r to [-c, c] gives exactly ``t5_relative_bucket(r)``.
        """
        c = 2 * self.max_distance
        lut = self._luts.get(device)
        if lut is None:
            lut = t5_relative_bucket(torch.arange(-c, c + 1, device=device), self.bidirectional, self.num_buckets,
                                     self.max_distance)
            self._luts[device] = lut
        return lut, c

    def __call__(self, b, h, q, k) -> torch.Tensor:
        if h.device.type == "cpu" and h.numel() and int(h.max()) >= self.num_heads:
            raise ValueError(f"T5Bias table has {self.num_heads} heads but was asked for head {int(h.max())}")
        table = self._table(q.device)
        if 2 * self.max_distance > LUT_LIMIT:  # a lookup table would outgrow any input: bucket directly
            return table[t5_relative_bucket(k - q, self.bidirectional, self.num_buckets, self.max_distance), h]
        lut, c = self._lut(q.device)
        per_offset = table[lut]  # (2c + 1, H): the bias of each clamped relative position
        idx = ((k + c) - q).clamp_(0, 2 * c)  # r = k - q, shifted to [0, 2c] (k + c is small)
        return per_offset[idx, h]  # broadcast of (q, k) and h shapes

    translation_invariant = True

    def _table(self, device) -> torch.Tensor:
        """The table on ``device`` in at least float32, so that a half-precision table's gradient
        (a sum over every query-key pair of a bucket) accumulates in float32 and is rounded once."""
        return self.table.to(device=device, dtype=torch.promote_types(self.table.dtype, torch.float32))

    def relative(self, h, r) -> torch.Tensor:
        """table[bucket(r), h] for offsets r = k - q (what ``__call__`` gives for k - q = r)."""
        lut, c = self._lut(r.device)
        table = self._table(r.device)
        return table[lut[(r + c).clamp(0, 2 * c)], h]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.table,)

    def __repr__(self) -> str:
        return (f"T5Bias(heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional})")


class T5RelativeBias(nn.Module):
    """T5's learned relative position bias: a (num_buckets, num_heads) table.

    Args:
        num_heads: H. num_buckets, max_distance: as in T5 (32, 128).
        bidirectional: True for encoders, False for decoders (causal self-attention).
        init_std: the table is initialised N(0, init_std^2).

    The table is ``weight`` (same layout as ``T5Attention.relative_attention_bias.weight``, so
    ``mod.weight.data.copy_(hf.relative_attention_bias.weight)`` ports a checkpoint).

    Usage::

        t5 = T5RelativeBias(8)
        out = attnkit.attention(q, k, v, bias=t5.spec(), scale=1.0)   # T5 does not scale q.k
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True,
                 *, init_std: float = 0.02):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"T5RelativeBias: num_heads must be an int > 0, got {num_heads!r}")
        _check_bucket_args(bidirectional, num_buckets, max_distance)
        self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
        self.bidirectional = bool(bidirectional)
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))  # (NB, H)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def spec(self) -> T5Bias:
        """The bias spec reading this module's table (gradients flow into ``weight``)."""
        return T5Bias(self.weight, bidirectional=self.bidirectional, max_distance=self.max_distance)

    def forward(self) -> T5Bias:
        return self.spec()

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")


def show_t5(num_heads: int = 8, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True,
            seed: int = 0) -> T5Bias:
    """A T5 bias spec to draw (``attnkit show "t5(8)"``): a seeded N(0, 1) table, no gradient,
    so the heat map shows the bucket structure (exact near the diagonal, log-spaced bands beyond)."""
    g = torch.Generator().manual_seed(seed)
    _check_bucket_args(bidirectional, num_buckets, max_distance)
    table = torch.randn(num_buckets, num_heads, generator=g)  # (NB, H)
    return T5Bias(table, bidirectional=bidirectional, max_distance=max_distance)


__all__ = ["t5_relative_bucket", "T5Bias", "T5RelativeBias", "show_t5"]
