"""Transformer-XL relative attention with segment memory (Dai et al. 2019, "Transformer-XL:
Attentive Language Models Beyond a Fixed-Length Context", ACL, arXiv:1901.02860).

Legend: B batch, Hq query heads, Hk key/value heads, M memory length, Nq queries (current
segment), Nk = M + Nq keys, D head dim, Dv value dim, E dim of the sinusoid R, L rows of r.

With i the query position (key coordinates: row i sits at i + Nk - Nq) and j the key position,
q_i = W_q x_i, k_j = W_kE x_j and r_d = W_kR R_d for the distance d = i - j:

    score_ij = scale * ((q_i + u) . k_j + (q_i + v) . r_{i - j})
             = scale * (a + b + c + d),   a = q.k, b = q.r, c = u.k, d = v.r   (paper, Sec. 3.3)

R_d = cat[sin(d * f), cos(d * f)] with f_p = 10000^(-2p / E) (pos_seq descending, as in the
official code). The paper's rel-shift is replaced by an equivalent gather: per chunk of query
rows, (q + v) is multiplied with the L_c <= C + Nk - 1 relative embeddings the chunk needs and
gathered at t = (Nk - 1) - (i - j). Memory O(B * Hq * C * Nk) per chunk (checkpointed under
autograd); time O(B * Hq * Nq * Nk * D) plus O((Nq + Nk) * E * Hq * D) for projecting R.

Segment memory: the previous segment's keys and values are concatenated in front of the
current ones, *detached*: no gradient flows into the memory. (The paper caches the layer input
h and recomputes k, v = W h with the current weights; caching k, v gives the same forward
values, and differs only in that W_k, W_v get no gradient through the memory positions.)
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


def xl_distances(nq: int, nk: int, *, causal_only: bool = False, device=None) -> torch.Tensor:
    """Relative distances d = i - j covered by r, descending: Nk-1, ..., 0 (causal_only, the
    paper's pos_seq) or Nk-1, ..., 1-Nq (every pair, for non-causal masks). int64 (L,)."""
    end = -1 if causal_only else -nq
    return torch.arange(nk - 1, end, -1, device=device)


def xl_sinusoid(distances: torch.Tensor, dim: int, *, base: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    """R = cat[sin(d * f), cos(d * f)], f_p = base^(-2p / dim): (L, dim), computed in float64."""
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"xl_sinusoid: dim must be an even int > 0, got {dim!r}")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=distances.device) / dim))  # (E/2,)
    ang = distances.to(torch.float64)[:, None] * inv_freq[None, :]  # (L, E/2)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).to(dtype)  # (L, E)


def xl_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, *, r_w_bias: torch.Tensor,
                 r_r_bias: torch.Tensor, mask=None, scale: float | None = None, chunk_size: int = 128,
                 checkpoint: bool | None = None) -> torch.Tensor:
    """Transformer-XL relative attention on already projected tensors.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv) (memory already concatenated).
        r: (Hq, L, D) projected relative embeddings W_kR R_d for d = Nk-1, Nk-2, ... (descending);
            L = Nk (d >= 0 only, the paper; the mask must be causal) or Nk + Nq - 1 (all pairs).
        r_w_bias: u, (Hq, D). r_r_bias: v, (Hq, D).
        mask: None, an ``attnkit.masks`` spec or a bool tensor broadcastable to (B, Hq, Nq, Nk).
            With memory, ``masks.causal()`` (bottom-right) is the paper's mask. Each chunk only
            visits the keys its rows may attend (from the spec's tile map).
        scale: on the whole score; default 1/sqrt(D). chunk_size / checkpoint: as ``shaw_attention``.

    Returns (B, Hq, Nq, Dv) in q's dtype; rows with no allowed key give zeros.
    """
    check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if not isinstance(r, torch.Tensor) or r.dim() != 3 or r.shape[0] != Hq or r.shape[2] != D \
            or r.shape[1] not in (Nk, Nk + Nq - 1):
        got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"r must have shape (Hq, L, D) = ({Hq}, L, {D}) with L = Nk = {Nk} or "
                         f"Nk + Nq - 1 = {Nk + Nq - 1}, got {got}")
    check_param("r", r, tuple(r.shape), "(Hq, L, D)", q)
    check_param("r_w_bias", r_w_bias, (Hq, D), "(Hq, D)", q)
    check_param("r_r_bias", r_r_bias, (Hq, D), "(Hq, D)", q)
    scale = check_scale(scale, D)
    chunks = ChunkedMask(mask, batch=B, heads=Hq, nq=Nq, nk=Nk, chunk=check_chunk(chunk_size), device=q.device)
    ct = compute_dtype(q.dtype)
    kx = expand_kv(k.to(ct), Hq // Hk)  # (B, Hq, Nk, D)
    vx = expand_kv(v.to(ct), Hq // Hk)  # (B, Hq, Nk, Dv)
    rr = r.to(ct)  # (Hq, L, D)
    u = r_w_bias.to(ct)[None, :, None, :]  # (1, Hq, 1, D)
    vb = r_r_bias.to(ct)[None, :, None, :]  # (1, Hq, 1, D)
    L = r.shape[1]

    def chunk_fn(lo: int, hi: int, k0: int, k1: int, blocked):
        qc = q[:, :, lo:hi].to(ct)  # (B, Hq, C, D)
        C, Lk = hi - lo, k1 - k0
        ac = torch.matmul((qc + u) * scale, kx[:, :, k0:k1].transpose(-1, -2))  # (B, Hq, C, Lk): a + c
        p0, p1 = lo + Nk - Nq, hi - 1 + Nk - Nq  # first / last query position of the chunk
        # r row t holds distance d = Nk - 1 - t; this chunk's pairs need d in [p0 - (k1 - 1), p1 - k0].
        t0, t1 = (Nk - 1) - (p1 - k0), min(L - 1, (Nk - 1) - (p0 - (k1 - 1)))
        rc = rr[:, t0:t1 + 1]  # (Hq, Lc, D), Lc <= C + Lk - 1
        bd = torch.matmul((qc + vb) * scale, rc.transpose(-1, -2).unsqueeze(0))  # (B, Hq, C, Lc): b + d
        q_pos = torch.arange(p0, p1 + 1, device=q.device).view(-1, 1)  # (C, 1)
        t = (Nk - 1) - (q_pos - torch.arange(k0, k1, device=q.device).view(1, -1))  # (C, Lk)
        if L < Nk + Nq - 1:  # r covers d >= 0 only: pairs with a key after the query must be masked
            uncovered = t > L - 1  # (C, Lk)
            if bool((uncovered if blocked is None else uncovered & ~blocked).any()):
                raise ValueError(
                    "r covers only distances >= 0 (L = Nk) but the mask allows keys after the query; "
                    "use a causal mask or r for xl_distances(nq, nk) (L = Nk + Nq - 1)"
                )
        idx = (t - t0).clamp(max=rc.shape[1] - 1).expand(B, Hq, C, Lk)  # (B, Hq, C, Lk), a view
        w = masked_softmax(ac + bd.gather(-1, idx), blocked)  # (B, Hq, C, Lk)
        return torch.matmul(w, vx[:, :, k0:k1])  # (B, Hq, C, Dv)

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, r, r_w_bias, r_r_bias))
    use_ckpt = grad if checkpoint is None else (bool(checkpoint) and grad)
    out = run_chunks(chunk_fn, chunks, shape=(B, Hq, Nq, Dv), dtype=ct, device=q.device, grad=grad,
                     checkpoint=use_ckpt)
    return out.to(q.dtype)  # (B, Hq, Nq, Dv)


def update_memory(memory: tuple[torch.Tensor, torch.Tensor] | None, k: torch.Tensor, v: torch.Tensor,
                  mem_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Next segment's memory: the last ``mem_len`` keys/values of cat[memory, current], detached."""
    if mem_len <= 0:
        return None
    if memory is not None:
        k = torch.cat([memory[0], k], dim=2)  # (B, Hk, M + N, D)
        v = torch.cat([memory[1], v], dim=2)  # (B, Hk, M + N, Dv)
    return k[:, :, -mem_len:].detach(), v[:, :, -mem_len:].detach()


class XLRelativePosition(nn.Module):
    """Transformer-XL relative position parameters: W_kR (E -> Hq * D), u and v (Hq, D).

    Args:
        num_heads: Hq. head_dim: D. d_model: E, the sinusoid's dimension (default Hq * D, as in
            the paper where R has the model width). mem_len: keys/values kept by ``update_memory``.
        chunk_size: query rows per chunk.

    Usage (inside an attention module, after projecting and splitting heads)::

        xl = XLRelativePosition(8, 64, mem_len=128)
        out = xl(q, k, v, memory=mem, mask=masks.causal())  # mem: (k_mem, v_mem) or None
        mem = xl.update_memory(mem, k, v)                     # detached, for the next segment
    """

    def __init__(self, num_heads: int, head_dim: int, d_model: int | None = None, *, mem_len: int = 0,
                 chunk_size: int = 128, init_std: float = 0.02):
        super().__init__()
        d_model = num_heads * head_dim if d_model is None else d_model
        for name, val in (("num_heads", num_heads), ("head_dim", head_dim), ("d_model", d_model)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"XLRelativePosition: {name} must be an int > 0, got {val!r}")
        if d_model % 2:
            raise ValueError(f"XLRelativePosition: d_model must be even (sin and cos halves), got {d_model}")
        if not isinstance(mem_len, int) or mem_len < 0:
            raise ValueError(f"XLRelativePosition: mem_len must be an int >= 0, got {mem_len!r}")
        self.num_heads, self.head_dim, self.d_model, self.mem_len = num_heads, head_dim, d_model, mem_len
        self.chunk_size = check_chunk(chunk_size)
        self.r_net = nn.Linear(d_model, num_heads * head_dim, bias=False)  # W_kR
        self.r_w_bias = nn.Parameter(torch.empty(num_heads, head_dim))  # u
        self.r_r_bias = nn.Parameter(torch.empty(num_heads, head_dim))  # v
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.r_w_bias, std=self.init_std)
        nn.init.normal_(self.r_r_bias, std=self.init_std)
        self.r_net.reset_parameters()

    def relative_keys(self, nq: int, nk: int, *, device=None, dtype=None) -> torch.Tensor:
        """r = W_kR R_d for d = Nk-1 .. 1-Nq: (Hq, Nk + Nq - 1, D)."""
        w = self.r_net.weight
        R = xl_sinusoid(xl_distances(nq, nk, device=device or w.device), self.d_model, dtype=dtype or w.dtype)  # (L, E)
        r = self.r_net(R.to(w.dtype))  # (L, Hq * D)
        return r.view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # (Hq, L, D)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, memory=None, mask=None,
                scale: float | None = None) -> torch.Tensor:
        """q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hk, N, Dv); memory (k_mem, v_mem) (B, Hk, M, .) or None.

        Returns (B, Hq, N, Dv). The memory is detached before use (no gradient flows into it).
        """
        if memory is not None:
            if not (isinstance(memory, tuple) and len(memory) == 2):
                raise TypeError("memory must be a (k_mem, v_mem) tuple or None")
            k = torch.cat([memory[0].detach(), k], dim=2)  # (B, Hk, M + N, D)
            v = torch.cat([memory[1].detach(), v], dim=2)  # (B, Hk, M + N, Dv)
        r = self.relative_keys(q.shape[2], k.shape[2], device=q.device)  # (Hq, L, D)
        return xl_attention(q, k, v, r, r_w_bias=self.r_w_bias, r_r_bias=self.r_r_bias, mask=mask, scale=scale,
                            chunk_size=self.chunk_size)

    def update_memory(self, memory, k: torch.Tensor, v: torch.Tensor):
        """Memory for the next segment (last ``mem_len`` keys/values, detached); None if mem_len == 0."""
        return update_memory(memory, k, v, self.mem_len)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, d_model={self.d_model}, mem_len={self.mem_len}"


__all__ = ["xl_attention", "xl_sinusoid", "xl_distances", "update_memory", "XLRelativePosition"]
