"""Shaw relative keys/values: equal to the paper's formula with an explicit (Nq, Nk, D) tensor
(test only) in float64, forward and backward, on random shapes, masks, GQA and Nq != Nk."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks
from attnkit.positions import ShawRelativePosition, _common, shaw_attention
from tests.tolerances import tol


def paper_formula(q, k, v, rel_k, rel_v, allowed, scale):
    """e_ij = (q_i . (k_j + aK_ij)) * scale; out_i = sum_j w_ij (v_j + aV_ij), materialised."""
    Hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    G = Hq // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    K = (rel_k.shape[0] - 1) // 2
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    idx = (j - i).clamp(-K, K) + K  # (Nq, Nk)
    aK = rel_k[idx]  # (Nq, Nk, D): the tensor the implementation never builds
    e = (torch.einsum("bhid,bhjd->bhij", q, k) + torch.einsum("bhid,ijd->bhij", q, aK)) * scale
    if allowed is not None:
        e = e.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(e, -1).nan_to_num(0.0)
    out = w @ v
    if rel_v is not None:
        out = out + torch.einsum("bhij,ijd->bhid", w, rel_v[idx])
    return out


def _mask(kind, B, nq, nk, g, as_tensor):
    if kind == "none":
        return None
    m = {"causal": masks.causal(), "window": masks.sliding_window(2, 1), "empty": masks.key_padding(torch.zeros(B, dtype=torch.long)),
         "causal_window": masks.causal() & masks.sliding_window(3),
         "padding": masks.key_padding(torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(1, nk + 1, (B - 1,), generator=g)]))}[kind]
    return m.to_dense(nq, nk, batch=B, heads=1) if as_tensor else m


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), nq=st.integers(1, 11), extra=st.integers(0, 7), hk=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2]), K=st.integers(0, 5), chunk=st.sampled_from([1, 3, 128]), key_block=st.sampled_from([2, 5, 64]),
       kind=st.sampled_from(["none", "causal", "window", "padding", "empty", "causal_window"]), as_tensor=st.booleans(),
       values=st.booleans(), dv=st.sampled_from([4, 6]))
def test_matches_paper_formula_forward_backward(seed, nq, extra, hk, groups, K, chunk, key_block, kind, as_tensor,
                                                values, dv):
    """key_block: granularity of each chunk's key span (small values exercise the span skipping)."""
    g = torch.Generator().manual_seed(seed)
    B, D, nk, H = 2, 4, nq + extra, hk * groups
    f64 = dict(dtype=torch.float64, requires_grad=True)
    q = torch.randn(B, H, nq, D, generator=g, **f64)
    k = torch.randn(B, hk, nk, D, generator=g, **f64)
    v = torch.randn(B, hk, nk, dv, generator=g, **f64)
    rel_k = torch.randn(2 * K + 1, D, generator=g, **f64)
    rel_v = torch.randn(2 * K + 1, dv, generator=g, **f64) if values else None
    mask = _mask(kind, B, nq, nk, g, as_tensor)
    allowed = None if mask is None else (mask if as_tensor else mask.to_dense(nq, nk, batch=B, heads=H))
    inputs = [t for t in (q, k, v, rel_k, rel_v) if t is not None]
    want = paper_formula(q, k, v, rel_k, rel_v, allowed, D**-0.5)
    with mock.patch.object(_common, "KEY_BLOCK", key_block):
        got = shaw_attention(q, k, v, rel_k, rel_v, mask=mask, chunk_size=chunk)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    dout = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(a, b, **tol(torch.float64, grad=True))


def test_fully_masked_rows_give_zeros_and_zero_gradient():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    shaw = ShawRelativePosition(4, 2).double()
    out = shaw(q, k, v, mask=masks.key_padding(torch.tensor([0, 5])))
    assert out[0].eq(0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert q.grad[0].eq(0).all() and k.grad[0].eq(0).all() and torch.isfinite(shaw.rel_k.grad).all()


def test_k0_reduces_to_plain_attention_plus_edge_value():
    """With K = 0 every pair uses aK[0] (a per-row constant: softmax-invariant) and aV[0]."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 3, 6, 8, dtype=torch.float64, generator=g) for _ in range(3))
    rel_k, rel_v = torch.randn(1, 8, dtype=torch.float64, generator=g), torch.randn(1, 8, dtype=torch.float64, generator=g)
    got = shaw_attention(q, k, v, rel_k, rel_v, mask=masks.causal())
    want = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference") + rel_v[0]
    torch.testing.assert_close(got, want, **tol(torch.float64))


def test_decoding_one_query_equals_last_row_of_full_pass():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, generator=g) for _ in range(3))
    shaw = ShawRelativePosition(4, 3).double()
    full = shaw(q, k, v, mask=masks.causal())
    for t in (0, 5, 8):
        step = shaw(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], mask=masks.causal())
        torch.testing.assert_close(step, full[:, :, t:t + 1], **tol(torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float64(dtype):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, n, 16, dtype=torch.float64, generator=g) for n in (7, 12, 12))
    rel_k, rel_v = (torch.randn(9, 16, dtype=torch.float64, generator=g) / 4 for _ in range(2))
    want = paper_formula(q, k, v, rel_k, rel_v, masks.sliding_window(5).to_dense(7, 12), 0.25)
    lo = [t.to(dtype) for t in (q, k, v, rel_k, rel_v)]
    got = shaw_attention(*lo, mask=masks.sliding_window(5), chunk_size=3)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol(dtype))


def test_no_grad_path_skips_checkpoint_and_equals_grad_path():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=g) for _ in range(3))
    shaw = ShawRelativePosition(4, 2, chunk_size=3)
    with torch.no_grad():
        a = shaw(q, k, v)
    b = shaw(q, k, v)
    assert b.requires_grad
    torch.testing.assert_close(a, b.detach(), **tol(torch.float32))


def test_errors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="odd number of rows"):
        shaw_attention(q, q, q, torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"rel_v must have shape \(2K \+ 1, Dv\)"):
        shaw_attention(q, q, q, torch.randn(5, 8), torch.randn(5, 7))
    with pytest.raises(TypeError, match="bool tensor"):
        shaw_attention(q, q, q, torch.randn(5, 8), mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="chunk_size must be an int > 0"):
        shaw_attention(q, q, q, torch.randn(5, 8), chunk_size=0)
    with pytest.raises(ValueError, match="does not broadcast"):
        shaw_attention(q, q, q, torch.randn(5, 8), mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_distance must be an int >= 0"):
        ShawRelativePosition(8, -1)
