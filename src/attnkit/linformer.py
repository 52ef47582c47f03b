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
- Key padding: padded key and value rows are set to zero before the projection, so padded keys
  contribute nothing; a padded sequence gives the same outputs as the unpadded one (which uses
  the first Nk columns of E, F).
- Non-causal only: every projected key mixes all N positions, including future ones, so no
  causal (or any per-query) mask can be applied after the projection. Such masks raise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import _validate as V
from .masks import And, KeyPadding, KeyValid, Mask

SHARING = ("none", "headwise", "kv")


# ---------------------------------------------------------------------------------------------
# Key padding specs -> (B, Nk) validity (shared by the low-rank / hashing variants)
# ---------------------------------------------------------------------------------------------


def key_valid_tensor(spec, batch: int, num_keys: int, device, *, variant: str,
                     name: str = "key_padding") -> torch.Tensor | None:
    """(B, Nk) bool, True = real key, from ``masks.key_padding`` / ``key_padding_from_bool`` specs.

    Any other spec raises: ``variant`` names the attention kind in the message.
    """
    if spec is None:
        return None
    if isinstance(spec, And):
        a, b = (key_valid_tensor(p, batch, num_keys, device, variant=variant, name=name) for p in spec.parts)
        return a & b
    if isinstance(spec, KeyPadding):
        if spec.lengths.shape[0] != batch:
            raise ValueError(f"{name}: lengths has {spec.lengths.shape[0]} entries, expected batch size B={batch}")
        return torch.arange(num_keys, device=device).unsqueeze(0) < spec.lengths.to(device).unsqueeze(1)  # (B, Nk)
    if isinstance(spec, KeyValid):
        valid = spec.valid
        if valid.dtype != torch.bool or tuple(valid.shape) != (batch, num_keys):
            raise ValueError(f"{name}: the key padding spec covers shape {V.shape_str(valid)} ({valid.dtype}), "
                             f"expected a bool (B, Nk) = ({batch}, {num_keys})")
        return valid.to(device)
    if isinstance(spec, Mask):
        raise ValueError(
            f"{variant} honours only key padding ({name}=masks.key_padding(lengths) or "
            f"masks.key_padding_from_bool(is_pad)), got {spec!r}: its scores are not a dense "
            "(query, key) matrix, so a general mask has nowhere to be applied")
    raise TypeError(f"{name} must be None or a key padding spec from attnkit.masks, got {type(spec).__name__}")


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
                        f: torch.Tensor | None = None, *, key_padding: Mask | None = None,
                        scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """Linformer attention: softmax(scale * q (E k)^T) (F v).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hk, Nk, D). v: (B, Hk, Nk, Dv); Hq a multiple of Hk.
        e: key projection, (Kp, L) shared by heads or (Hk, Kp, L) per kv head, L >= Nk; only its
            first Nk columns are used.
        f: value projection of the same shape as ``e``; None shares ``e`` (key-value sharing).
        key_padding: ``masks.key_padding(lengths)`` or ``masks.key_padding_from_bool(is_pad)``;
            padded keys/values are zeroed before the projection and contribute nothing.
            Any other mask spec raises (Linformer has no (query, key) score matrix).
        scale: default 1/sqrt(D).
        causal: must be False: a projected key mixes every position, future ones included.

    Returns: (B, Hq, Nq, Dv) in q's dtype (half/bfloat16 computed in float32).
    Cost: O(Nq * Kp * D + Nk * Kp * (D + Dv)) time, O(Nq * Kp) memory per head.
    """
    V.check_qkv(q, k, v)
    if causal:
        raise ValueError("linformer_attention: causal=True is not supported: E and F project all Nk keys into "
                         "each of the Kp projected keys, so future positions leak into every row")
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    scale = V.check_scale(scale, D)
    e = _check_projection("e", e, Hk, Nk, q)
    f = e if f is None else _check_projection("f", f, Hk, Nk, q)
    if f.shape != e.shape:
        raise ValueError(f"f must have the same shape as e, got e {V.shape_str(e)} and f {V.shape_str(f)}")
    in_dtype = q.dtype
    ct = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
    valid = key_valid_tensor(key_padding, B, Nk, q.device, variant="linformer_attention")
    q, k, v, e, f = (t.to(ct) for t in (q, k, v, e, f))
    if valid is not None:
        w = valid[:, None, :, None].to(ct)  # (B, 1, Nk, 1)
        k, v = k * w, v * w
    kp = torch.matmul(e, k)  # (Kp, Nk) @ (B, Hk, Nk, D) -> (B, Hk, Kp, D)
    vp = torch.matmul(f, v)  # (B, Hk, Kp, Dv)
    g = Hq // Hk
    if g > 1:
        kp, vp = kp.repeat_interleave(g, dim=1), vp.repeat_interleave(g, dim=1)  # (B, Hq, Kp, .)
    s = torch.matmul(q, (kp * scale).transpose(-1, -2))  # (B, Hq, Nq, Kp); scale folded into the small side
    out = torch.matmul(torch.softmax(s, dim=-1), vp)  # (B, Hq, Nq, Dv)
    return out.to(in_dtype)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinformerOptions:
    max_len: int        # L: longest key sequence the projections cover
    proj_dim: int = 256  # Kp
    sharing: str = "headwise"  # "none" | "headwise" | "kv"

    def __post_init__(self):
        for name in ("max_len", "proj_dim"):
            val = getattr(self, name)
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"LinformerOptions.{name} must be an int > 0, got {val!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"LinformerOptions.sharing must be one of {SHARING}, got {self.sharing!r}")


class LinformerProjections(nn.Module):
    """Holds E and F ((Kp, L) or (Hk, Kp, L)) and applies ``linformer_attention``.

    Init as the peer: uniform(-1/sqrt(Kp), 1/sqrt(Kp)). Share one instance between layers for the
    paper's layerwise sharing.
    """

    def __init__(self, options: LinformerOptions, kv_heads: int = 1):
        super().__init__()
        self.options = options
        shape = (options.proj_dim, options.max_len)
        if options.sharing == "none":
            shape = (kv_heads, *shape)
        bound = 1.0 / math.sqrt(options.proj_dim)
        self.e = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.f = None if options.sharing == "kv" else nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

    def forward(self, q, k, v, *, key_padding=None, scale=None, causal=False):
        """q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> (B, Hq, Nq, Dv)."""
        return linformer_attention(q, k, v, self.e, self.f, key_padding=key_padding, scale=scale, causal=causal)


class LinformerAttention(nn.Module):
    """Multi-head Linformer self/cross attention on (B, N, E) inputs.

    q/k/v/out projections are nn.Linear (no bias on q, k, v, bias on out: the peer's layout).
    ``forward(x, context=None, *, key_padding=None)`` -> (B, N, E).
    """

    def __init__(self, embed_dim: int, num_heads: int, options: LinformerOptions, *,
                 head_dim: int | None = None, projections: LinformerProjections | None = None):
        super().__init__()
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} (or pass head_dim)")
            head_dim = embed_dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(embed_dim, inner, bias=False)
        self.to_k = nn.Linear(embed_dim, inner, bias=False)
        self.to_v = nn.Linear(embed_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, embed_dim)
        self.projections = projections if projections is not None else LinformerProjections(options, num_heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, key_padding=None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, E), got shape {V.shape_str(x)}")
        ctx = x if context is None else context
        B, Nq, _ = x.shape
        Nk, H = ctx.shape[1], self.num_heads
        q = self.to_q(x).view(B, Nq, H, -1).transpose(1, 2)  # (B, H, Nq, D)
        k = self.to_k(ctx).view(B, Nk, H, -1).transpose(1, 2)  # (B, H, Nk, D)
        v = self.to_v(ctx).view(B, Nk, H, -1).transpose(1, 2)  # (B, H, Nk, D)
        out = self.projections(q, k, v, key_padding=key_padding)  # (B, H, Nq, D)
        return self.to_out(out.transpose(1, 2).reshape(B, Nq, -1))  # (B, Nq, E)
