"""attnkit.tolerances: the table is tight enough to bite. A result off by a relative 1e-9 fails
the float64 tolerance of every backend, and a gradient multiplied by 1.5 fails every dtype's
gradient tolerance (bfloat16 blockwise included), while the real results pass."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit.tolerances import BACKEND_FACTOR, TOL, tol, within
from tests.strategies import Shape, make_qkv


def _passes(actual, expected, **t) -> bool:
    try:
        torch.testing.assert_close(actual, expected, **t)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("backend", sorted(BACKEND_FACTOR))
def test_float64_tolerance_is_a_few_thousand_ulp(backend):
    q, k, v = make_qkv(Shape(2, 2, 2, 9, 9, 8, 8), requires_grad=False)
    out = attnkit.attention(q, k, v, mask=M.causal(), backend="reference")
    for grad in (False, True):
        t = tol(torch.float64, backend, grad)
        assert _passes(out * (1 + 1e-13), out, **t)
        assert not _passes(out * (1 + 1e-9), out, **t), (backend, grad, t)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("backend", ["reference", "sdpa", "blockwise"])
def test_a_gradient_times_1_5_fails(dtype, backend):
    """The gradient from ``backend`` in ``dtype`` passes its tolerance against float64; the
    same gradient multiplied by 1.5 does not."""
    shape = Shape(2, 4, 2, 33, 40, 16, 16)
    q, k, v = make_qkv(shape, dtype=dtype, seed=1)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = M.causal() & M.key_padding(torch.tensor([40, 31]))
    out = attnkit.attention(q, k, v, mask=mask, backend=backend)
    ref = attnkit.attention(*ref_in, mask=mask, backend="reference")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, ref_in, g)
    t = tol(dtype, backend, grad=True)
    for name, a, b in zip("qkv", grads, want):
        assert _passes(a.double(), b, **t), (name, (a.double() - b).abs().max())
        assert not _passes(1.5 * a.double(), b, **t), f"{dtype} {backend} grad {name} * 1.5 passes {t}"


def test_within_agrees_with_assert_close():
    e = torch.linspace(-3, 3, 50, dtype=torch.float64)
    for dtype in TOL:
        t = tol(dtype, "blockwise")
        inside = e + 0.5 * (t["atol"] + t["rtol"] * e.abs())
        outside = e + 2.0 * (t["atol"] + t["rtol"] * e.abs())
        assert within(inside, e, dtype, "blockwise") and _passes(inside, e, **t)
        assert not within(outside, e, dtype, "blockwise") and not _passes(outside, e, **t)
