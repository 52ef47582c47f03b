"""Linformer: softmax attention over keys and values projected along the sequence (Wang et al. 2020).

Legend: B batch, Hq query heads, Hk key/value heads (Hq % Hk == 0), Nq queries, Nk keys,
D head dim, Dv value dim, Kp projected length ("k" in the paper), L the projections' maximum
length (max_len, L >= Nk), E model width (modules).

    out = softmax(scale * Q (E K)^T) (F V)          E, F: (Kp, Nk), learned

Paper: S. Wang, B. Li, M. Khabsa, H. Fang, H. Ma, "Linformer: Self-Attention with Linear
Complexity", arXiv:2006.04768 (2020). Cost: O(Nq * Kp * D + Nk * Kp * (D + Dv)) time and
O(Nq * Kp) memory per head: linear in N for a fixed Kp.

Conventions (peer: lucidrains ``linformer`` 0.2.3, ``LinformerSelfAttention``)
- E and F are stored as (Kp, L) here (the paper's k x n). The peer stores ``proj_k`` as (L, Kp):
  ``e = proj_k.T``. A sequence shorter than L uses the first Nk columns of E and F, as the peer
  does (it slices ``proj_k[:kv_len]``); a sequence longer than L raises.
- Sharing (paper Sec. 4): "none" = one E_h, F_h per kv head (Hk, Kp, L); "headwise" = one E, F
  shared by all heads (the peer's default); "kv" = E = F shared by heads, keys and values (the
  peer's ``share_kv=True``). Layerwise sharing = hand one ``LinformerProjections(sharing="kv")``
  to every layer.
- Key padding (``mask=`` a key padding spec or a (B, 1, 1, Nk) bool tensor): padded key and
  value rows are set to zero before the projection, so padded keys contribute nothing; a padded
  sequence gives the same outputs as the unpadded one (which uses the first Nk columns of E, F).
- Non-causal only: every projected key mixes all N positions, including future ones, so no
  causal (or any per-query) mask can be applied after the projection. Such masks raise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import _validate as V
from .._numerics import compute_dtype, expand_kv
from .base import Variant, key_valid, pos_int

SHARING = ("none", "headwise", "kv")
_INFERENCE_BLOCK_ELEMENTS = 1 << 22  # scores per query-row block when no gradient is needed (16 MiB in float32)


_REASON = ("every projected key mixes all key positions (future ones included), so only masks on keys "
           "alone (padding) can be applied, before the projection")


def _check_projection(name: str, p: torch.Tensor, hk: int, nk: int, q: torch.Tensor) -> torch.Tensor:
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (Kp, L) or (Hk, Kp, L), got {type(p).__name__}")
    if p.dim() not in (2, 3) or (p.dim() == 3 and p.shape[0] != hk):
        raise ValueError(f"{name} must have shape (Kp, L) or (Hk, Kp, L) with Hk={hk}, got {V.shape_str(p)}")
    if p.shape[-1] < nk:
        raise ValueError(
            f"{name} covers sequences up to L={p.shape[-1]} but the keys have Nk={nk}: Linformer's "
            "projections have a fixed maximum length; build them with max_len >= Nk")
    if p.device != q.device:
        raise ValueError(f"{name} is on {p.device} but q is on {q.device}")
    return p[..., :nk]  # first Nk columns, like the peer


def linformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, e: torch.Tensor,
                        f: torch.Tensor | None = None, *, mask=None, scale: float | None = None) -> torch.Tensor:
    """Linformer attention: softmax(scale * q (E k)^T) (F v).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hk, Nk, D). v: (B, Hk, Nk, Dv); Hq a multiple of Hk.
        e: key projection, (Kp, L) shared by heads or (Hk, Kp, L) per kv head, L >= Nk; only its
            first Nk columns are used.
        f: value projection of the same shape as ``e``; None shares ``e`` (key-value sharing).
        mask: as ``attnkit.attention`` (a spec or a bool tensor, True = may attend), restricted to
            key padding (``masks.key_padding``, ``key_padding_from_bool``, a (B, 1, 1, Nk) bool
            tensor): padded keys/values are zeroed before the projection and contribute nothing.
            Any other mask (causal included) raises: a projected key mixes every position.
        scale: default 1/sqrt(D).

    Returns: (B, Hq, Nq, Dv) in q's dtype (half/bfloat16 computed in float32).
    Cost: O(Nq * Kp * D + Nk * Kp * (D + Dv)) time; O(Nq * Kp) memory per head with autograd, a
    block of query rows at a time without (no_grad, or no input requiring a gradient).
    """
    V.check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    scale = V.check_scale(scale, D)
    e = _check_projection("e", e, Hk, Nk, q)
    f = e if f is None else _check_projection("f", f, Hk, Nk, q)
    if f.shape != e.shape:
        raise ValueError(f"f must have the same shape as e, got e {V.shape_str(e)} and f {V.shape_str(f)}")
    in_dtype = q.dtype
    ct = compute_dtype(in_dtype)
    valid = key_valid(mask, batch=B, nq=Nq, nk=Nk, device=q.device, variant="Linformer", reason=_REASON)
    q, k, v, e, f = (t.to(ct) for t in (q, k, v, e, f))
    if valid is not None:
        w = valid[:, None, :, None].to(ct)  # (B, 1, Nk, 1)
        k, v = k * w, v * w
    kp = torch.matmul(e, k)  # (Kp, Nk) @ (B, Hk, Nk, D) -> (B, Hk, Kp, D)
    vp = torch.matmul(f, v)  # (B, Hk, Kp, Dv)
    kp, vp = expand_kv(kp, Hq // Hk), expand_kv(vp, Hq // Hk)  # (B, Hq, Kp, .)
    kt = (kp * scale).transpose(-1, -2)  # (B, Hq, D, Kp); scale folded into the small side
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, kt, vp)):
        s = torch.matmul(q, kt)  # (B, Hq, Nq, Kp)
        return torch.matmul(torch.softmax(s, dim=-1), vp).to(in_dtype)  # (B, Hq, Nq, Dv)
    # no autograd graph: the (Nq, Kp) scores live one block of query rows at a time
    out = q.new_empty(B, Hq, Nq, vp.shape[-1])  # (B, Hq, Nq, Dv)
    rows = max(1, _INFERENCE_BLOCK_ELEMENTS // (B * Hq * kt.shape[-1]))
    for i0 in range(0, Nq, rows):
        s = torch.matmul(q[:, :, i0:i0 + rows], kt)  # (B, Hq, rows, Kp)
        out[:, :, i0:i0 + rows] = torch.matmul(torch.softmax(s, dim=-1), vp)
    return out.to(in_dtype)


# ---------------------------------------------------------------------------------------------
# Variant spec and module core
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linformer(Variant):
    """Linformer (Wang et al. 2020): keys and values projected along N to proj_dim rows.

    max_len: L, the longest key sequence (the projections are (proj_dim, L)). sharing: "none"
    (per kv head), "headwise" (shared by heads, the peer's default) or "kv" (E = F). Non-causal
    by construction; masks: key padding only. Cost O(N * proj_dim * D).
    """

    max_len: int
    proj_dim: int = 256
    sharing: str = "headwise"

    name = "linformer"

    def __post_init__(self):
        pos_int("Linformer", "max_len", self.max_len)
        pos_int("Linformer", "proj_dim", self.proj_dim)
        if self.sharing not in SHARING:
            raise ValueError(f"Linformer: sharing must be one of {SHARING}, got {self.sharing!r}")

    def causal_version(self):
        raise ValueError("Linformer is non-causal by construction (each projected key mixes every position, "
                         "future ones included) and cannot be a decoder's self-attention")

    def decode_reason(self) -> str | None:
        return "Linformer projects the whole key sequence and is non-causal, so it cannot decode"

    def build_core(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return LinformerCore(self, num_kv_heads)


class LinformerCore(nn.Module):
    """Holds E and F ((Kp, L), or (Hk, Kp, L) with sharing="none"; F is E with sharing="kv") and
    applies ``linformer_attention``. Init as the peer: uniform(-1/sqrt(Kp), 1/sqrt(Kp)). For the
    paper's layerwise sharing, assign one layer's ``e`` (and ``f``) Parameter to the others."""

    def __init__(self, spec: Linformer, num_kv_heads: int = 1):
        super().__init__()
        self.spec = spec
        shape = (spec.proj_dim, spec.max_len)
        if spec.sharing == "none":
            shape = (num_kv_heads, *shape)
        bound = 1.0 / math.sqrt(spec.proj_dim)
        self.e = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.f = None if spec.sharing == "kv" else nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

    def forward(self, q, k, v, *, mask, bias, dropout_p, need_weights, cache, query_valid=None):
        return linformer_attention(q, k, v, self.e, self.f, mask=mask), None


__all__ = ["linformer_attention", "Linformer", "LinformerCore", "SHARING"]
