"""Additive (Bahdanau) attention, tiled so that memory does not grow with Nq x Nk x A.

Legend: B batch, H heads, Nq queries, Nk keys, Dq query dim, Dk key dim, Dv value dim,
A attention (hidden) dim, Cq / Ck query / key chunk lengths, Tq / Tk numbers of chunks.

Bahdanau, Cho & Bengio 2015, "Neural Machine Translation by Jointly Learning to Align and Translate":

    e_ij = v_a . tanh(W_q q_i + W_k k_j + b),   a_i = softmax_j(e_ij) (masked),   out_i = sum_j a_ij v_j

Functional layout (B, H, N, D) like the rest of attnkit: every head h has its own W_q[h] (A, Dq),
W_k[h] (A, Dk), v_a[h] (A,) and optional b[h] (A,). The module takes (B, N, E) and gives every
head the whole query and key vectors; values are split across heads.

Cost: O(Nq Nk A) time (tanh of every pair: this is inherent to additive scores).
Memory: O(N (A + Dv) + Cq Ck A) in forward AND backward. The forward runs an online softmax
over (Cq, Ck) tiles and keeps only the output and the per-row log-sum-exp; a custom autograd
Function recomputes each tile's tanh in backward (no torch.utils.checkpoint). Tiles that the
mask's tile map marks EMPTY are skipped, FULL tiles skip the mask evaluation. A query row with
no allowed key returns zeros and gets zero gradient. Half/bfloat16 inputs run in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import _validate as V
from .._numerics import OnlineSoftmax, compute_dtype, expand_kv
from ..masks import Mask, TileMap, as_mask
from .base import MaskedVariant, check_mask_spec, pos_int

DEFAULT_CHUNKS = (32, 64)  # (Cq, Ck): a (32, 64, A) float32 tanh tile is 512 KiB per (batch, head) at A=64


def _tile_scores(pq_i, pk_j, v_a, buf: torch.Tensor):
    """tanh tile T (B, H, Cq, Ck, A) written into ``buf`` (flat, reused: no page faults per tile)
    and scores e = T . v_a (B, H, Cq, Ck)."""
    B, H, nq, A = pq_i.shape
    nk = pk_j.shape[2]
    t = buf[:B * H * nq * nk * A].view(B, H, nq, nk, A)
    torch.add(pq_i.unsqueeze(3), pk_j.unsqueeze(2), out=t).tanh_()    # (B, H, Cq, Ck, A)
    e = torch.matmul(t.view(B, H, nq * nk, A), v_a.view(1, H, A, 1))   # (B, H, Cq * Ck, 1)
    return t, e.view(B, H, nq, nk)


def _buffer(pq, plan: TileMap) -> torch.Tensor:
    B, H, _, A = pq.shape
    return pq.new_empty(B * H * plan.bq * plan.bk * A)


class _AdditiveTiled(torch.autograd.Function):
    """Online-softmax forward over tiles; backward recomputes each tile (flash-attention style)."""

    @staticmethod
    def forward(ctx, pq, pk, v, v_a, plan: TileMap):
        B, H, Nq, _ = pq.shape
        Dv = v.shape[-1]
        out = pq.new_zeros(B, H, Nq, Dv)
        lse = pq.new_full((B, H, Nq), float("inf"))
        cq, ck = plan.bq, plan.bk
        buf = _buffer(pq, plan)
        for i, row in enumerate(plan.rows()):
            sl_q = slice(i * cq, (i + 1) * cq)
            pq_i = pq[:, :, sl_q]                                           # (B, H, Cq, A)
            acc = OnlineSoftmax(pq_i.shape[:3], Dv, dtype=pq.dtype, device=pq.device)
            for j in (j for j, st in enumerate(row) if st):
                sl_k = slice(j * ck, (j + 1) * ck)
                _, e = _tile_scores(pq_i, pk[:, :, sl_k], v_a, buf)        # (B, H, Cq, Ck)
                allowed = plan.tile_allowed(i, j)
                if allowed is not None:
                    e = e.masked_fill(~allowed, float("-inf"))
                acc.update(e, v[:, :, sl_k])
            out[:, :, sl_q], lse[:, :, sl_q] = acc.result()
        ctx.save_for_backward(pq, pk, v, v_a, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.plan = plan
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        pq, pk, v, v_a, out, lse = ctx.saved_tensors
        plan = ctx.plan
        delta = (d_out * out).sum(dim=-1)                                   # (B, H, Nq)
        d_pq, d_pk, d_v = torch.zeros_like(pq), torch.zeros_like(pk), torch.zeros_like(v)
        d_va = torch.zeros(pq.shape[0], *v_a.shape, dtype=pq.dtype, device=pq.device)  # (B, H, A)
        cq, ck = plan.bq, plan.bk
        buf = _buffer(pq, plan)
        for i, j in plan.nonempty():
            sl_q, sl_k = slice(i * cq, (i + 1) * cq), slice(j * ck, (j + 1) * ck)
            t, e = _tile_scores(pq[:, :, sl_q], pk[:, :, sl_k], v_a, buf)        # (B, H, Cq, Ck, A), (B, H, Cq, Ck)
            allowed = plan.tile_allowed(i, j)
            if allowed is not None:
                e = e.masked_fill(~allowed, float("-inf"))
            p = torch.exp(e - lse[:, :, sl_q].unsqueeze(-1))               # (B, H, Cq, Ck); 0 where lse = +inf
            do_i = d_out[:, :, sl_q]                                        # (B, H, Cq, Dv)
            d_v[:, :, sl_k] += torch.matmul(p.transpose(-1, -2), do_i)      # (B, H, Ck, Dv)
            dp = torch.matmul(do_i, v[:, :, sl_k].transpose(-1, -2))        # (B, H, Cq, Ck)
            ds = p * (dp - delta[:, :, sl_q].unsqueeze(-1))                 # (B, H, Cq, Ck) = dL/de
            Bq, Hq, nq, nk, A = t.shape
            d_va += torch.matmul(ds.reshape(Bq, Hq, 1, nq * nk), t.reshape(Bq, Hq, nq * nk, A)).squeeze(2)  # (B, H, A)
            # dL/d(pre-activation) = ds * v_a * (1 - T^2); v_a is applied once at the end
            g = t.square_().mul_(ds.unsqueeze(-1))                          # (B, H, Cq, Ck, A) = ds * T^2
            d_pq[:, :, sl_q] += ds.sum(dim=3, keepdim=True) - g.sum(dim=3)  # (B, H, Cq, A)
            d_pk[:, :, sl_k] += ds.sum(dim=2).unsqueeze(-1) - g.sum(dim=2)  # (B, H, Ck, A)
        va = v_a[None, :, None, :]                                          # (1, H, 1, A)
        return d_pq * va, d_pk * va, d_v, d_va.sum(dim=0), None


def _check(q, k, v, w_q, w_k, v_a, bias):
    for name, t, legend in (("q", q, "(B, H, Nq, Dq)"), ("k", k, "(B, H, Nk, Dk)"), ("v", v, "(B, H, Nk, Dv)")):
        V.check_rank4(name, t, legend)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, _, Dq = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"q {V.shape_str(q)}, k {V.shape_str(k)}, v {V.shape_str(v)} must agree in batch and heads (dims 0, 1)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k {V.shape_str(k)} and v {V.shape_str(v)} must have the same number of keys (dim 2)")
    if k.shape[2] == 0:
        raise ValueError(f"k has no keys (Nk=0): shape {V.shape_str(k)}")
    Dk = k.shape[3]
    if not isinstance(w_q, torch.Tensor) or w_q.dim() != 3 or w_q.shape[0] != H or w_q.shape[2] != Dq:
        raise ValueError(f"w_q must be (H, A, Dq) = ({H}, A, {Dq}), got {getattr(w_q, 'shape', type(w_q).__name__)}")
    A = w_q.shape[1]
    for name, t, want in (("w_k", w_k, (H, A, Dk)), ("v_a", v_a, (H, A)), ("bias", bias, (H, A))):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {getattr(t, 'shape', type(t).__name__)}")
    for name, t in (("w_q", w_q), ("w_k", w_k), ("v_a", v_a), ("bias", bias)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")


def additive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                       v_a: torch.Tensor, *, bias: torch.Tensor | None = None, mask=None, return_weights: bool = False,
                       chunk_size: int | tuple[int, int] = DEFAULT_CHUNKS):
    """Additive attention out_i = sum_j softmax_j(v_a . tanh(W_q q_i + W_k k_j + b)) v_j (Bahdanau et al. 2015).

    Args:
        q (B, H, Nq, Dq), k (B, H, Nk, Dk), v (B, H, Nk, Dv).
        w_q (H, A, Dq), w_k (H, A, Dk), v_a (H, A), bias (H, A) or None: per-head weights,
            in nn.Linear's (out, in) layout.
        mask: None, a bool tensor broadcastable to (B, H, Nq, Nk) (True = may attend) or an
            ``attnkit.masks`` spec; causal specs are bottom-right aligned.
        return_weights: also return the weights (B, H, Nq, Nk) (O(Nq Nk) memory; recomputed
            without autograd, so no gradient flows through them).
        chunk_size: Cq or (Cq, Ck), the tile shape.

    Returns out (B, H, Nq, Dv) in q's dtype (and the weights). Rows with no allowed key are 0.
    Cost O(Nq Nk A) time, O(N (A + Dv) + Cq Ck A) memory in forward and backward.
    """
    _check(q, k, v, w_q, w_k, v_a, bias)
    cq, ck = (chunk_size, chunk_size) if isinstance(chunk_size, int) else tuple(chunk_size)
    if not all(isinstance(c, int) and c > 0 for c in (cq, ck)):
        raise ValueError(f"chunk_size must be an int > 0 or a pair of them, got {chunk_size!r}")
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    m = as_mask(mask, batch=B, heads=H, nq=Nq, nk=Nk, device=q.device)
    ct = compute_dtype(q.dtype)
    pq = torch.einsum("bhnd,had->bhna", q.to(ct), w_q.to(ct))              # (B, H, Nq, A)
    if bias is not None:
        pq = pq + bias.to(ct)[None, :, None, :]
    pk = torch.einsum("bhnd,had->bhna", k.to(ct), w_k.to(ct))              # (B, H, Nk, A)
    plan = TileMap(m, batch=B, heads=H, nq=Nq, nk=Nk, block_q=min(cq, max(Nq, 1)), block_k=min(ck, Nk), device=q.device)
    out, lse = _AdditiveTiled.apply(pq, pk, v.to(ct), v_a.to(ct), plan)     # (B, H, Nq, Dv), (B, H, Nq)
    out = out.to(q.dtype)
    if not return_weights:
        return out
    return out, _weights(pq.detach(), pk.detach(), v_a.detach().to(ct), lse.detach(), plan).to(q.dtype)


@torch.no_grad()
def _weights(pq, pk, v_a, lse, plan: TileMap) -> torch.Tensor:
    B, H, Nq, _ = pq.shape
    w = pq.new_zeros(B, H, Nq, pk.shape[2])                                 # (B, H, Nq, Nk)
    buf = _buffer(pq, plan)
    for i, j in plan.nonempty():
        sl_q, sl_k = slice(i * plan.bq, (i + 1) * plan.bq), slice(j * plan.bk, (j + 1) * plan.bk)
        _, e = _tile_scores(pq[:, :, sl_q], pk[:, :, sl_k], v_a, buf)
        allowed = plan.tile_allowed(i, j)
        if allowed is not None:
            e = e.masked_fill(~allowed, float("-inf"))
        w[:, :, sl_q, sl_k] = torch.exp(e - lse[:, :, sl_q].unsqueeze(-1))  # 0 on rows with lse = +inf
    return w


@dataclass(frozen=True)
class Additive(MaskedVariant):
    """Bahdanau additive attention in a module, e_ij = v_a[h] . tanh(W_q[h] q_i + W_k[h] k_j + b[h]).

    attn_dim: width A of the tanh layer (default: the head dim). mask: a spec applied on every
    call, as in ``Softmax`` (causal masks decode with a KVCache). Weights are available; no
    float bias, no attention dropout. Cost O(Nq Nk A) time, memory linear in N.
    """

    attn_dim: int | None = None
    mask: Mask | None = None

    name = "additive"
    returns_weights = True
    dot_product = False

    def __post_init__(self):
        if self.attn_dim is not None:
            pos_int("Additive", "attn_dim", self.attn_dim)
        check_mask_spec("Additive", self.mask)

    def build_core(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return AdditiveCore(self, num_heads=num_heads, head_dim=head_dim)


class AdditiveCore(nn.Module):
    """Per-head Bahdanau scores on projected heads: parameters w_q, w_k (H, A, D), v_a (H, A), b (H, A)."""

    def __init__(self, spec: Additive, *, num_heads: int, head_dim: int):
        super().__init__()
        self.spec = spec
        A = spec.attn_dim or head_dim
        bound_in, bound_a = 1 / math.sqrt(head_dim), 1 / math.sqrt(A)
        self.w_q = nn.Parameter(torch.empty(num_heads, A, head_dim).uniform_(-bound_in, bound_in))  # (H, A, D)
        self.w_k = nn.Parameter(torch.empty(num_heads, A, head_dim).uniform_(-bound_in, bound_in))  # (H, A, D)
        self.v_a = nn.Parameter(torch.empty(num_heads, A).uniform_(-bound_a, bound_a))  # (H, A)
        self.b = nn.Parameter(torch.zeros(num_heads, A))  # (H, A)

    def forward(self, q, k, v, *, mask, bias, dropout_p, need_weights, cache, query_valid=None):
        H = q.shape[1]
        G = H // k.shape[1]
        res = additive_attention(q, expand_kv(k, G), expand_kv(v, G), self.w_q, self.w_k, self.v_a, bias=self.b,
                                 mask=mask, return_weights=need_weights)
        return res if need_weights else (res, None)


__all__ = ["additive_attention", "Additive", "AdditiveCore", "DEFAULT_CHUNKS"]
