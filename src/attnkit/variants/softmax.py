"""Exact softmax attention as a module variant: ``attnkit.attention`` with a spec's options.

Legend: B batch, H query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, W window.

The function, backends and dispatch live in ``attnkit.functional`` / ``attnkit.backends``; this
file holds the spec (its mask, backend, softcap, scale) and the core that calls it. Decoding:
exact for causal masks (a KVCache; a SlidingWindowCache of W keys when the mask reaches at most
W keys back and depends only on k - q).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..functional import attention
from ..masks import Mask
from .base import MaskedVariant, check_mask_spec, opt_pos_float


@dataclass(frozen=True)
class Softmax(MaskedVariant):
    """Exact softmax attention through ``attnkit.attention`` (any mask spec, GQA, softcap).

    mask: a spec from ``attnkit.masks`` applied on every call (e.g. ``causal()``,
    ``sliding_window(127)``); per-call masks passed to forward are combined with it by ``&``.
    backend: "auto" or a backend name. softcap: Gemma-2 score cap. scale: default 1/sqrt(D).
    Cost O(Nq Nk D) time; memory depends on the backend (O(N D) for blockwise and sdpa's flash path).
    """

    mask: Mask | None = None
    backend: str = "auto"
    softcap: float | None = None
    scale: float | None = None

    name = "softmax"
    attention_dropout = True
    returns_weights = True
    takes_bias = True
    forms_scores = True

    def __post_init__(self):
        check_mask_spec("Softmax", self.mask)
        if not isinstance(self.backend, str):
            raise TypeError(f"Softmax: backend must be a str, got {type(self.backend).__name__}")
        opt_pos_float("Softmax", "softcap", self.softcap)
        opt_pos_float("Softmax", "scale", self.scale)

    def position_reason(self, position) -> str | None:
        reason = super().position_reason(position)
        if reason is None and position is not None and position.own_kernel:
            p = type(position).__name__
            if self.softcap is not None:
                return f"position={p}() computes its own scores and has no softcap"
            if self.backend not in ("auto", "reference"):
                return f"position={p}() runs its own kernel; backend={self.backend!r} cannot be honoured (use 'auto')"
        return reason

    def context_parallel_reason(self) -> str | None:
        return None

    def build_core(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return SoftmaxCore(self)


class SoftmaxCore(nn.Module):
    """``attnkit.attention`` with the spec's backend, scale and softcap. Cost O(Nq Nk D)."""

    def __init__(self, spec: Softmax):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, *, mask, bias, dropout_p, need_weights, cache, query_valid=None,
                context_parallel=None):
        s = self.spec
        if context_parallel is not None:  # q, k, v are shards of a sequence: ring attention over the group
            return context_parallel.attention(q, k, v, mask=mask, bias=bias, scale=s.scale, softcap=s.softcap), None
        res = attention(q, k, v, mask=mask, bias=bias, scale=s.scale, softcap=s.softcap, dropout_p=dropout_p,
                        backend=s.backend, return_weights=need_weights)
        return res if need_weights else (res, None)


__all__ = ["Softmax", "SoftmaxCore"]
