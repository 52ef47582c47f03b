"""ALiBi: attention with linear biases (Press, Smith & Lewis 2022, "Train Short, Test Long", arXiv:2108.12409).

Legend: B batch, H query heads, Nq queries, Nk keys; q, k are positions (q in key coordinates).

bias(h, q, k) = -slope[h] * (q - k)        causal form (the paper; use with a causal mask)
bias(h, q, k) = -slope[h] * |q - k|        symmetric form (bidirectional encoders)

Slopes: for H a power of two, the geometric sequence starting at 2^(-8/H) with ratio 2^(-8/H)
(H=8: 1/2, 1/4, ..., 1/256). Otherwise, with P the largest power of two below H, the P slopes
for P followed by every other slope of 2P, taking the first H - P of them (the paper's code).

The spec is evaluated from index tensors (per tile in tiled backends): it never builds an
Nq x Nk tensor except in ``to_dense``. Cost O(1) memory per score; no parameters.
"""

from __future__ import annotations

import math

import torch

from ..biases import Bias


def _slopes_power_of_2(n: int) -> list[float]:
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]


def _slopes(n: int) -> list[float]:
    if math.log2(n).is_integer():
        return _slopes_power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return _slopes_power_of_2(closest) + _slopes(2 * closest)[0::2][: n - closest]


def alibi_slopes(num_heads: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The ALiBi paper's head slopes, (num_heads,) tensor (computed in Python floats, then cast).

    Examples: 8 -> 2^-1 .. 2^-8; 6 -> 2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3;
    12 -> 2^-1 .. 2^-8, 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"alibi_slopes: num_heads must be an int > 0, got {num_heads!r}")
    return torch.tensor(_slopes(num_heads), dtype=dtype, device=device)


class ALiBi(Bias):
    """ALiBi bias spec: ``bias(b, h, q, k) = -slope[h] * distance(q, k)``.

    Args:
        num_heads: number of query heads H (the call's Hq must equal it).
        symmetric: False = causal form -slope * (q - k) (pair it with ``masks.causal()``, as in
            the paper; keys after the query would get a positive bias); True = -slope * |q - k|.
        slopes: optional (H,) float tensor replacing the paper's slopes (e.g. learned or scaled).

    Usage::

        attnkit.attention(q, k, v, bias=ALiBi(8), mask=masks.causal())
        ALiBi(8).to_dense(16, 16, heads=8)        # (1, 8, 16, 16) for pictures
    """

    def __init__(self, num_heads: int, *, symmetric: bool = False, slopes: torch.Tensor | None = None):
        if slopes is None:
            slopes = alibi_slopes(num_heads)
        elif not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point() or slopes.shape != (num_heads,):
            got = f"{slopes.dtype} {tuple(slopes.shape)}" if isinstance(slopes, torch.Tensor) else type(slopes).__name__
            raise ValueError(f"ALiBi: slopes must be a float tensor of shape (num_heads,) = ({num_heads},), got {got}")
        self.num_heads, self.symmetric, self.slopes = num_heads, bool(symmetric), slopes

    @property
    def device(self) -> torch.device:
        return self.slopes.device

    def check(self, nq: int, nk: int, *, batch: int = 1, heads: int = 1) -> None:
        if heads != self.num_heads:
            raise ValueError(f"ALiBi was built for {self.num_heads} heads but the input has Hq={heads} query heads")

    def __call__(self, b, h, q, k) -> torch.Tensor:
        slopes = self._slopes(h.device)
        if h.device.type == "cpu" and h.numel() and int(h.max()) >= self.num_heads:
            raise ValueError(f"ALiBi was built for {self.num_heads} heads but was asked for head {int(h.max())}")
        # Convert the (small) index tensors first: integer differences below 2^24 are exact in float32,
        # and the full-size work is one subtraction and one multiplication (abs for symmetric).
        qf, kf = q.to(slopes.dtype), k.to(slopes.dtype)
        if self.symmetric:
            return slopes[h] * torch.minimum(kf - qf, qf - kf)  # -|q - k| (x - x = +0.0: no -0.0)
        return slopes[h] * (kf - qf)  # -slope * (q - k), +0.0 on the diagonal

    translation_invariant = True

    @property
    def linear_in_offset(self) -> bool:
        return not self.symmetric  # slope * (k - q); the symmetric form's |k - q| is not linear

    def _slopes(self, device) -> torch.Tensor:
        """The slopes on ``device`` in at least float32: positions above 256 are not exact in
        bfloat16 (above 2048 in float16), so half-precision slopes (a module cast with
        ``.to(torch.bfloat16)``) would shift distances by whole positions. The bias is then float32,
        which every backend adds to float32 scores for half inputs."""
        return self.slopes.to(device=device, dtype=torch.promote_types(self.slopes.dtype, torch.float32))

    def relative(self, h, r) -> torch.Tensor:
        """-slope[h] * distance for offsets r = k - q (what ``__call__`` gives for q, k with k - q = r)."""
        slopes = self._slopes(h.device)
        rf = r.to(slopes.dtype)
        return slopes[h] * (torch.minimum(rf, -rf) if self.symmetric else rf)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.slopes,) if self.slopes.requires_grad else ()

    def __repr__(self) -> str:
        return f"ALiBi({self.num_heads}{', symmetric=True' if self.symmetric else ''})"


def show_alibi(num_heads: int = 8, symmetric: bool = False) -> ALiBi:
    """The spec ``attnkit show "alibi(8)"`` draws: ``ALiBi(num_heads, symmetric=symmetric)``."""
    return ALiBi(num_heads, symmetric=symmetric)


__all__ = ["alibi_slopes", "ALiBi", "show_alibi"]
