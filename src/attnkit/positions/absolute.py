"""Absolute position embeddings added to token embeddings: sinusoidal (Vaswani et al. 2017,
"Attention Is All You Need", Sec. 3.5) and learned (BERT / GPT-2 style).

Legend: B batch, N positions, E embedding dim.

Sinusoidal: PE[pos, 2i] = sin(pos / base^(2i / E)), PE[pos, 2i + 1] = cos(pos / base^(2i / E)),
base = 10000 (interleaved sin/cos, as in the paper; Transformer-XL's R uses cat[sin, cos]).
Computed in float64, cached, cast to the input dtype. Learned: a (max_len, E) table.
Both are added to (B, N, E) inputs at positions ``offset + arange(N)`` (or an explicit
(N,) / (B, N) position tensor); cost O(N * E).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validate import shape_str


def sinusoidal_table(n: int, dim: int, *, base: float = 10000.0, offset: int = 0,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(n, dim) table of Vaswani sinusoids for positions offset .. offset + n - 1 (float64 math)."""
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"sinusoidal_table: dim must be an even int > 0, got {dim!r}")
    pos = torch.arange(offset, offset + n, dtype=torch.float64)[:, None]  # (n, 1)
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (E/2,)
    ang = pos * inv[None, :]  # (n, E/2)
    return torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2).to(dtype=dtype, device=device)  # (n, E)


def _positions(x: torch.Tensor, positions, offset: int, dim: int) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = shape_str(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be (B, N, E) with E = {dim}, got {got}")
    if positions is None:
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        return None
    if offset != 0:
        raise ValueError("pass either positions or offset, not both")
    B, N, _ = x.shape
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.dtype == torch.bool:
        raise TypeError("positions must be an integer tensor (N,) or (B, N)")
    if positions.shape not in ((N,), (B, N)):
        raise ValueError(f"positions must have shape (N,) = ({N},) or (B, N) = ({B}, {N}), got {shape_str(positions)}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"positions must be >= 0, got min {int(positions.min())}")
    return positions.to(device=x.device, dtype=torch.int64)


class SinusoidalPositionalEmbedding(nn.Module):
    """x + PE[positions] for x (B, N, E); no parameters.

    Usage: ``emb = SinusoidalPositionalEmbedding(512); h = emb(tok_emb)``; decoding token t:
    ``emb(x_t, offset=t)``.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        sinusoidal_table(1, dim, base=base)  # validates dim
        self.dim, self.base = dim, float(base)
        self._cache: dict[tuple, torch.Tensor] = {}

    def table(self, n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """(n, E) table for positions 0..n-1 (cached per device and dtype, grows by doubling)."""
        key = (torch.device(device) if device is not None else torch.device("cpu"), dtype)
        t = self._cache.get(key)
        if t is None or t.shape[0] < n:
            size = max(16, 1 << max(n - 1, 1).bit_length())
            t = sinusoidal_table(size, self.dim, base=self.base, dtype=dtype, device=key[0])
            self._cache[key] = t
        return t[:n]

    def forward(self, x: torch.Tensor, *, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, E) -> x + PE, same shape and dtype."""
        pos = _positions(x, positions, offset, self.dim)
        N = x.shape[1]
        if pos is None:
            pe = self.table(offset + N, device=x.device, dtype=x.dtype)[offset:]  # (N, E)
        else:
            pe = self.table(int(pos.max()) + 1 if pos.numel() else 1, device=x.device, dtype=x.dtype)[pos]
        return x + pe  # (B, N, E)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


class LearnedPositionalEmbedding(nn.Module):
    """x + W[positions] with a learned table W (max_len, E) (BERT, GPT-2).

    Positions at or past ``max_len`` raise (a learned table cannot extrapolate).
    Usage: ``emb = LearnedPositionalEmbedding(1024, 512); h = emb(tok_emb, offset=cache_len)``.
    """

    def __init__(self, max_len: int, dim: int, *, init_std: float = 0.02):
        super().__init__()
        if not isinstance(max_len, int) or max_len <= 0 or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"LearnedPositionalEmbedding: max_len and dim must be ints > 0, got {max_len!r}, {dim!r}")
        self.max_len, self.dim = max_len, dim
        self.weight = nn.Parameter(torch.empty(max_len, dim))  # (max_len, E)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x: torch.Tensor, *, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, E) -> x + W[positions], same shape (result in the promoted dtype of x and W)."""
        pos = _positions(x, positions, offset, self.dim)
        N = x.shape[1]
        last = (offset + N - 1) if pos is None else (int(pos.max()) if pos.numel() else -1)
        if last >= self.max_len:
            raise ValueError(f"position {last} is past max_len={self.max_len} of this learned table")
        pe = self.weight[offset:offset + N] if pos is None else self.weight[pos]  # (N, E) or (B, N, E)
        return x + pe.to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, dim={self.dim}"


__all__ = ["sinusoidal_table", "SinusoidalPositionalEmbedding", "LearnedPositionalEmbedding"]
