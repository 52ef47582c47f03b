"""Tests use the package's tolerance table (attnkit.tolerances); see its docstring."""

import torch

from attnkit.tolerances import BACKEND_FACTOR, GRAD_FACTOR, TOL, tol

__all__ = ["TOL", "BACKEND_FACTOR", "GRAD_FACTOR", "tol", "assert_close"]


def assert_close(actual, expected, dtype=None, backend="reference", grad=False, msg=""):
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol(dtype, backend, grad), msg=msg or None)
