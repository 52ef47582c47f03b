"""The reference backend (the spec) against a per-row brute force, and its numeric guarantees.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit._numerics import compute_dtype, expand_kv, safe_softmax
from tests.strategies import Shape, bool_masks, make_qkv, mask_specs, shapes
from tests.tolerances import tol


def brute_force(q, k, v, allowed, bias, scale, softcap):
    """Python loop over (b, h, i): softmax over allowed keys only, zeros when there are none."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.zeros(B, Hq, Nq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hk)
            for i in range(Nq):
                js = [j for j in range(Nk) if allowed[b, h, i, j]]
                if not js:
                    continue
                s = []
                for j in js:
                    x = scale * float(q[b, h, i] @ k[b, hk, j])
                    if softcap is not None:
                        x = softcap * math.tanh(x / softcap)
                    s.append(x + float(bias[b, h, i, j]))
                m = max(s)
                e = [math.exp(x - m) for x in s]
                z = sum(e)
                for w, j in zip(e, js):
                    out[b, h, i] += (w / z) * v[b, hk, j]
    return out


@settings(max_examples=30, deadline=None, derandomize=True)
@given(shapes(max_len=7), st.data())
def test_reference_equals_brute_force(shape, data):
    B, Hq, _, Nq, Nk = shape[:5]
    q, k, v = make_qkv(shape, seed=data.draw(st.integers(0, 99)), requires_grad=False)
    mask = data.draw(st.one_of(st.none(), mask_specs(shape), bool_masks(shape)))
    bias = torch.randn(B, Hq, Nq, Nk, dtype=torch.float64) if data.draw(st.booleans()) else None
    softcap = data.draw(st.sampled_from([None, 0.7]))
    scale = data.draw(st.sampled_from([None, 0.4]))
    out = attnkit.attention(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap, backend="reference")
    if mask is None:
        allowed = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool)
    elif isinstance(mask, torch.Tensor):
        allowed = torch.broadcast_to(mask, (B, Hq, Nq, Nk))
    else:
        allowed = mask.to_dense(Nq, Nk, batch=B, heads=Hq)
    want = brute_force(q, k, v, allowed, bias if bias is not None else torch.zeros(B, Hq, Nq, Nk),
                       scale or shape.D ** -0.5, softcap)
    torch.testing.assert_close(out, want, **tol(torch.float64))


def test_softcap_applies_before_bias_and_mask():
    """s = softcap(scale * q.k) + bias: a bias larger than the cap is not capped."""
    q, k, v = make_qkv(Shape(1, 1, 1, 2, 3, 2, 2), requires_grad=False)
    bias = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out, w = attnkit.attention(q, k, v, bias=bias, softcap=1.0, scale=1.0, return_weights=True, backend="reference")
    s = torch.tanh(q @ k.transpose(-1, -2)) + bias
    torch.testing.assert_close(w, torch.softmax(s, -1), **tol(torch.float64))
    assert float(w[0, 0, 0, 1]) > 0.9  # the capped scores are in [-1, 1]; the bias of 5 dominates


def test_safe_softmax_rows():
    s = torch.tensor([[1.0, 2.0, float("-inf")], [float("-inf")] * 3, [1e4, -1e4, 1e4]],
                     dtype=torch.float64, requires_grad=True)
    p = safe_softmax(s)
    torch.testing.assert_close(p[0, :2], torch.softmax(s[0, :2], 0))
    assert p[0, 2] == 0 and bool((p[1] == 0).all())
    torch.testing.assert_close(p[2], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))  # no overflow
    (p * torch.arange(3.0, dtype=torch.float64)).sum().backward()
    assert bool(torch.isfinite(s.grad).all()) and bool((s.grad[1] == 0).all())


def test_fully_masked_rows_give_zero_weights_and_grads():
    shape = Shape(1, 2, 1, 5, 3, 2, 2)  # Nq > Nk: causal rows 0, 1 see no key
    q, k, v = make_qkv(shape)
    bias = torch.zeros(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    out, w = attnkit.attention(q, k, v, mask=M.causal(), bias=bias, return_weights=True, backend="reference")
    assert bool((w[:, :, :2] == 0).all()) and bool((out[:, :, :2] == 0).all())
    torch.testing.assert_close(w[:, :, 2:].sum(-1), torch.ones(1, 2, 3, dtype=torch.float64))
    (out.sum() + w.sum()).backward()
    for t in (q, k, v, bias):
        assert bool(torch.isfinite(t.grad).all())
    assert bool((q.grad[:, :, :2] == 0).all()) and bool((bias.grad[:, :, :2] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    assert compute_dtype(dtype) == torch.float32 and compute_dtype(torch.float64) == torch.float64
    shape = Shape(1, 2, 2, 4, 300, 8, 8)  # a long key sum: half accumulation would lose digits
    q, k, v = make_qkv(shape, dtype=dtype, requires_grad=False)
    out = attnkit.attention(q, k, v, mask=M.causal(), backend="reference")
    assert out.dtype == dtype
    want = attnkit.attention(q.double(), k.double(), v.double(), mask=M.causal(), backend="reference")
    torch.testing.assert_close(out.double(), want, **tol(dtype))
    # Exactly the float32 computation, rounded once at the end.
    f32 = attnkit.attention(q.float(), k.float(), v.float(), mask=M.causal(), backend="reference")
    assert torch.equal(out, f32.to(dtype))


def test_expand_kv_groups():
    x = torch.arange(2 * 2 * 1 * 1.0).view(2, 2, 1, 1)
    assert expand_kv(x, 3)[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]]
    assert expand_kv(x, 1) is x


def test_weights_are_returned_in_input_dtype_and_rows_sum_to_one():
    q, k, v = make_qkv(Shape(2, 2, 2, 3, 4, 2, 2), dtype=torch.float32, requires_grad=False)
    out, w = attnkit.attention(q, k, v, return_weights=True, backend="reference")
    assert w.dtype == torch.float32 and w.shape == (2, 2, 3, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3), **tol(torch.float32))
