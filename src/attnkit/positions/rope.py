"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv:2104.09864).

Legend: B batch, H heads, N positions, D head dim, R rotary dim (R <= D, even), P = R / 2 pairs.

Channel pair p of a query/key at position m is rotated by the angle m * theta_p with
theta_p = base^(-2p / R). Then q_m . k_n depends on m - n only (for the rotated channels).

Two conventions for which channels form pair p:
- half-split (GPT-NeoX, Hugging Face Llama ``rotate_half``): (x[p], x[p + P]);
- interleaved (Meta LLaMA complex pairs, GPT-J): (x[2p], x[2p + 1]).
They are the same rotation after permuting channels: with ``perm = interleaved_to_half_split(R)``
(= [0, 2, 4, ..., R-2, 1, 3, ..., R-1]), ``half_split(x[..., perm]) == interleaved(x)[..., perm]``.
That is the row permutation of W_q / W_k used when converting Meta checkpoints to Hugging Face.

Partial rotary (GPT-NeoX ``rotary_pct``, GPT-J ``rotary_dim``): only the first R channels are
rotated, with frequencies computed for R; channels R..D-1 pass through unchanged.

Precision: angles m * theta_p and their cos/sin are computed in float64 and cached in float32
(float64 for float64 inputs). Half/bfloat16 inputs are rotated in float32 and cast back, so a
bfloat16 result has one rounding. Cost O(N * D) time and memory; the cache is O(N_max * P).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validate import shape_str


def interleaved_to_half_split(rotary_dim: int) -> torch.Tensor:
    """Channel permutation [0, 2, ..., R-2, 1, 3, ..., R-1] (int64, (R,)), see the module docstring."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int > 0, got {rotary_dim}")
    return torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)])


def rope_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """theta_p = base^(-2p / R) for p = 0..P-1, float64 (P,)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first R = 2 * cos.shape[-1] channels of x.

    x: (..., N, D); cos, sin: broadcastable to (..., N, P). Returns x's shape and dtype. The
    arithmetic is done in cos's dtype (float32 for half inputs), then cast back.
    """
    p = cos.shape[-1]
    r = 2 * p
    if x.shape[-1] < r:
        raise ValueError(f"x has {x.shape[-1]} channels, fewer than the rotary dim {r}: x {shape_str(x)}")
    xr = x[..., :r].to(cos.dtype)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]  # (..., N, P) each
    else:
        x1, x2 = xr[..., :p], xr[..., p:]  # (..., N, P) each
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if interleaved:
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)  # (..., N, P, 2) -> (..., N, R)
    else:
        rot = torch.cat((o1, o2), dim=-1)  # (..., N, R)
    rot = rot.to(x.dtype)
    return rot if r == x.shape[-1] else torch.cat((rot, x[..., r:]), dim=-1)  # (..., N, D)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for (B, H, N, D) queries and keys.

    Args:
        dim: head dim D of the tensors it is applied to.
        base: theta (10000 in RoFormer and LLaMA 1/2; 500000 in LLaMA 3).
        interleaved: False = half-split pairs (NeoX / HF Llama), True = adjacent pairs (Meta, GPT-J).
        rotary_dim: rotate only the first ``rotary_dim`` channels (even, <= dim); default dim.

    Usage::

        rope = RotaryEmbedding(64)
        q, k = rope.apply(q, k)                   # prefill: positions 0..N-1
        q1, k1 = rope.apply(q1, k1, offset=t)     # decoding: new tokens at positions t, t+1, ...
        k_cache = torch.cat([k_cache, k1], dim=2) # cache *rotated* keys, then attention(q1, k_cache, v)

    Cost O(N * D) per call; cos/sin cached up to the longest position seen.
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, rotary_dim: int | None = None):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be an even int > 0, got {dim!r}")
        rotary_dim = dim if rotary_dim is None else rotary_dim
        if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > dim:
            raise ValueError(f"RotaryEmbedding: rotary_dim must be an even int in [2, dim={dim}], got {rotary_dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            raise ValueError(f"RotaryEmbedding: base must be a finite number > 0 (theta, e.g. 10000.0), got {base!r}")
        if not isinstance(interleaved, bool):
            raise TypeError(f"RotaryEmbedding: interleaved must be a bool, got {interleaved!r}")
        self.dim, self.base, self.interleaved, self.rotary_dim = dim, float(base), bool(interleaved), rotary_dim
        # A plain attribute, not a buffer: model.to(torch.bfloat16) must not round the frequencies.
        self.inv_freq = rope_inv_freq(rotary_dim, self.base)  # (P,) float64, CPU
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}, rotary_dim={self.rotary_dim}"

    # -- cos / sin ---------------------------------------------------------------------------
    def cos_sin(self, n: int, *, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of m * theta_p for m = 0..n-1: two (n, P) tensors (cached, grows by doubling)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, ct)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < n:
            size = max(16, 1 << max(n - 1, 1).bit_length())
            ang = torch.arange(size, dtype=torch.float64)[:, None] * self.inv_freq[None, :]  # (L, P)
            cached = (ang.cos().to(device=device, dtype=ct), ang.sin().to(device=device, dtype=ct))
            self._cache[key] = cached
        return cached[0][:n], cached[1][:n]

    def _angles_for(self, positions: torch.Tensor, ct: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
        if positions.numel() == 0:
            z = torch.zeros(*positions.shape, self.rotary_dim // 2, dtype=ct, device=device)
            return z, z
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0:
            raise ValueError(f"positions must be >= 0, got min {lo}")
        cos, sin = self.cos_sin(hi + 1, device=device, dtype=ct)
        idx = positions.to(device=device, dtype=torch.int64)
        return cos[idx], sin[idx]  # (..., N, P)

    # -- apply -------------------------------------------------------------------------------
    def rotate(self, x: torch.Tensor, positions: torch.Tensor | None = None, *, offset: int = 0) -> torch.Tensor:
        """Rotate one (B, H, N, D) tensor at positions ``offset + arange(N)`` or ``positions``.

        positions: optional int tensor (N,) or (B, N), >= 0. Returns (B, H, N, D), x's dtype.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-D tensor (B, H, N, D), got {shape_str(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has head dim {x.shape[-1]} but this RotaryEmbedding was built for dim={self.dim}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        B, H, N, D = x.shape
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        if positions is None:
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise ValueError(f"offset must be an int >= 0, got {offset!r}")
            cos, sin = self.cos_sin(offset + N, device=x.device, dtype=ct)
            cos, sin = cos[offset:], sin[offset:]  # (N, P)
        else:
            if offset != 0:
                raise ValueError("pass either positions or offset, not both (add the offset to positions)")
            if not isinstance(positions, torch.Tensor):
                raise TypeError(f"positions must be an int tensor (N,) or (B, N), got {type(positions).__name__}")
            if positions.shape not in ((N,), (B, N)):
                raise ValueError(f"positions must have shape (N,) = ({N},) or (B, N) = ({B}, {N}), got {shape_str(positions)}")
            cos, sin = self._angles_for(positions, ct, x.device)  # (N, P) or (B, N, P)
            if cos.dim() == 3:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, P)
        return apply_rotary(x, cos, sin, interleaved=self.interleaved)

    def apply(self, q, k: torch.Tensor | None = None, positions: torch.Tensor | None = None, *,
              offset: int = 0):
        """Rotate queries (B, Hq, Nq, D) and keys (B, Hk, Nk, D); returns (q_rot, k_rot).

        ``apply(fn)`` with a single callable keeps ``nn.Module.apply``'s meaning (so
        ``model.apply(init_weights)`` still walks this module).

        - positions=None: keys at ``offset + arange(Nk)``, queries bottom-right aligned at
          ``offset + (Nk - Nq) + arange(Nq)`` (the attnkit convention; equal to the keys' when Nq == Nk).
        - positions: int tensor (N,) or (B, N) for both (requires Nq == Nk; e.g. packed sequences).
        For cached decoding rotate only the new tokens: ``apply(q_new, k_new, offset=cache_len)``.
        """
        if k is None and callable(q) and not isinstance(q, torch.Tensor):
            return super().apply(q)  # nn.Module.apply(fn)
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
            raise ValueError("q and k must be 4-D tensors (B, H, N, D)")
        nq, nk = q.shape[2], k.shape[2]
        if positions is not None:
            if nq != nk:
                raise ValueError(
                    f"positions given but Nq={nq} != Nk={nk}; rotate q and k separately with rotate(x, positions)"
                )
            return self.rotate(q, positions), self.rotate(k, positions)
        if nq > nk:
            raise ValueError(f"Nq={nq} > Nk={nk}: queries cannot be bottom-right aligned; pass positions or use rotate()")
        return self.rotate(q, offset=offset + nk - nq), self.rotate(k, offset=offset)

    def forward(self, q, k, positions=None, *, offset: int = 0):
        return self.apply(q, k, positions, offset=offset)


__all__ = ["RotaryEmbedding", "apply_rotary", "rope_inv_freq", "interleaved_to_half_split"]
