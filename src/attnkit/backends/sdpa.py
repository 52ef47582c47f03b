"""The sdpa backend: torch.nn.functional.scaled_dot_product_attention.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim.

Used only where it gives the reference's result: no softcap, no weights, no dropout (torch's
dropout pattern cannot be reproduced by the other backends), and never a fully masked row
(torch would return NaN or uniform weights there; the reference returns zeros). Masks are
handed over as torch's is_causal when that means the same (plain causal with Nq == Nk),
otherwise materialised as a (B, Hq, Nq, Nk) bool or float tensor: it costs Nq * Nk memory and
skips no work, which is why ``auto`` prefers blockwise for structured sparse masks.

Biases are added in float32 for half/bfloat16 inputs, like the reference: torch needs the float
attn_mask in the input dtype, so when the bias (computed in float32) is not exactly representable
in that dtype, q, k, v are upcast to float32 for the call and the output is cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._numerics import compute_dtype
from .base import AttentionCall, Backend

# Above this many mask/bias elements we refuse to materialise a mask for sdpa (4 GiB of float32).
MAX_DENSE_ELEMENTS = 1 << 30


class SdpaBackend(Backend):
    name = "sdpa"

    def static_reasons(self, call: AttentionCall) -> list[str]:
        B, Hq, Hk, Nq, Nk, D = call.shape
        reasons = []
        if call.return_weights:
            reasons.append("sdpa does not return attention weights")
        if call.softcap is not None:
            reasons.append("sdpa has no softcap")
        if call.dropout_p > 0:
            reasons.append("sdpa's dropout pattern is not reproducible by the other backends (seeded dropout)")
        dense_needed = (call.mask is not None and not call.plain_causal) or call.bias is not None
        if dense_needed and B * Hq * Nq * Nk > MAX_DENSE_ELEMENTS:
            reasons.append(f"the mask/bias would be materialised as {B}x{Hq}x{Nq}x{Nk} elements (> 2^30)")
        return reasons

    def data_reasons(self, call: AttentionCall) -> list[str]:
        if call.mask is not None and not call.plain_causal and not bool(call.dense_mask().any(dim=-1).all()):
            return ["the mask has fully masked query rows, which sdpa turns into NaN/uniform weights"]
        if call.bias is not None and bool(torch.isinf(call.dense_bias()).any()):
            return ["the bias has infinite entries (rows could be fully masked); pass a bool mask instead"]
        return []

    def run(self, call: AttentionCall):
        B, Hq, Hk, Nq, Nk, D = call.shape
        is_causal = call.plain_causal
        attn_mask = None
        if call.mask is not None and not is_causal:
            attn_mask = call.dense_mask()  # bool, True = attend
        q, k, v = call.q, call.k, call.v
        if call.bias is not None:
            ct = compute_dtype(q.dtype)
            bias = call.dense_bias()
            if ct != q.dtype:
                if bool((bias.detach().to(q.dtype).to(ct) == bias.detach()).all()):
                    bias = bias.to(q.dtype)  # exact in the input dtype: no need to upcast
                else:  # rounding the bias would change the scores: compute in float32
                    q, k, v = q.to(ct), k.to(ct), v.to(ct)
            if is_causal:
                attn_mask, is_causal = call.mask.to_dense(Nq, Nk, device=call.q.device), False
            if attn_mask is not None:
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            attn_mask = bias
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=call.scale, enable_gqa=Hq != Hk,
        )  # (B, Hq, Nq, Dv)
        return out.to(call.q.dtype)
