"""Tolerance table per dtype and backend, used by tests and by ``attnkit demo``.

Values are (atol, rtol) for outputs; gradients use GRAD_FACTOR times them. They come from the
unit roundoff u of each dtype times a growth allowance for sums of up to ~1e3 terms (about
1e3 * u, rounded), not from trial and error: float64 u = 1.1e-16, float32 u = 6e-8,
float16 u = 4.9e-4, bfloat16 u = 3.9e-3 (half types accumulate in float32, so their error is
dominated by one rounding of inputs and outputs: a few u).
"""

from __future__ import annotations

import torch

TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Backends that change the summation order (tiles, online softmax) get this extra factor.
BACKEND_FACTOR = {"reference": 1.0, "sdpa": 2.0, "blockwise": 4.0, "flex": 4.0}
GRAD_FACTOR = 10.0


def tol(dtype: torch.dtype, backend: str = "reference", grad: bool = False) -> dict[str, float]:
    """{"atol": ..., "rtol": ...} for comparing a result in ``dtype`` with a float64 reference."""
    atol, rtol = TOL[dtype]
    f = BACKEND_FACTOR.get(backend, 4.0) * (GRAD_FACTOR if grad else 1.0)
    return {"atol": atol * f, "rtol": rtol * f}


def within(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, backend: str = "reference") -> bool:
    t = tol(dtype, backend)
    a, e = actual.to(torch.float64), expected.to(torch.float64)
    return bool(((a - e).abs() <= t["atol"] + t["rtol"] * e.abs()).all())
