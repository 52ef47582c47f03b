"""Position schemes inside MultiHeadAttention: thin adapters over ``attnkit.positions``.

Legend: B batch, H query heads, Hk key/value heads, Nq queries, Nk keys, D head dim.

- Rope: rotates q and k at absolute positions (the cache's length is the offset).
- Alibi, T5: bias specs handed to ``attnkit.attention`` (evaluated from positions in key
  coordinates, so a cache needs no offset: the bottom-right alignment supplies it).
- Shaw, XL: compute their own attention (``shaw_attention``, ``xl_attention``) on the heads.
"""

from __future__ import annotations

from torch import nn

from ._cores import _no_bias, _no_weights, require
from .specs import T5, XL, Alibi, Rope, Shaw, Softmax


class _Position(nn.Module):
    computes_attention = False

    def bias(self, *, nq: int, nk: int):
        return None


class RopePosition(_Position):
    def __init__(self, spec: Rope, head_dim: int):
        super().__init__()
        if spec.rotary_dim is not None and spec.rotary_dim > head_dim:
            raise ValueError(f"Rope(rotary_dim={spec.rotary_dim}) exceeds the head dim {head_dim}")
        if head_dim % 2:
            raise ValueError(f"Rope needs an even head dim, got {head_dim}")
        self.rope = require("positions.rope").RotaryEmbedding(head_dim, base=spec.base, interleaved=spec.interleaved,
                                                              rotary_dim=spec.rotary_dim)

    def rotate(self, q, k, *, q_offset: int, k_offset: int):
        """q (B, H, Nq, D) at positions q_offset + i; k (B, Hk, Nk, D) at k_offset + j."""
        return self.rope.rotate(q, offset=q_offset), self.rope.rotate(k, offset=k_offset)


class AlibiPosition(_Position):
    def __init__(self, spec: Alibi, num_heads: int, causal: bool):
        super().__init__()
        self._bias = require("positions.alibi").ALiBi(num_heads, symmetric=not causal)

    def bias(self, *, nq: int, nk: int):
        return self._bias


class T5Position(_Position):
    def __init__(self, spec: T5, num_heads: int, causal: bool):
        super().__init__()
        bidir = (not causal) if spec.bidirectional is None else spec.bidirectional
        self.t5 = require("positions.t5").T5RelativeBias(num_heads, spec.num_buckets, spec.max_distance, bidir)

    def bias(self, *, nq: int, nk: int):
        return self.t5.spec()


class ShawPosition(_Position):
    computes_attention = True

    def __init__(self, spec: Shaw, head_dim: int, scale):
        super().__init__()
        self.shaw = require("positions.shaw").ShawRelativePosition(head_dim, spec.max_distance)
        self.scale = scale

    def attend(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        _no_weights("Shaw-position", need_weights)
        _no_bias("Shaw-position", bias)
        return self.shaw(q, k, v, mask=masking.combined(), scale=self.scale), None


class XLPosition(_Position):
    computes_attention = True

    def __init__(self, spec: XL, num_heads: int, head_dim: int, scale):
        super().__init__()
        self.xl = require("positions.xl").XLRelativePosition(num_heads, head_dim, mem_len=spec.mem_len)
        self.scale = scale

    def attend(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        _no_weights("XL-position", need_weights)
        _no_bias("XL-position", bias)
        return self.xl(q, k, v, mask=masking.combined(), scale=self.scale), None


def build_position(spec, attention, *, num_heads: int, head_dim: int, embed_dim: int, device=None, dtype=None):
    if spec is None:
        return None
    causal = bool(getattr(attention, "causal", False))
    if isinstance(spec, (Shaw, XL)) and isinstance(attention, Softmax):
        if attention.softcap is not None:
            raise ValueError(f"position={type(spec).__name__}() computes its own scores and has no softcap")
        if attention.backend not in ("auto", "reference"):
            raise ValueError(f"position={type(spec).__name__}() runs its own kernel; backend={attention.backend!r} "
                             "cannot be honoured (use backend='auto')")
    if isinstance(spec, Rope):
        mod = RopePosition(spec, head_dim)
    elif isinstance(spec, Alibi):
        mod = AlibiPosition(spec, num_heads, causal)
    elif isinstance(spec, T5):
        mod = T5Position(spec, num_heads, causal)
    elif isinstance(spec, Shaw):
        mod = ShawPosition(spec, head_dim, attention.scale)
    elif isinstance(spec, XL):
        mod = XLPosition(spec, num_heads, head_dim, attention.scale)
    else:
        raise TypeError(f"unknown position spec {spec!r}")
    return mod.to(device=device, dtype=dtype)


__all__ = ["build_position"]
