"""Position schemes of ``MultiHeadAttention``: small frozen specs and the modules they build.

Legend: B batch, H query heads, Hk key/value heads, Nq queries, Nk keys, D head dim.

| spec                                  | what it does                                   | needs                      |
|---------------------------------------|------------------------------------------------|----------------------------|
| Rope(base, interleaved, rotary_dim)   | rotates q and k at absolute positions           | a dot-product variant      |
| Alibi()                               | bias spec -slope_h |i - j| on the scores       | a variant that forms scores |
| T5(num_buckets, max_distance, bidirectional) | learned bias per (head, log-bucket of j - i) | scores                 |
| Shaw(max_distance)                    | relative key/value embeddings, its own kernel   | scores                     |
| XL(mem_len)                           | Transformer-XL u, v biases, segment memory, own kernel | scores, causal      |

A spec states what it needs from the attention variant (``needs_scores``, ``needs_dot_product``,
``needs_causal``; the variant's ``position_reason`` reads them) and builds a module with one
interface: ``rotate(q, k, q_offset=, k_offset=)``, ``bias(nq=, nk=)`` (a bias spec or None), and,
for schemes with their own kernel (``computes_attention``), ``attend(...)`` in the core protocol
(``attnkit.variants.base``). XL owns the layer's cache (``owns_cache``: a ``SegmentMemory``).
Bias specs are evaluated from positions in key coordinates, so a cache needs no offset for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..caches import SegmentMemory
from ..positions.alibi import ALiBi
from ..positions.rope import RotaryEmbedding
from ..positions.shaw import ShawRelativePosition
from ..positions.t5 import T5RelativeBias
from ..positions.xl import XLRelativePosition
from ..variants.base import check_bool, opt_pos_float, pos_int


class PositionSpec:
    """Base of the position specs. Defaults: a scheme that adds nothing and needs nothing."""

    needs_scores = False
    needs_dot_product = False
    needs_causal = False
    owns_cache = False
    own_kernel = False  # computes its own attention (no dropout, softcap or named backend)

    def build(self, *, num_heads: int, head_dim: int, attention) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build()")


class _Position(nn.Module):
    """Identity position module: no rotation, no bias, attention by the variant's core."""

    computes_attention = False

    def rotate(self, q, k, *, q_offset, k_offset):
        """Offsets: an int (positions offset + i) or an int tensor (N,) of positions."""
        return q, k

    def bias(self, *, nq: int, nk: int):
        return None


@dataclass(frozen=True)
class Rope(PositionSpec):
    """Rotary embedding (Su et al. 2021) on q and k; base theta, interleaved pairs (Meta LLaMA,
    GPT-J) or half-split (GPT-NeoX, HF), rotary_dim channels (default all of D). O(N D)."""

    base: float = 10000.0
    interleaved: bool = False
    rotary_dim: int | None = None

    needs_dot_product = True

    def __post_init__(self):
        opt_pos_float("Rope", "base", self.base)
        check_bool("Rope", "interleaved", self.interleaved)
        if self.rotary_dim is not None:
            pos_int("Rope", "rotary_dim", self.rotary_dim, 2)
            if self.rotary_dim % 2:
                raise ValueError(f"Rope: rotary_dim must be even, got {self.rotary_dim}")

    def build(self, *, num_heads, head_dim, attention):
        return RopePosition(self, head_dim)


class RopePosition(_Position):
    def __init__(self, spec: Rope, head_dim: int):
        super().__init__()
        if spec.rotary_dim is not None and spec.rotary_dim > head_dim:
            raise ValueError(f"Rope(rotary_dim={spec.rotary_dim}) exceeds the head dim {head_dim}")
        if head_dim % 2:
            raise ValueError(f"Rope needs an even head dim, got {head_dim}")
        self.rope = RotaryEmbedding(head_dim, base=spec.base, interleaved=spec.interleaved, rotary_dim=spec.rotary_dim)

    def rotate(self, q, k, *, q_offset, k_offset):
        """q (B, H, Nq, D) at positions q_offset + i; k (B, Hk, Nk, D) at k_offset + j; an offset
        may instead be an int tensor (N,) of positions (a context-parallel shard's)."""
        at = lambda x, o: self.rope.rotate(x, o) if isinstance(o, torch.Tensor) else self.rope.rotate(x, offset=o)
        return at(q, q_offset), at(k, k_offset)


@dataclass(frozen=True)
class Alibi(PositionSpec):
    """ALiBi (Press et al. 2022): -slope_h * |i - j| added to the scores; slopes from the paper."""

    needs_scores = True

    def build(self, *, num_heads, head_dim, attention):
        return BiasPosition(ALiBi(num_heads, symmetric=not attention.causal))


class BiasPosition(_Position):
    """A position scheme that is a bias spec on the scores (ALiBi)."""

    def __init__(self, spec):
        super().__init__()
        self._bias = spec

    def bias(self, *, nq: int, nk: int):
        return self._bias


@dataclass(frozen=True)
class T5(PositionSpec):
    """T5 relative bias (Raffel et al. 2020): a learned scalar per (head, log-bucket of j - i).

    bidirectional=None: True unless the attention variant is causal.
    """

    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool | None = None

    needs_scores = True

    def __post_init__(self):
        pos_int("T5", "num_buckets", self.num_buckets, 2)
        pos_int("T5", "max_distance", self.max_distance)
        if self.bidirectional is not None:
            check_bool("T5", "bidirectional", self.bidirectional)

    def build(self, *, num_heads, head_dim, attention):
        bidir = (not attention.causal) if self.bidirectional is None else self.bidirectional
        return T5Position(T5RelativeBias(num_heads, self.num_buckets, self.max_distance, bidir))


class T5Position(_Position):
    def __init__(self, t5: T5RelativeBias):
        super().__init__()
        self.t5 = t5

    def bias(self, *, nq: int, nk: int):
        return self.t5.spec()


@dataclass(frozen=True)
class Shaw(PositionSpec):
    """Shaw et al. 2018 relative key and value embeddings, offsets clipped to +-max_distance."""

    max_distance: int = 16

    needs_scores = True
    own_kernel = True

    def __post_init__(self):
        pos_int("Shaw", "max_distance", self.max_distance)

    def build(self, *, num_heads, head_dim, attention):
        return OwnKernelPosition(ShawRelativePosition(head_dim, self.max_distance), attention.scale)


@dataclass(frozen=True)
class XL(PositionSpec):
    """Transformer-XL (Dai et al. 2019): sinusoidal relative positions with u, v biases and a
    segment memory of the last mem_len inputs (no gradient into the memory)."""

    mem_len: int = 0

    needs_scores = True
    needs_causal = True
    owns_cache = True
    own_kernel = True

    def __post_init__(self):
        pos_int("XL", "mem_len", self.mem_len, 0)

    def build(self, *, num_heads, head_dim, attention):
        return OwnKernelPosition(XLRelativePosition(num_heads, head_dim, mem_len=self.mem_len), attention.scale)

    def make_cache(self, **_) -> SegmentMemory:
        return SegmentMemory(self.mem_len)

    def check_cache(self, cache) -> None:
        if not isinstance(cache, SegmentMemory):
            raise TypeError(f"position=XL decodes with a SegmentMemory, got {type(cache).__name__}")


class OwnKernelPosition(_Position):
    """A scheme that computes the attention itself (Shaw, Transformer-XL) on the heads."""

    computes_attention = True

    def __init__(self, kernel: nn.Module, scale):
        super().__init__()
        self.kernel, self.scale = kernel, scale

    def attend(self, q, k, v, *, mask, bias, dropout_p, need_weights, cache, query_valid=None):
        return self.kernel(q, k, v, mask=mask, scale=self.scale), None


POSITIONS = (Rope, Alibi, T5, Shaw, XL)

__all__ = ["PositionSpec", "Rope", "Alibi", "T5", "Shaw", "XL", "POSITIONS"]
