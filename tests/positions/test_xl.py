"""Transformer-XL relative attention: equal to the score written out term by term
(a + b + c + d) and to the official rel-shift, in float64 forward and backward; segment memory
is detached and reproduces the full pass. (transformers 5.24 ships no Transformer-XL peer.)"""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import masks
from attnkit.positions import XLRelativePosition, _common, update_memory, xl_attention, xl_distances, xl_sinusoid
from tests.tolerances import tol


def term_by_term(q, k, v, W_R, u, vb, dim, allowed, scale):
    """score_ij = scale * (q.k + q.W_R R_{i-j} + u.k + v.W_R R_{i-j}); R built per pair."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    d = (i - j).to(torch.float64)  # (Nq, Nk)
    f = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    R = torch.cat([torch.sin(d[..., None] * f), torch.cos(d[..., None] * f)], -1)  # (Nq, Nk, E)
    r = (R @ W_R.t()).view(nq, nk, H, D)  # (Nq, Nk, H, D)
    a = torch.einsum("bhid,bhjd->bhij", q, k)
    b_ = torch.einsum("bhid,ijhd->bhij", q, r)
    c = torch.einsum("hd,bhjd->bhj", u, k)[:, :, None, :]
    d_ = torch.einsum("hd,ijhd->hij", vb, r)[None]
    s = (a + b_ + c + d_) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _project(W_R, dim, H, D, nq, nk, causal_only=False):
    R = xl_sinusoid(xl_distances(nq, nk, causal_only=causal_only), dim, dtype=torch.float64)  # (L, E)
    return (R @ W_R.t()).view(-1, H, D).transpose(0, 1)  # (H, L, D)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), nq=st.integers(1, 9), mem=st.integers(0, 6), hk=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2]), kind=st.sampled_from(["none", "causal", "window", "padding", "empty", "tensor"]),
       chunk=st.sampled_from([1, 4, 128]), key_block=st.sampled_from([2, 5, 64]))
def test_matches_term_by_term_formula(seed, nq, mem, hk, groups, kind, chunk, key_block):
    """key_block: granularity of each chunk's key span (small values exercise the span skipping)."""
    g = torch.Generator().manual_seed(seed)
    B, D, E, nk, H = 2, 4, 6, nq + mem, hk * groups
    f64 = dict(dtype=torch.float64, requires_grad=True)
    q = torch.randn(B, H, nq, D, generator=g, **f64)
    k, v = (torch.randn(B, hk, nk, D, generator=g, **f64) for _ in range(2))
    W_R = torch.randn(H * D, E, generator=g, **f64)
    u, vb = (torch.randn(H, D, generator=g, **f64) for _ in range(2))
    mask = {"none": None, "causal": masks.causal(), "window": masks.sliding_window(2, 1),
            "padding": masks.key_padding(torch.tensor([0, nk])), "empty": masks.key_padding(torch.tensor([0, 0])),
            "tensor": torch.rand(B, 1, nq, nk, generator=g) < 0.3}[kind]
    allowed = None if mask is None else mask if kind == "tensor" else mask.to_dense(nq, nk, batch=B, heads=H)
    inputs = (q, k, v, W_R, u, vb)
    want = term_by_term(q, k, v, W_R, u, vb, E, allowed, D**-0.5)
    r = _project(W_R, E, H, D, nq, nk)
    with mock.patch.object(_common, "KEY_BLOCK", key_block):
        got = xl_attention(q, k, v, r, r_w_bias=u, r_r_bias=vb, mask=mask, chunk_size=chunk)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    dout = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(a, b, **tol(torch.float64, grad=True))


def _official_rel_shift(x):
    """The official code's _rel_shift, in (B, H, Nq, L) layout."""
    B, H, nq, L = x.shape
    padded = torch.cat([x.new_zeros(B, H, nq, 1), x], dim=-1).view(B, H, L + 1, nq)
    return padded[:, :, 1:].reshape(B, H, nq, L)


def test_paper_length_r_equals_official_rel_shift():
    """r over pos_seq = klen-1 .. 0 (L = Nk) with the official rel-shift, under the causal mask."""
    g = torch.Generator().manual_seed(1)
    B, H, nq, mem, D, E = 2, 3, 5, 4, 4, 8
    nk = nq + mem
    q = torch.randn(B, H, nq, D, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, H, nk, D, dtype=torch.float64, generator=g) for _ in range(2))
    W_R = torch.randn(H * D, E, dtype=torch.float64, generator=g)
    u, vb = (torch.randn(H, D, dtype=torch.float64, generator=g) for _ in range(2))
    r = _project(W_R, E, H, D, nq, nk, causal_only=True)  # (H, Nk, D)
    ac = (q + u[:, None]) @ k.transpose(-1, -2)
    bd = _official_rel_shift((q + vb[:, None]) @ r.transpose(-1, -2)[None])
    allowed = masks.causal().to_dense(nq, nk)[0, 0]
    want = torch.softmax(((ac + bd) * D**-0.5).masked_fill(~allowed, float("-inf")), -1) @ v
    got = xl_attention(q, k, v, r, r_w_bias=u, r_r_bias=vb, mask=masks.causal(), chunk_size=2)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    with pytest.raises(ValueError, match="mask allows keys after the query"):
        xl_attention(q, k, v, r, r_w_bias=u, r_r_bias=vb, mask=None)


def test_sinusoid_descending_positions():
    d = xl_distances(3, 5, causal_only=True)
    assert d.tolist() == [4, 3, 2, 1, 0] and xl_distances(3, 5).tolist() == [4, 3, 2, 1, 0, -1, -2]
    R = xl_sinusoid(torch.tensor([2]), 4, dtype=torch.float64)
    want = torch.tensor([[torch.sin(torch.tensor(2.0, dtype=torch.float64)), torch.sin(torch.tensor(0.02, dtype=torch.float64)),
                          torch.cos(torch.tensor(2.0, dtype=torch.float64)), torch.cos(torch.tensor(0.02, dtype=torch.float64))]])
    torch.testing.assert_close(R, want, **tol(torch.float64))


def test_segment_memory_is_detached_and_equals_full_pass():
    g = torch.Generator().manual_seed(2)
    B, H, D, N = 2, 2, 4, 6
    xl = XLRelativePosition(H, D, mem_len=N).double()
    q, k, v = (torch.randn(B, H, 2 * N, D, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    full = xl(q, k, v, mask=masks.causal())
    mem = xl.update_memory(None, k[:, :, :N], v[:, :, :N])
    assert not mem[0].requires_grad and mem[0].shape == (B, H, N, D)
    seg2 = xl(q[:, :, N:], k[:, :, N:], v[:, :, N:], memory=mem, mask=masks.causal())
    torch.testing.assert_close(seg2, full[:, :, N:], **tol(torch.float64))
    # Gradient: memory tensors that require grad still receive none, and the first segment's k gets none.
    mk, mv = (t.detach().clone().requires_grad_(True) for t in (k[:, :, :N], v[:, :, :N]))
    out = xl(q[:, :, N:], k[:, :, N:], v[:, :, N:], memory=(mk, mv), mask=masks.causal())
    out.sum().backward()
    assert mk.grad is None and mv.grad is None
    assert k.grad is None or k.grad[:, :, :N].eq(0).all()
    assert xl.r_w_bias.grad is not None and xl.r_net.weight.grad.abs().sum() > 0


def test_update_memory_keeps_last_mem_len():
    k, v = torch.arange(10.0).view(1, 1, 10, 1), torch.arange(10.0).view(1, 1, 10, 1)
    m = update_memory(None, k[:, :, :4], v[:, :, :4], 3)
    m = update_memory(m, k[:, :, 4:], v[:, :, 4:], 3)
    assert m[0].flatten().tolist() == [7.0, 8.0, 9.0]
    assert update_memory(None, k, v, 0) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float64(dtype):
    g = torch.Generator().manual_seed(3)
    B, H, D, nq, mem = 2, 2, 16, 7, 5
    xl = XLRelativePosition(H, D, d_model=16)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (nq, nq + mem, nq + mem))
    with torch.no_grad():
        want = xl.double()(q.double(), k.double(), v.double(), mask=masks.causal())
        got = xl.to(dtype)(q.to(dtype), k.to(dtype), v.to(dtype), mask=masks.causal())
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol(dtype))


def test_errors():
    q = torch.randn(1, 2, 3, 4)
    u = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="r must have shape"):
        xl_attention(q, q, q, torch.zeros(2, 4, 4), r_w_bias=u, r_r_bias=u)
    with pytest.raises(ValueError, match=r"r_w_bias must have shape \(Hq, D\)"):
        xl_attention(q, q, q, torch.zeros(2, 5, 4), r_w_bias=torch.zeros(4), r_r_bias=u)
    with pytest.raises(ValueError, match="d_model must be even"):
        XLRelativePosition(2, 4, d_model=7)
    with pytest.raises(TypeError, match="memory must be a"):
        XLRelativePosition(2, 4)(q, q, q, memory=[q, q])
