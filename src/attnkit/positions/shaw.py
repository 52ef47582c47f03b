"""Relative key and value embeddings (Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with
Relative Position Representations", NAACL, arXiv:1803.02155).

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, C query chunk,
D head dim, Dv value head dim, K max_distance, R = 2K + 1 clipped offsets.

With i the query position (key coordinates: row i sits at i + Nk - Nq) and
idx(i, j) = clip(j - i, -K, K) + K:

    e_ij  = scale * (q_i . k_j + q_i . aK[idx(i, j)])        (same scale for both terms)
    w_ij  = softmax_j(e_ij)  over allowed keys
    out_i = sum_j w_ij (v_j + aV[idx(i, j)])

No (N, N, D) tensor: queries are projected onto the R key embeddings once per chunk
(q @ aK^T: (B, Hq, C, R)) and gathered per (i, j); for the values the weights are summed per
clipped offset (scatter-add of w over idx: (B, Hq, C, R)) and multiplied by aV.
Queries are processed in chunks of C rows, each over the span of keys its rows may attend
(from the mask spec's tile map: causal is about half the work of dense, a sliding window of W
is O(Nq * W)), so peak memory is O(B * Hq * C * Nk); with gradients
each chunk is checkpointed (recomputed in backward), which keeps training memory at the same
bound for one extra forward. Time O(B * Hq * Nq * Nk * D).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import (
    ChunkedMask,
    check_chunk,
    check_param,
    check_qkv,
    check_scale,
    compute_dtype,
    expand_kv,
    masked_softmax,
    run_chunks,
)


def shaw_indices(q_pos: torch.Tensor, k_pos: torch.Tensor, max_distance: int) -> torch.Tensor:
    """idx = clip(k - q, -K, K) + K for broadcastable int64 positions (values in [0, 2K])."""
    return (k_pos - q_pos).clamp(-max_distance, max_distance) + max_distance


def shaw_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor,
                   rel_v: torch.Tensor | None = None, *, mask=None, scale: float | None = None,
                   chunk_size: int = 128, checkpoint: bool | None = None) -> torch.Tensor:
    """Softmax attention with Shaw et al.'s clipped relative key (and value) embeddings.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv); Hq % Hk == 0 (GQA).
        rel_k: (2K + 1, D) key embeddings aK, row K = offset 0, row 0 = offset -K (j - i <= -K).
        rel_v: (2K + 1, Dv) value embeddings aV, or None for keys only.
        mask: None, an ``attnkit.masks`` spec, or a bool tensor broadcastable to (B, Hq, Nq, Nk)
            (True = may attend). Queries are bottom-right aligned (row i at position i + Nk - Nq),
            so causal decoding with a KV cache needs no offset argument. Each chunk only visits
            the keys its rows may attend (from the spec's tile map): causal costs about half of
            dense, a sliding window O(Nq * W).
        scale: multiplies both q.k and q.aK; default 1/sqrt(D).
        chunk_size: query rows per chunk (memory O(B * Hq * chunk_size * Nk)).
        checkpoint: recompute chunks in backward; default True when a gradient is needed.

    Returns (B, Hq, Nq, Dv) in q's dtype. Rows with no allowed key give zeros and zero
    gradient. Half/bfloat16 inputs are computed in float32.
    """
    check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if not isinstance(rel_k, torch.Tensor) or rel_k.dim() != 2 or rel_k.shape[0] % 2 != 1:
        got = tuple(rel_k.shape) if isinstance(rel_k, torch.Tensor) else type(rel_k).__name__
        raise ValueError(f"rel_k must be a (2K + 1, D) tensor with an odd number of rows, got {got}")
    R = rel_k.shape[0]
    K = (R - 1) // 2
    check_param("rel_k", rel_k, (R, D), "(2K + 1, D)", q)
    if rel_v is not None:
        check_param("rel_v", rel_v, (R, Dv), "(2K + 1, Dv)", q)
    scale = check_scale(scale, D)
    chunks = ChunkedMask(mask, batch=B, heads=Hq, nq=Nq, nk=Nk, chunk=check_chunk(chunk_size), device=q.device)
    ct = compute_dtype(q.dtype)
    kx = expand_kv(k.to(ct), Hq // Hk)  # (B, Hq, Nk, D)
    vx = expand_kv(v.to(ct), Hq // Hk)  # (B, Hq, Nk, Dv)
    rk = rel_k.to(ct) * scale  # (R, D), scaled once: e = (q.k + q.aK) * scale
    rv = None if rel_v is None else rel_v.to(ct)

    def chunk_fn(lo: int, hi: int, k0: int, k1: int, blocked):
        qc = q[:, :, lo:hi].to(ct)  # (B, Hq, C, D)
        C, L = hi - lo, k1 - k0
        s = torch.matmul(qc * scale, kx[:, :, k0:k1].transpose(-1, -2))  # (B, Hq, C, L)
        q_pos = (torch.arange(lo, hi, device=q.device) + (Nk - Nq)).view(-1, 1)  # (C, 1)
        idx = shaw_indices(q_pos, torch.arange(k0, k1, device=q.device).view(1, -1), K)  # (C, L)
        idx = idx.expand(B, Hq, C, L)  # (B, Hq, C, L), a view
        s = s + torch.matmul(qc, rk.t()).gather(-1, idx)  # + scale * q.aK[idx]: (B, Hq, C, R) gathered
        w = masked_softmax(s, blocked)  # (B, Hq, C, L)
        out = torch.matmul(w, vx[:, :, k0:k1])  # (B, Hq, C, Dv)
        if rv is not None:
            wr = w.new_zeros(B, Hq, C, R).scatter_add(-1, idx, w)  # weights summed per clipped offset
            out = out + torch.matmul(wr, rv)  # (B, Hq, C, Dv)
        return out

    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rel_k, rel_v))
    use_ckpt = grad if checkpoint is None else (bool(checkpoint) and grad)
    out = run_chunks(chunk_fn, chunks, shape=(B, Hq, Nq, Dv), dtype=ct, device=q.device, grad=grad,
                     checkpoint=use_ckpt)
    return out.to(q.dtype)  # (B, Hq, Nq, Dv)


class ShawRelativePosition(nn.Module):
    """Learned relative key/value embeddings aK, aV of shape (2K + 1, head_dim), shared by heads.

    Args:
        head_dim: D (and Dv unless ``value_dim`` is given). max_distance: K (the paper uses 16
            for the base model; offsets beyond K share the edge embedding).
        values: learn aV as well (True, the paper's full method) or keys only.
        chunk_size: query rows per chunk (see ``shaw_attention``).

    Usage (inside an attention module, after projecting and splitting heads)::

        shaw = ShawRelativePosition(64, 16)
        out = shaw(q, k, v, mask=masks.causal())   # (B, H, Nq, 64); decoding: pass the cached k, v
    """

    def __init__(self, head_dim: int, max_distance: int, *, value_dim: int | None = None, values: bool = True,
                 chunk_size: int = 128, init_std: float = 0.02):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"ShawRelativePosition: head_dim must be an int > 0, got {head_dim!r}")
        if not isinstance(max_distance, int) or max_distance < 0:
            raise ValueError(f"ShawRelativePosition: max_distance must be an int >= 0, got {max_distance!r}")
        value_dim = head_dim if value_dim is None else value_dim
        self.head_dim, self.max_distance, self.chunk_size = head_dim, max_distance, check_chunk(chunk_size)
        self.rel_k = nn.Parameter(torch.empty(2 * max_distance + 1, head_dim))  # (R, D)
        self.rel_v = nn.Parameter(torch.empty(2 * max_distance + 1, value_dim)) if values else None  # (R, Dv)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.rel_k, std=self.init_std)
        if self.rel_v is not None:
            nn.init.normal_(self.rel_v, std=self.init_std)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None,
                scale: float | None = None) -> torch.Tensor:
        """q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> (B, Hq, Nq, Dv)."""
        return shaw_attention(q, k, v, self.rel_k, self.rel_v, mask=mask, scale=scale, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_distance={self.max_distance}, values={self.rel_v is not None}"


__all__ = ["shaw_attention", "shaw_indices", "ShawRelativePosition"]
