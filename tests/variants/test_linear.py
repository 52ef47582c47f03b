"""Linear attention (attnkit.linear) against the float64 materialised formula.

Naive formula: A = phi(q) phi(k)^T (B, Hq, Nq, Nk), zeroed where the mask blocks; out = A v / A 1
(rows with no allowed key -> 0), with phi written out here (x + 1 for x > 0, e^x otherwise: elu + 1,
Katharopoulos et al. 2020), never the library's feature map. Checked: non-causal and bottom-right causal on random shapes
(odd lengths, Nq != Nk, GQA, Dv != D), padding, fully masked rows, chunked == naive == recurrent
step, prefill + steps, masks it must refuse, the module's padding conversion.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import LinearAttention
from attnkit import masks as M
from attnkit.variants import linear as linear_module
from attnkit.variants.linear import LinearState, elu_plus_one, linear_attention, linear_attention_step
from tests.strategies import Shape, make_qkv, shapes
from tests.tolerances import assert_close


def phi(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 by its definition: x + 1 where x > 0, else exp(x)."""
    return torch.where(x > 0, x + 1.0, torch.exp(x))


def naive_linear(q, k, v, *, causal=False, valid=None, feature_map=phi):
    """Float64 materialised linear attention. valid: (B, Nk) bool, True = real key."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    g = Hq // Hk
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    a = feature_map(q) @ feature_map(k).transpose(-1, -2)            # (B, Hq, Nq, Nk)
    allowed = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
    if causal:
        allowed = allowed & M.causal().to_dense(Nq, Nk)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    a = a * allowed
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, (a @ v) / torch.where(den > 0, den, 1.0), 0.0)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _lengths(B, Nk, seed):
    return torch.randint(0, Nk + 1, (B,), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=shapes(), causal=st.booleans(), pad=st.booleans(), chunk=st.integers(1, 6), seed=st.integers(0, 99))
def test_matches_naive_forward_backward(shape, causal, pad, chunk, seed):
    q, k, v = make_qkv(shape, seed=seed)
    lengths = _lengths(shape.B, shape.Nk, seed) if pad else None
    mask = M.key_padding(lengths) if pad else None
    out = linear_attention(q, k, v, causal=causal, mask=mask, chunk_size=chunk)
    valid = (torch.arange(shape.Nk)[None] < lengths[:, None]) if pad else None
    ref = naive_linear(q, k, v, causal=causal, valid=valid)
    assert_close(out, ref, backend="blockwise")
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        assert_close(a, b, backend="blockwise", grad=True)


def test_fully_masked_rows_zero_output_zero_grad():
    # Nq > Nk causal: the first Nq - Nk queries sit before key 0; batch 1 has every key padded.
    q = torch.randn(2, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    out = linear_attention(q, k, v, mask=M.causal() & M.key_padding(torch.tensor([4, 0])), chunk_size=2)
    assert torch.isfinite(out).all()
    assert (out[:, :, :3] == 0).all() and (out[1] == 0).all()
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(gq).all() and (gq[:, :, :3] == 0).all() and (gq[1] == 0).all()
    assert (gk[1] == 0).all() and (gv[1] == 0).all()


def test_padded_keys_excluded_from_numerator_and_normaliser():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    k_pad, v_pad = k.clone(), v.clone()
    k_pad[:, :, 6:], v_pad[:, :, 6:] = 1e3, float("nan")  # garbage in the padded slots
    for causal in (False, True):
        out = linear_attention(q[:, :, :6], k_pad, v_pad, causal=causal, mask=M.key_padding(torch.tensor([6])))
        ref = linear_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], causal=causal)
        if causal:  # bottom-right: with 9 keys, query i sits at i + 3, so compare with its own naive form
            ref = naive_linear(q[:, :, :6], k, v, causal=True, valid=torch.arange(9)[None] < 6)
        assert_close(out, ref)
    # the same padding as a bool key mask (B, 1, 1, Nk) and as key_padding_from_bool
    valid = (torch.arange(9) < 6).view(1, 1, 1, 9)
    a = linear_attention(q, k_pad, v_pad, mask=valid)
    b = linear_attention(q, k_pad, v_pad, mask=M.key_padding_from_bool(~valid.view(1, 9)))
    assert_close(a, linear_attention(q, k[:, :, :6], v[:, :, :6]))
    assert_close(b, a)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(shape=shapes(max_len=13), chunk=st.integers(1, 5), seed=st.integers(0, 99))
def test_causal_parallel_equals_recurrent_steps(shape, chunk, seed):
    shape = shape._replace(Nq=shape.Nk)
    q, k, v = make_qkv(shape, seed=seed, requires_grad=False)
    par = linear_attention(q, k, v, causal=True, chunk_size=chunk)
    state, outs = None, []
    for t in range(shape.Nk):
        o, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(o)
    assert state.length == shape.Nk
    assert_close(torch.cat(outs, dim=2), par, backend="blockwise")
    assert_close(par, naive_linear(q, k, v, causal=True), backend="blockwise")


def test_prefill_then_steps_equals_full_pass():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 12, 6, generator=g, dtype=torch.float64) for _ in range(3))
    full = linear_attention(q, k, v, causal=True, chunk_size=4)
    out0, state = linear_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], causal=True, return_state=True)
    out1, state = linear_attention(q[:, :, 7:10], k[:, :, 7:10], v[:, :, 7:10], causal=True, state=state,
                                   return_state=True)
    out2, state = linear_attention_step(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], state)
    assert state.length == 12
    assert_close(torch.cat([out0, out1, out2], dim=2), full, backend="blockwise")


@pytest.mark.parametrize("slice_elements", [1, 1 << 30])
def test_gradients_flow_through_the_carried_state(monkeypatch, slice_elements):
    """The causal function takes the earlier keys' sums and returns the new ones; both carry
    gradients (prefill, then a continuation, with the final state in the loss). The backward runs
    over slices of (batch, head) rows to bound its temporaries: one row per slice (1) and all rows
    at once (1 << 30) are both exact (B = 2, GQA: 6 rows; a padded tail chunk)."""
    monkeypatch.setattr(linear_module, "_BACKWARD_SLICE_ELEMENTS", slice_elements)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def f(q, k, v):
        o1, st = linear_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], causal=True, chunk_size=2, return_state=True)
        o2, st = linear_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], causal=True, chunk_size=3, state=st,
                                  return_state=True)
        return o1, o2, st.kv, st.k_sum

    assert torch.autograd.gradcheck(f, (q, k, v))
    o1, o2, kv, z = f(q, k, v)
    assert_close(torch.cat([o1, o2], dim=2), naive_linear(q, k, v, causal=True))
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    assert_close(kv, elu_plus_one(kk).transpose(-1, -2) @ vv)
    assert_close(z, elu_plus_one(kk).sum(dim=2))


def test_noncausal_state_adds_earlier_keys():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 10, 4, generator=g, dtype=torch.float64) for _ in range(2))
    _, state = linear_attention(q, k[:, :, :6], v[:, :, :6], return_state=True)
    out = linear_attention(q, k[:, :, 6:], v[:, :, 6:], state=state)
    assert_close(out, linear_attention(q, k, v))


def test_chunk_size_does_not_change_the_result():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 37, 8, generator=g, dtype=torch.float64) for _ in range(3))
    outs = [linear_attention(q, k, v, causal=True, chunk_size=c) for c in (1, 5, 16, 64)]
    for o in outs[1:]:
        assert_close(o, outs[0], backend="blockwise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_close_to_float64(dtype):
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 33, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        ref = linear_attention(q, k, v, causal=causal)
        out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, chunk_size=8)
        assert out.dtype == dtype
        # inputs are rounded to dtype first, so compare with the float64 result on the rounded inputs
        ref = linear_attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), causal=causal)
        assert_close(out, ref, dtype=dtype, backend="blockwise")


def test_elu_plus_one_is_the_papers_feature_map():
    x = torch.linspace(-30, 30, 241, dtype=torch.float64).requires_grad_()
    got, want = elu_plus_one(x), phi(x)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0], grad=True)


def test_custom_feature_map_and_eps():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 1, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    fm = lambda x: torch.cat([torch.relu(x), torch.relu(-x)], dim=-1) + 0.1  # F = 2D
    assert_close(linear_attention(q, k, v, feature_map=fm), naive_linear(q, k, v, feature_map=fm))
    a = phi(q) @ phi(k).transpose(-1, -2)
    ref = (a @ v) / (a.sum(-1, keepdim=True) + 1e-3)
    assert_close(linear_attention(q, k, v, eps=1e-3), ref)


@pytest.mark.parametrize("mask, match", [
    (M.sliding_window(3), "cannot honour the mask sliding_window"),
    (M.document(torch.tensor([[0, 0, 1, 1, 1, 2]])), "cannot honour the mask document"),
    (M.causal() | M.key_padding(torch.tensor([3])), "cannot honour"),
    (torch.ones(1, 1, 6, 6, dtype=torch.bool), "depend on the key alone"),
])
def test_refuses_masks_it_cannot_honour(mask, match):
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, mask=mask)


def test_argument_errors():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map=lambda x: x.sum(-1))
    # issue 10 (fixed in the restructuring; pinned here)
    with pytest.raises(ValueError, match=r"feature_map must be one of \['elu\+1'\] or a callable, got 'elu'"):
        linear_attention(q, k, v, feature_map="elu")
    with pytest.raises(ValueError, match=r"feature_map\(q\) returned negative values .* needs phi >= 0"):
        linear_attention(q, k, v, feature_map=lambda x: x)
    with pytest.raises(ValueError, match="key padding|lengths has 2 entries"):
        linear_attention(q, k, v, mask=M.key_padding(torch.tensor([3, 4])))
    with pytest.raises(TypeError, match="bool tensor"):
        linear_attention(q, k, v, mask=torch.ones(1, 1, 1, 6))
    bad = LinearState.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="state has kv"):
        linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], bad)
    with pytest.raises(ValueError, match="Nq == Nk"):
        linear_attention(q[:, :, :2], k, v, causal=True, state=LinearState.zeros(1, 2, 4, 4))


def test_module_key_padding_mask_true_means_pad():
    torch.manual_seed(0)
    mod = LinearAttention(16, 4, causal=False).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    is_pad = torch.zeros(2, 9, dtype=torch.bool)
    is_pad[1, 5:] = True
    out = mod(x, key_padding_mask=is_pad)
    assert_close(out[1, :5], mod(x[1:, :5])[0])
    assert_close(out[0], mod(x[:1])[0])
    causal_mod = LinearAttention(16, 4, causal=True).double()
    causal_mod.load_state_dict(mod.state_dict())
    y = causal_mod(x)
    assert_close(y[:, :4], causal_mod(x[:, :4]))  # a prefix does not see the future


@pytest.mark.parametrize("causal", [False, True])
def test_float32_fast_path_at_bench_like_chunks_forward_backward(causal):
    """Float32 through the fast paths at a size with several 64-token chunks, a padded tail chunk and
    more than one block of the chunk-state scan (odd Nq != Nk, GQA, key padding, one batch fully
    padded): forward and backward within the float32 table of the float64 formula on the rounded inputs."""
    shape = Shape(3, 4, 2, 389, 401, 16, 8)
    q, k, v = make_qkv(shape, dtype=torch.float32, seed=21)
    lengths = torch.tensor([401, 250, 0])
    out = linear_attention(q, k, v, causal=causal, mask=M.key_padding(lengths))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_linear(qd, kd, vd, causal=causal, valid=torch.arange(401)[None] < lengths[:, None])
    assert out.dtype == torch.float32 and (out[2] == 0).all()
    assert_close(out, ref, dtype=torch.float32, backend="blockwise")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, (qd, kd, vd), g)):
        assert_close(a, b, dtype=torch.float32, backend="blockwise", grad=True)
