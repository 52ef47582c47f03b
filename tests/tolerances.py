"""Tolerance table per dtype (and backend), used by every comparison against the reference.

Values are (atol, rtol) for outputs; gradients use GRAD_FACTOR times them. They come from the
unit roundoff of each dtype times a growth allowance for sums of up to ~1e3 terms, not from
trial and error: float64 u = 1.1e-16, float32 u = 6e-8, bfloat16 u = 3.9e-3, float16 u = 4.9e-4.
"""

import torch

TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Backends that change the summation order by tiles (online softmax) get this extra factor.
BACKEND_FACTOR = {"reference": 1.0, "sdpa": 2.0, "blockwise": 4.0, "flex": 4.0}
GRAD_FACTOR = 10.0


def tol(dtype: torch.dtype, backend: str = "reference", grad: bool = False) -> dict:
    atol, rtol = TOL[dtype]
    f = BACKEND_FACTOR.get(backend, 4.0) * (GRAD_FACTOR if grad else 1.0)
    return {"atol": atol * f, "rtol": rtol * f}


def assert_close(actual, expected, dtype=None, backend="reference", grad=False, msg=""):
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol(dtype, backend, grad), msg=msg or None)
