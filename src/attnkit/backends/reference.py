"""The reference backend: materialise the scores, in any dtype. It is the spec.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.

s = softcap(scale * q.k^T) + bias; blocked pairs get -inf; softmax over keys; rows with no
allowed key give zero weights (so zero output and zero gradient, never NaN); dropout from the
counter-based hash of (seed, b, h, i, j) so every backend can reproduce it. Half and bfloat16
inputs are computed in float32 and cast back. Cost O(B * Hq * Nq * Nk) memory.
"""

from __future__ import annotations

import torch

from .._hash import dropout_keep
from .._numerics import compute_dtype, expand_kv, safe_softmax
from ..masks import index_grid
from .base import AttentionCall, Backend


def attention_weights(call: AttentionCall) -> torch.Tensor:
    """Post-softmax weights (B, Hq, Nq, Nk) in the compute dtype, before dropout."""
    B, Hq, Hk, Nq, Nk, D = call.shape
    ct = compute_dtype(call.q.dtype)
    q = call.q.to(ct)
    k = expand_kv(call.k.to(ct), Hq // Hk)
    s = torch.matmul(q, k.transpose(-1, -2)) * call.scale  # (B, Hq, Nq, Nk)
    if call.softcap is not None:
        s = call.softcap * torch.tanh(s / call.softcap)
    if call.bias is not None:
        s = s + call.dense_bias()
    return safe_softmax(s, None if call.mask is None else ~call.dense_mask())


def apply_dropout(w: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    if call.dropout_p == 0.0:
        return w
    B, Hq, Nq, Nk = w.shape
    b, h, q, k = index_grid(B, Hq, Nq, Nk, w.device)
    keep = dropout_keep(call.dropout_seed, call.dropout_p, b, h, q, k)
    return w * keep / (1.0 - call.dropout_p)


class ReferenceBackend(Backend):
    name = "reference"

    def static_reasons(self, call: AttentionCall) -> list[str]:
        return []

    def run(self, call: AttentionCall):
        B, Hq, Hk, Nq, Nk, D = call.shape
        ct = compute_dtype(call.q.dtype)
        w = apply_dropout(attention_weights(call), call)
        out = torch.matmul(w, expand_kv(call.v.to(ct), Hq // Hk))  # (B, Hq, Nq, Dv)
        out = out.to(call.q.dtype)
        return (out, w.to(call.q.dtype)) if call.return_weights else out
