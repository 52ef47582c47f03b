"""Independent float64 references for ``MultiHeadAttention`` layers and ``DecoderLM``: explicit
formulas evaluated from a module's weights, never the module's own forward, its head split,
its caches or its position modules' methods.

Legend: B batch, N tokens, E embed dim, H query heads, Hk key/value heads, D head dim,
i query position, j key position (self-attention: both 0..N-1).

- ``mha_reference(m, x, key_padding_mask=None)``: the full (non-cached) self-attention of layer
  ``m`` on x (B, N, E): projections, an explicit head split, the position scheme written out
  (RoPE as complex rotations, ALiBi's slopes from the paper's code, T5 buckets from transformers'
  ``T5Attention._relative_position_bucket``, Shaw's clipped embeddings, Transformer-XL's
  four-term score with its sinusoid), and the variant written out (softmax, Bahdanau, elu+1
  linear, FAVOR+ with the raw estimator), then the output projection.
- ``lm_reference(model, tokens)``: a ``DecoderLM``'s logits (B, N, V) from the same pieces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.nn import T5, XL, Additive, Alibi, Linear, Performer, Rope, Shaw, Softmax


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * D) -> (B, heads, N, D), head h = columns h*D:(h+1)*D."""
    B, N, W = t.shape
    D = W // heads
    return torch.stack([t[:, :, h * D:(h + 1) * D] for h in range(heads)], dim=1)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H * D)."""
    return torch.cat(list(t.unbind(1)), dim=-1)


def rope_rotate(x: torch.Tensor, pos: torch.Tensor, *, base: float, interleaved: bool, rotary_dim: int | None):
    """RoPE by its definition: channel pairs as complex numbers times e^{i pos theta_p}, theta_p =
    base^(-2p / R); pairs (2p, 2p+1) if interleaved (GPT-J) else (p, p + R/2) (GPT-NeoX)."""
    R = rotary_dim or x.shape[-1]
    xr = x[..., :R]
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :R // 2], xr[..., R // 2:])
    theta = base ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    z = torch.complex(a, b) * torch.polar(torch.ones(len(pos), R // 2, dtype=torch.float64),
                                          pos.to(torch.float64)[:, None] * theta)
    rot = torch.stack([z.real, z.imag], -1).flatten(-2) if interleaved else torch.cat([z.real, z.imag], -1)
    return torch.cat([rot, x[..., R:]], dim=-1)


def alibi_slopes_paper(n: int) -> list[float]:
    """The ALiBi paper's get_slopes (ofirpress/attention_with_linear_biases)."""
    def pow2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + alibi_slopes_paper(2 * closest)[0::2][: n - closest]


def t5_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    from transformers.models.t5.modeling_t5 import T5Attention
    return T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                                 max_distance=max_distance)


def _allowed(m, B: int, H: int, N: int, key_padding_mask) -> torch.Tensor:
    """(B, H, N, N) bool from the variant's mask spec and torch-polarity key padding (True = pad)."""
    a = m.attention
    allowed = torch.ones(B, H, N, N, dtype=torch.bool)
    mask = getattr(a, "mask", None)
    if mask is not None:
        allowed = allowed & mask.to_dense(N, N, batch=B, heads=H)
    if getattr(a, "causal", False) or isinstance(m.position, XL):
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed


def _softmax_rows(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    w = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(w, nan=0.0)  # rows with no allowed key: zero weights


def _normalised(a: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    a = a * allowed
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, a / torch.where(den > 0, den, 1.0), 0.0)


def mha_reference(m, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention output (B, N, E) of layer ``m`` on x (B, N, E), by explicit formulas."""
    B, N, _ = x.shape
    H, Hk = m.num_heads, m.num_kv_heads
    a, pos = m.attention, m.position
    q = split_heads(F.linear(x, m.q_proj.weight, m.q_proj.bias), H)  # (B, H, N, D)
    k = q if m.k_proj is None else split_heads(F.linear(x, m.k_proj.weight, m.k_proj.bias), Hk)
    v = split_heads(F.linear(x, m.v_proj.weight, m.v_proj.bias), Hk)
    k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)  # (B, H, N, D)
    D = q.shape[-1]
    i = torch.arange(N)
    rel = i[None, :] - i[:, None]  # (N, N): j - i
    allowed = _allowed(m, B, H, N, key_padding_mask)
    if isinstance(pos, Rope):
        q, k = (rope_rotate(t, i, base=pos.base, interleaved=pos.interleaved, rotary_dim=pos.rotary_dim)
                for t in (q, k))
    if isinstance(a, Softmax):
        scale = a.scale if a.scale is not None else D ** -0.5
        s = scale * q @ k.transpose(-1, -2)  # (B, H, N, N)
        if a.softcap is not None:
            s = a.softcap * torch.tanh(s / a.softcap)
        vrel = None
        if isinstance(pos, Alibi):
            s = s - torch.tensor(alibi_slopes_paper(H), dtype=torch.float64)[:, None, None] * rel.abs()
        elif isinstance(pos, T5):
            bidir = (not a.causal) if pos.bidirectional is None else pos.bidirectional
            table = m.pos.t5.weight  # (num_buckets, H)
            s = s + table[t5_bucket(rel, bidir, pos.num_buckets, pos.max_distance)].permute(2, 0, 1)
        elif isinstance(pos, Shaw):
            K = pos.max_distance
            idx = rel.clamp(-K, K) + K  # (N, N)
            rk, rv = m.pos.kernel.rel_k, m.pos.kernel.rel_v  # (2K + 1, D)
            s = s + scale * torch.einsum("bhid,ijd->bhij", q, rk[idx])
            vrel = rv[idx]  # (N, N, D)
        elif isinstance(pos, XL):
            xl = m.pos.kernel
            E = xl.d_model
            f = 10000.0 ** (-torch.arange(0, E, 2, dtype=torch.float64) / E)
            ang = (-rel).to(torch.float64)[..., None] * f  # distance i - j
            R = torch.cat([ang.sin(), ang.cos()], -1)  # (N, N, E)
            r = F.linear(R, xl.r_net.weight).view(N, N, H, D).permute(2, 0, 1, 3)  # (H, N, N, D): W_kR R_{i-j}
            u, vb = xl.r_w_bias[None, :, None, :], xl.r_r_bias[None, :, None, :]
            s = scale * ((q + u) @ k.transpose(-1, -2) + torch.einsum("bhid,hijd->bhij", q + vb, r))
        w = _softmax_rows(s, allowed)
        out = w @ v
        if vrel is not None:
            out = out + torch.einsum("bhij,ijd->bhid", w, vrel)
    elif isinstance(a, Additive):
        c = m.core
        pq = torch.einsum("bhid,had->bhia", q, c.w_q)
        pk = torch.einsum("bhjd,had->bhja", k, c.w_k)
        e = torch.einsum("bhija,ha->bhij", torch.tanh(pq[:, :, :, None] + pk[:, :, None] + c.b[None, :, None, None]),
                         c.v_a)
        out = _softmax_rows(e, allowed) @ v
    elif isinstance(a, Linear):
        assert a.feature_map == "elu+1", a.feature_map
        phi = lambda t: F.elu(t) + 1
        out = _normalised(phi(q) @ phi(k).transpose(-1, -2), allowed) @ v
    elif isinstance(a, Performer):
        w_r = m.core.projection.to(torch.float64)  # (m, D)
        feat = lambda t: torch.exp(t @ w_r.T - 0.5 * (t * t).sum(-1, keepdim=True)) / math.sqrt(w_r.shape[0])
        sc = D ** -0.25
        out = _normalised(feat(q * sc) @ feat(k * sc).transpose(-1, -2), allowed) @ v
    else:
        raise NotImplementedError(f"no reference for {a!r}")
    return F.linear(merge_heads(out), m.out_proj.weight, m.out_proj.bias)


def lm_reference(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, N, V) of a ``DecoderLM`` in eval mode, every attention layer by ``mha_reference``."""
    h = model.embed.tok.weight[tokens]  # (B, N, E)
    if model.embed.pos is not None:
        h = model.embed.pos(h, offset=0)
    for blk in model.blocks:
        h = h + mha_reference(blk.attn, blk.ln1(h))
        h = h + blk.ffn(blk.ln2(h))
    return F.linear(model.norm(h), model.head.weight)
