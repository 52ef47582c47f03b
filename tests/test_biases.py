"""attnkit.biases: bias specs against loops, sums, TensorBias, and gradients into tensors().

Legend: B batch, H heads, Nq queries, Nk keys; pos = i + Nk - Nq (query row i in key coordinates).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import biases as Bi
from attnkit import masks as M
from tests.strategies import Shape, make_qkv, positions
from tests.tolerances import tol

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def loop_bias(fn, B, H, nq, nk):
    out = torch.zeros(B, H, nq, nk, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i, pos in enumerate(positions(nq, nk)):
                for j in range(nk):
                    out[b, h, i, j] = fn(b, h, pos, j)
    return out


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3))
def test_from_function_uses_key_coordinates(nq, nk, H):
    spec = Bi.from_function(lambda b, h, q, k: (0.5 * h - 0.1 * (q - k)).double())
    want = loop_bias(lambda b, h, pos, j: 0.5 * h - 0.1 * (pos - j), 1, H, nq, nk)
    got = spec.to_dense(nq, nk, heads=H, dtype=torch.float64)
    torch.testing.assert_close(got.expand(1, H, nq, nk), want)


def test_to_dense_keeps_ignored_dims_size_one():
    spec = Bi.from_function(lambda b, h, q, k: (k - q).float())
    assert spec.to_dense(3, 4, batch=2, heads=5).shape == (1, 1, 3, 4)
    assert spec.to_dense(3, 4, dtype=torch.float64).dtype == torch.float64


def test_sum_of_biases():
    t1 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    a = Bi.from_function(lambda b, h, q, k: t1[h] * (q - k), tensors=[t1], name="a")
    c = Bi.from_function(lambda b, h, q, k: t2[b] + 0 * k, tensors=[t2], name="c")
    d = Bi.from_function(lambda b, h, q, k: (q * k).double(), name="d")
    s = a + c + d
    want = loop_bias(lambda b, h, pos, j: float(t1[h].detach()) * (pos - j) + float(t2[b].detach()) + pos * j, 2, 3, 4, 5)
    torch.testing.assert_close(s.to_dense(4, 5, batch=2, heads=3, dtype=torch.float64).expand(2, 3, 4, 5), want)
    assert s.tensors() == (t1, t2)
    assert repr(s) == "from_function(a) + from_function(c) + from_function(d)"
    with pytest.raises(TypeError, match="bias specs add only to other bias specs, got Tensor"):
        a + torch.zeros(1)


def test_tensor_bias_is_indexed_by_query_row():
    t = torch.randn(2, 1, 3, 5, dtype=torch.float64)
    spec = Bi.TensorBias(t, 3, 5)
    b, h = torch.arange(2).view(-1, 1, 1, 1), torch.arange(4).view(1, -1, 1, 1)
    q, k = torch.tensor(positions(3, 5)).view(1, 1, -1, 1), torch.arange(5).view(1, 1, 1, -1)
    assert torch.equal(spec(b, h, q, k), t.expand(2, 4, 3, 5))
    assert spec.tensors()[0] is t and torch.equal(spec.to_dense(3, 5), t)
    assert torch.equal(Bi.TensorBias(t[0, 0], 3, 5).to_dense(3, 5), t[:1, :1])


def test_tensor_bias_checks_sizes_and_dtype():
    with pytest.raises(TypeError, match=r"TensorBias: tensor must be a floating-point tensor with <= 4 dims, got torch.int64 \(3, 5\)"):
        Bi.TensorBias(torch.zeros(3, 5, dtype=torch.long), 3, 5)
    with pytest.raises(ValueError, match=r"bias tensor of shape \(1, 1, 3, 5\) \(for Nq=3, Nk=5\) does not broadcast"):
        Bi.TensorBias(torch.zeros(3, 5), 3, 5).check(4, 5, batch=1, heads=1)


def test_from_function_errors():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        Bi.from_function(3)
    bad = Bi.from_function(lambda b, h, q, k: q > k, name="boolish")
    with pytest.raises(TypeError, match="bias function boolish must return a float tensor, got torch.bool"):
        bad.to_dense(3)
    q, k, v = make_qkv(Shape(1, 1, 1, 2, 2, 2, 2))
    with pytest.raises(TypeError, match="boolish must return a float tensor"):
        attnkit.attention(q, k, v, bias=bad)


def test_picture():
    spec = Bi.from_function(lambda b, h, q, k: (k - q).float())
    rows = spec.picture(3, 4).splitlines()
    assert len(rows) == 3 and [float(x) for x in rows[0].split()] == [-1.0, 0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# Gradients into tensors() through the reference
# ---------------------------------------------------------------------------------------------


def dense_formula(q, k, v, bias, mask, scale):
    """Plain float64 attention from dense tensors (rows with no allowed key are not used here)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2)) * scale + bias
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("nq, nk", [(4, 4), (2, 6), (1, 5)])
def test_gradients_reach_bias_tensors(nq, nk):
    """A T5-like learnable table bias: grads of table, q, k, v equal those of the dense formula."""
    H, nbuckets = 2, 2 * nk + 1
    table = torch.randn(nbuckets, H, dtype=torch.float64, requires_grad=True)
    spec = Bi.from_function(lambda b, h, qi, ki: table[(ki - qi).clamp(-nk, nk) + nk, h], tensors=[table])
    q, k, v = make_qkv(Shape(2, H, 1, nq, nk, 3, 2), seed=4)
    mask = M.causal()
    out = attnkit.attention(q, k, v, bias=spec, mask=mask, backend="reference")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, table], g)
    dense_bias = loop_bias(lambda b, h, pos, j: float(table[min(max(j - pos, -nk), nk) + nk, h].detach()), 1, H, nq, nk)
    # Same dense formula, with the bias built differentiably from the table by indexing.
    idx = (torch.arange(nk).view(1, -1) - torch.tensor(positions(nq, nk)).view(-1, 1)).clamp(-nk, nk) + nk
    bias = table[idx].permute(2, 0, 1).unsqueeze(0)  # (1, H, Nq, Nk)
    torch.testing.assert_close(bias.detach(), dense_bias)
    want = dense_formula(q, k, v, bias, mask.to_dense(nq, nk), q.shape[-1] ** -0.5)
    wgrads = torch.autograd.grad(want, [q, k, v, table], g)
    torch.testing.assert_close(out, want, **tol(torch.float64))
    for a, b in zip(grads, wgrads):
        torch.testing.assert_close(a, b, **tol(torch.float64, grad=True))


def test_bias_tensor_gradcheck():
    q, k, v = make_qkv(Shape(1, 2, 1, 3, 4, 2, 2), seed=5)
    bias = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias, slopes):
        spec = Bi.from_function(lambda b, h, i, j: -slopes[h] * (i - j).abs(), tensors=[slopes])
        t = Bi.TensorBias(bias, 3, 4)
        return attnkit.attention(q, k, v, bias=t + spec, mask=M.causal(), backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v, bias, slopes))


def test_summed_bias_specs_keep_float64_precision_on_every_backend():
    """ALiBi + a float32 function summed in float32 before the cast: 2.3e-8 off on reference/sdpa
    against 4e-16 on blockwise (which adds the parts one by one in the compute dtype)."""
    from attnkit.positions import ALiBi

    q, k, v = make_qkv(Shape(1, 4, 4, 40, 40, 8, 8), requires_grad=False)
    fn = Bi.from_function(lambda b, h, i, j: torch.sin(0.37 * (i * 7 + j).float()) * 1000.0, name="f32")
    summed = ALiBi(4) + fn
    dense = ALiBi(4).to_dense(40, 40, heads=4, dtype=torch.float64) + fn.to_dense(40, 40, dtype=torch.float64)
    assert torch.equal(summed.to_dense(40, 40, heads=4, dtype=torch.float64), dense)
    want = attnkit.attention(q, k, v, bias=dense, mask=M.causal(), backend="reference")
    for backend in ("reference", "sdpa", "blockwise"):
        got = attnkit.attention(q, k, v, bias=summed, mask=M.causal(), backend=backend)
        torch.testing.assert_close(got, want, **tol(torch.float64, backend))


def test_infinite_bias_tensor_entries():
    """+inf is rejected (it made the softmax NaN silently); -inf blocks a pair like a mask."""
    q, k, v = make_qkv(Shape(1, 2, 2, 3, 4, 5, 5), requires_grad=False)
    bias = torch.zeros(3, 4, dtype=torch.float64)
    bias[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"bias has 1 entries equal to \+inf"):
        attnkit.attention(q, k, v, bias=bias)
    bias[1, 2] = float("-inf")
    allowed = torch.ones(3, 4, dtype=torch.bool)
    allowed[1, 2] = False
    torch.testing.assert_close(attnkit.attention(q, k, v, bias=bias), attnkit.attention(q, k, v, mask=allowed))
