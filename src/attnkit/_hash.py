"""Counter-based hashing: reproducible random numbers from integer coordinates.

Dropout patterns and BigBird's random blocks are functions of (seed, coordinates), not of a
generator's state, so every backend (and a backward pass that recomputes a tile) regenerates
exactly the same bits for the same (seed, b, h, i, j), whatever order it visits tiles in.

The mixer is the "lowbias32" integer hash (Chris Wellons, hash-prospector). It works on int64
tensors holding 32-bit values; multiplications may wrap past 2**63, which keeps the low 32 bits
exact (two's complement), and the result is masked back to 32 bits.

Seeds are ints in [0, 2**64): both 32-bit halves enter the hash (a seed below 2**32 hashes as it
always did), so seeds that differ in any bit give different patterns; others raise.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of 32-bit values; returns values in [0, 2**32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def _mix32_int(x: int) -> int:
    """lowbias32 on a Python int (same bits as ``mix32``)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _seed_state(seed: int) -> int:
    """The hash state of a seed in [0, 2**64) (low half, then the high half if nonzero)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    h = _mix32_int(seed & _M32)
    if seed >> 32:
        h = _mix32_int(h ^ _mix32_int((seed >> 32) + 0x9E3779B9))
    return h


def hash_coords(seed: int, *coords: torch.Tensor | int) -> torch.Tensor:
    """Hash (seed, c0, c1, ...) to uniform 32-bit integers, broadcasting the coordinates.

    The seed and Python-int coordinates are mixed as Python ints, so no tensor constant is
    created: flex's compiled mask_mod (BigBird's random blocks) cannot lift constants made
    inside it.
    """
    h: torch.Tensor | int = _seed_state(seed)
    for c in coords:
        if isinstance(c, torch.Tensor):
            hc = mix32(c.to(torch.int64) + 0x9E3779B9)
            h = mix32(hc ^ (h.to(hc.device) if isinstance(h, torch.Tensor) else h))
        elif isinstance(h, torch.Tensor):
            h = mix32(h ^ _mix32_int(int(c) + 0x9E3779B9))
        else:
            h = _mix32_int(h ^ _mix32_int(int(c) + 0x9E3779B9))
    return h if isinstance(h, torch.Tensor) else torch.tensor(h, dtype=torch.int64)


def uniform(seed: int, *coords: torch.Tensor | int) -> torch.Tensor:
    """Uniform float32 numbers in [0, 1) from (seed, coords); 24 bits of resolution."""
    return (hash_coords(seed, *coords) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def dropout_keep(seed: int, p: float, b, h, q, k) -> torch.Tensor:
    """Bool keep-mask for dropout probability p at coordinates (b, h, q, k) (broadcast)."""
    return uniform(seed, b, h, q, k) >= p
