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

import torch
from torch import nn

from . import _validate as V
from .masks import EMPTY, FULL, Mask, TensorMask, key_padding_from_bool

DEFAULT_CHUNKS = (32, 64)  # (Cq, Ck): a (32, 64, A) float32 tanh tile is 512 KiB per (batch, head) at A=64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Plan:
    """Which (query chunk, key chunk) tiles to run, and how to mask them."""

    def __init__(self, mask: Mask | None, B: int, H: int, Nq: int, Nk: int, cq: int, ck: int, device):
        self.mask, self.B, self.H, self.Nq, self.Nk, self.cq, self.ck, self.device = mask, B, H, Nq, Nk, cq, ck, device
        self.tq, self.tk = -(-Nq // cq), -(-Nk // ck)
        if mask is None:
            self.empty = self.full = None
        else:
            t = mask.tiles(Nq, Nk, cq, ck, batch=B, heads=H, device=device)  # (B', H', Tq, Tk)
            self.empty = (t == EMPTY).all(dim=1).all(dim=0).tolist()         # (Tq, Tk) skip tile
            self.full = (t == FULL).all(dim=1).all(dim=0).tolist()           # (Tq, Tk) no mask needed

    def tiles(self):
        for i in range(self.tq):
            for j in range(self.tk):
                if self.empty is not None and self.empty[i][j]:
                    continue
                yield i, j

    def allowed(self, i: int, j: int) -> torch.Tensor | None:
        """Bool (B', H', Cq, Ck) for a partial tile, None for a full one."""
        if self.mask is None or self.full[i][j]:
            return None
        q0, k0 = i * self.cq, j * self.ck
        nq, nk = min(self.cq, self.Nq - q0), min(self.ck, self.Nk - k0)
        b = torch.arange(self.B, device=self.device).view(-1, 1, 1, 1)
        h = torch.arange(self.H, device=self.device).view(1, -1, 1, 1)
        q = (torch.arange(q0, q0 + nq, device=self.device) + (self.Nk - self.Nq)).view(1, 1, -1, 1)
        k = torch.arange(k0, k0 + nk, device=self.device).view(1, 1, 1, -1)
        return self.mask.allows(b, h, q, k, num_keys=self.Nk)


def _tile_scores(pq_i, pk_j, v_a, buf: torch.Tensor):
    """tanh tile T (B, H, Cq, Ck, A) written into ``buf`` (flat, reused: no page faults per tile)
    and scores e = T . v_a (B, H, Cq, Ck)."""
    B, H, nq, A = pq_i.shape
    nk = pk_j.shape[2]
    t = buf[:B * H * nq * nk * A].view(B, H, nq, nk, A)
    torch.add(pq_i.unsqueeze(3), pk_j.unsqueeze(2), out=t).tanh_()    # (B, H, Cq, Ck, A)
    e = torch.matmul(t.view(B, H, nq * nk, A), v_a.view(1, H, A, 1))   # (B, H, Cq * Ck, 1)
    return t, e.view(B, H, nq, nk)


def _buffer(pq, plan: _Plan) -> torch.Tensor:
    B, H, _, A = pq.shape
    return pq.new_empty(B * H * plan.cq * plan.ck * A)


class _AdditiveTiled(torch.autograd.Function):
    """Online-softmax forward over tiles; backward recomputes each tile (flash-attention style)."""

    @staticmethod
    def forward(ctx, pq, pk, v, v_a, plan: _Plan):
        B, H, Nq, _ = pq.shape
        Dv = v.shape[-1]
        out = pq.new_zeros(B, H, Nq, Dv)
        lse = pq.new_full((B, H, Nq), float("-inf"))
        cq, ck = plan.cq, plan.ck
        buf = _buffer(pq, plan)
        for i in range(plan.tq):
            sl_q = slice(i * cq, (i + 1) * cq)
            pq_i = pq[:, :, sl_q]                                           # (B, H, Cq, A)
            m = pq.new_full(pq_i.shape[:3], float("-inf"))                 # (B, H, Cq)
            denom = pq.new_zeros(pq_i.shape[:3])                               # (B, H, Cq)
            acc = pq.new_zeros(*pq_i.shape[:3], Dv)                        # (B, H, Cq, Dv)
            for j in range(plan.tk):
                if plan.empty is not None and plan.empty[i][j]:
                    continue
                sl_k = slice(j * ck, (j + 1) * ck)
                _, e = _tile_scores(pq_i, pk[:, :, sl_k], v_a, buf)        # (B, H, Cq, Ck)
                allowed = plan.allowed(i, j)
                if allowed is not None:
                    e = e.masked_fill(~allowed, float("-inf"))
                m_new = torch.maximum(m, e.amax(dim=-1))
                m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                p = torch.exp(e - m_safe.unsqueeze(-1))                     # (B, H, Cq, Ck)
                alpha = torch.exp(m - m_safe)                               # 0 where m = -inf
                denom = denom * alpha + p.sum(dim=-1)
                acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, v[:, :, sl_k])  # (B, H, Cq, Dv)
                m = m_new
            ok = denom > 0
            out[:, :, sl_q] = torch.where(ok.unsqueeze(-1), acc / torch.where(ok, denom, 1.0).unsqueeze(-1), 0.0)
            lse[:, :, sl_q] = torch.where(ok, m + torch.log(torch.where(ok, denom, 1.0)), float("-inf"))
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
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        cq, ck = plan.cq, plan.ck
        buf = _buffer(pq, plan)
        for i, j in plan.tiles():
            sl_q, sl_k = slice(i * cq, (i + 1) * cq), slice(j * ck, (j + 1) * ck)
            t, e = _tile_scores(pq[:, :, sl_q], pk[:, :, sl_k], v_a, buf)        # (B, H, Cq, Ck, A), (B, H, Cq, Ck)
            allowed = plan.allowed(i, j)
            if allowed is not None:
                e = e.masked_fill(~allowed, float("-inf"))
            p = torch.exp(e - lse_safe[:, :, sl_q].unsqueeze(-1))          # (B, H, Cq, Ck)
            p = torch.where(torch.isfinite(lse[:, :, sl_q]).unsqueeze(-1), p, 0.0)
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


def _as_mask(mask, B: int, H: int, Nq: int, Nk: int, device) -> Mask | None:
    """None, a mask spec (checked against the sizes) or a bool tensor broadcastable to (B, H, Nq, Nk)."""
    if mask is None:
        return None
    if isinstance(mask, Mask):
        mask.check(Nq, Nk, batch=B, heads=H)
        return mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"a tensor of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be None, a bool tensor (True = may attend) or an attnkit.masks spec, got {got}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q is on {device}")
    V.check_broadcastable("mask", mask, (B, H, Nq, Nk), "(B, H, Nq, Nk)")
    return TensorMask(mask, Nq, Nk)


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
    m = _as_mask(mask, B, H, Nq, Nk, q.device)
    ct = _compute_dtype(q.dtype)
    pq = torch.einsum("bhnd,had->bhna", q.to(ct), w_q.to(ct))              # (B, H, Nq, A)
    if bias is not None:
        pq = pq + bias.to(ct)[None, :, None, :]
    pk = torch.einsum("bhnd,had->bhna", k.to(ct), w_k.to(ct))              # (B, H, Nk, A)
    plan = _Plan(m, B, H, Nq, Nk, min(cq, Nq), min(ck, Nk), q.device)
    out, lse = _AdditiveTiled.apply(pq, pk, v.to(ct), v_a.to(ct), plan)     # (B, H, Nq, Dv), (B, H, Nq)
    out = out.to(q.dtype)
    if not return_weights:
        return out
    return out, _weights(pq.detach(), pk.detach(), v_a.detach().to(ct), lse.detach(), plan).to(q.dtype)


@torch.no_grad()
def _weights(pq, pk, v_a, lse, plan: _Plan) -> torch.Tensor:
    B, H, Nq, _ = pq.shape
    w = pq.new_zeros(B, H, Nq, pk.shape[2])                                 # (B, H, Nq, Nk)
    ok = torch.isfinite(lse)
    lse = torch.where(ok, lse, 0.0)
    buf = _buffer(pq, plan)
    for i, j in plan.tiles():
        sl_q, sl_k = slice(i * plan.cq, (i + 1) * plan.cq), slice(j * plan.ck, (j + 1) * plan.ck)
        _, e = _tile_scores(pq[:, :, sl_q], pk[:, :, sl_k], v_a, buf)
        allowed = plan.allowed(i, j)
        if allowed is not None:
            e = e.masked_fill(~allowed, float("-inf"))
        w[:, :, sl_q, sl_k] = torch.where(ok[:, :, sl_q].unsqueeze(-1), torch.exp(e - lse[:, :, sl_q].unsqueeze(-1)), 0.0)
    return w


class AdditiveAttention(nn.Module):
    """Multi-head additive (Bahdanau) attention on (B, N, E); usable as seq2seq cross-attention.

    Every head h scores e_ij = v_a[h] . tanh(W_q[h] q_i + W_k[h] k_j (+ b[h])) on the whole query
    (B, Nq, query_dim) and key (B, Nk, key_dim) vectors and averages its slice of the values
    (value_dim / num_heads of them); the heads' outputs are concatenated: out (B, Nq, value_dim).
    No output projection (Bahdanau's context vector). num_heads=1 is the paper's attention.

    forward(query, key, value=None, *, key_padding_mask=None, mask=None, return_weights=False):
        value defaults to key (the encoder annotations, as in the paper; needs value_dim == key_dim).
        key_padding_mask (B, Nk) bool, True = PADDING (torch MHA's polarity, converted here).
        mask: extra bool tensor / mask spec, True = may attend (e.g. masks.causal()).
        Returns out (B, Nq, value_dim), or (out, weights (B, H, Nq, Nk)) with return_weights.
    Cost O(Nq Nk attn_dim) time, memory linear in Nq + Nk (see ``additive_attention``).
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int, value_dim: int | None = None,
                 num_heads: int = 1, *, bias: bool = False, chunk_size: int | tuple[int, int] = DEFAULT_CHUNKS):
        super().__init__()
        value_dim = key_dim if value_dim is None else value_dim
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("attn_dim", attn_dim),
                          ("value_dim", value_dim), ("num_heads", num_heads)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"AdditiveAttention: {name} must be an int > 0, got {val!r}")
        if value_dim % num_heads:
            raise ValueError(f"AdditiveAttention: value_dim={value_dim} must be divisible by num_heads={num_heads}")
        self.query_dim, self.key_dim, self.attn_dim, self.value_dim = query_dim, key_dim, attn_dim, value_dim
        self.num_heads, self.chunk_size = num_heads, chunk_size
        self.w_q = nn.Parameter(torch.empty(num_heads, attn_dim, query_dim))  # (H, A, Dq)
        self.w_k = nn.Parameter(torch.empty(num_heads, attn_dim, key_dim))    # (H, A, Dk)
        self.v_a = nn.Parameter(torch.empty(num_heads, attn_dim))             # (H, A)
        self.bias = nn.Parameter(torch.empty(num_heads, attn_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W_q, W_k (and b); v_a fan_in = A."""
        nn.init.uniform_(self.w_q, -1 / math.sqrt(self.query_dim), 1 / math.sqrt(self.query_dim))
        nn.init.uniform_(self.w_k, -1 / math.sqrt(self.key_dim), 1 / math.sqrt(self.key_dim))
        nn.init.uniform_(self.v_a, -1 / math.sqrt(self.attn_dim), 1 / math.sqrt(self.attn_dim))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.query_dim), 1 / math.sqrt(self.query_dim))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, mask=None, return_weights: bool = False):
        if value is None:
            if self.value_dim != self.key_dim:
                raise ValueError(f"value=None uses the keys as values, but value_dim={self.value_dim} != key_dim={self.key_dim}")
            value = key
        for name, t, dim in (("query", query, self.query_dim), ("key", key, self.key_dim), ("value", value, self.value_dim)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != dim:
                raise ValueError(f"{name} must be (B, N, {dim}), got {getattr(t, 'shape', type(t).__name__)}")
        B, Nq, _ = query.shape
        Nk = key.shape[1]
        if key.shape[0] != B or tuple(value.shape[:2]) != (B, Nk):
            raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}: "
                             "batch sizes and the key/value lengths must agree")
        H = self.num_heads
        q = query.unsqueeze(1).expand(B, H, Nq, self.query_dim)                  # (B, H, Nq, Dq), no copy
        k = key.unsqueeze(1).expand(B, H, Nk, self.key_dim)                      # (B, H, Nk, Dk), no copy
        v = value.reshape(B, Nk, H, self.value_dim // H).transpose(1, 2)         # (B, H, Nk, Dv/H)
        spec = mask
        if key_padding_mask is not None:
            pad = key_padding_from_bool(key_padding_mask)
            spec = pad if mask is None else pad & _as_mask(mask, B, H, Nq, Nk, query.device)
        res = additive_attention(q, k, v, self.w_q, self.w_k, self.v_a, bias=self.bias, mask=spec,
                                 return_weights=return_weights, chunk_size=self.chunk_size)
        out = res[0] if return_weights else res                                  # (B, H, Nq, Dv/H)
        out = out.transpose(1, 2).reshape(B, Nq, self.value_dim)                 # (B, Nq, value_dim)
        return (out, res[1]) if return_weights else out
