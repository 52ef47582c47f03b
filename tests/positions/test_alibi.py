"""ALiBi: the paper's slopes (anchors and transformers' BLOOM), the bias from index tensors, and
attention with ALiBi through the backends against a float64 materialised formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

import attnkit
from attnkit import masks
from attnkit.backends import BACKENDS
from attnkit.biases import Bias
from attnkit.positions import ALiBi, alibi_slopes
from tests.tolerances import tol


def test_slopes_anchor_constants():
    exp = lambda xs: [2.0**x for x in xs]
    assert alibi_slopes(8, dtype=torch.float64).tolist() == exp([-1, -2, -3, -4, -5, -6, -7, -8])
    assert alibi_slopes(6, dtype=torch.float64).tolist() == exp([-2, -4, -6, -8, -1, -3])
    want12 = exp([-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5])
    torch.testing.assert_close(alibi_slopes(12, dtype=torch.float64), torch.tensor(want12, dtype=torch.float64),
                               **tol(torch.float64))
    assert alibi_slopes(1).tolist() == [2.0**-8]


@pytest.mark.parametrize("n", list(range(1, 41)) + [64, 96])
def test_slopes_equal_transformers_bloom(n):
    torch.testing.assert_close(alibi_slopes(n), _get_alibi_slopes(n, torch.device("cpu")), **tol(torch.float32))


def _dense_alibi(slopes, nq, nk, symmetric):
    q = torch.arange(nq, dtype=torch.float64)[:, None] + (nk - nq)
    k = torch.arange(nk, dtype=torch.float64)[None, :]
    d = (q - k).abs() if symmetric else q - k
    return -slopes.to(torch.float64)[:, None, None] * d  # (H, Nq, Nk)


@pytest.mark.parametrize("symmetric", [False, True])
def test_bias_values_and_per_tile_evaluation(symmetric):
    H, nq, nk = 5, 7, 11
    spec = ALiBi(H, symmetric=symmetric)
    want = _dense_alibi(alibi_slopes(H), nq, nk, symmetric)
    dense = spec.to_dense(nq, nk, heads=H, dtype=torch.float64)
    assert dense.shape == (1, H, nq, nk)
    torch.testing.assert_close(dense[0], want, **tol(torch.float32))
    # A tile evaluated from index tensors equals the same slice of the dense form.
    h = torch.arange(H).view(1, -1, 1, 1)
    q = (torch.arange(2, 5) + nk - nq).view(1, 1, -1, 1)
    k = torch.arange(6, 10).view(1, 1, 1, -1)
    tile = spec(torch.zeros(1, 1, 1, 1, dtype=torch.long), h, q, k)
    torch.testing.assert_close(tile.double(), dense[:, :, 2:5, 6:10])
    assert spec.to_dense(4, 4, heads=H)[0, 0].diagonal().eq(0).all() and not spec.to_dense(4, heads=H).signbit()[0, 0].diagonal().any()


def test_equals_bloom_under_causal_softmax():
    """BLOOM adds slope * key_position (a per-row shift of the causal ALiBi bias): same weights."""
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 6, 9, 8
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    bloom = build_alibi_tensor(torch.ones(B, N, dtype=torch.long), H, torch.float32).view(B, H, 1, N)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2)) / D**0.5 + bloom
    want = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ v
    got = attnkit.attention(q, k, v, bias=ALiBi(H), mask=masks.causal(), backend="reference")
    torch.testing.assert_close(got, want, **tol(torch.float32))


def _formula(q, k, v, bias, allowed, scale):
    """Float64 plain formula with a materialised bias; rows with no key give zeros."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return w @ v


def _mask(kind, B, nq, nk, g):
    if kind == "none":
        return None
    if kind == "causal":
        return masks.causal()
    if kind == "window":
        return masks.sliding_window(3)
    lengths = torch.randint(0, nk + 1, (B,), generator=g)
    lengths[0] = 0  # a fully masked batch entry: zeros, zero gradient
    return masks.key_padding(lengths)


def _backends():
    return [b for b in ("reference", "sdpa", "blockwise") if b in BACKENDS]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), nq=st.integers(1, 9), extra=st.integers(0, 6), hk=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 3]), kind=st.sampled_from(["none", "causal", "window", "padding"]),
       symmetric=st.booleans())
def test_attention_matches_float64_formula(seed, nq, extra, hk, groups, kind, symmetric):
    g = torch.Generator().manual_seed(seed)
    B, D, nk = 2, 8, nq + extra
    H = hk * groups
    q = torch.randn(B, H, nq, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, hk, nk, D, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, hk, nk, D, dtype=torch.float64, generator=g, requires_grad=True)
    mask = _mask(kind, B, nq, nk, g)
    spec = ALiBi(H, symmetric=symmetric)
    allowed = None if mask is None else mask.to_dense(nq, nk, batch=B, heads=H)
    want = _formula(q, k, v, _dense_alibi(alibi_slopes(H), nq, nk, symmetric)[None], allowed, D**-0.5)
    dout = torch.randn_like(want)
    want_g = torch.autograd.grad(want, (q, k, v), dout)
    for backend in _backends():
        try:
            got = attnkit.attention(q, k, v, bias=spec, mask=mask, backend=backend)
        except attnkit.NoBackendError:
            assert backend == "sdpa"  # sdpa declines fully masked rows; the reference never declines
            continue
        # slopes are float32 (the paper's values rounded once), so the bias carries float32 rounding.
        torch.testing.assert_close(got, want, **tol(torch.float32, backend))
        got_g = torch.autograd.grad(got, (q, k, v), dout)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, **tol(torch.float32, backend, grad=True))


def test_float64_slopes_give_float64_accuracy():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 12, 6, 4, dtype=torch.float64, generator=g) for _ in range(3))
    spec = ALiBi(12, slopes=alibi_slopes(12, dtype=torch.float64))
    want = _formula(q, k, v, _dense_alibi(spec.slopes, 6, 6, False)[None], torch.ones(6, 6, dtype=torch.bool).tril(), 0.5)
    got = attnkit.attention(q, k, v, bias=spec, mask=masks.causal(), backend="reference")
    torch.testing.assert_close(got, want, **tol(torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float64(dtype):
    g = torch.Generator().manual_seed(4)
    B, H, nq, nk, D = 2, 4, 5, 13, 16
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, generator=g) for n in (nq, nk, nk))
    spec = ALiBi(H)
    want = _formula(q, k, v, _dense_alibi(alibi_slopes(H), nq, nk, False)[None],
                    masks.causal().to_dense(nq, nk), D**-0.5)
    for backend in _backends():
        got = attnkit.attention(q.to(dtype), k.to(dtype), v.to(dtype), bias=spec, mask=masks.causal(), backend=backend)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol(dtype, backend))


def test_decoding_with_offset_equals_full_pass():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    full = attnkit.attention(q, k, v, bias=ALiBi(4), mask=masks.causal(), backend="reference")
    for t in (0, 4, 9):  # one query against the first t + 1 keys: bottom-right alignment is the offset
        step = attnkit.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], bias=ALiBi(4), mask=masks.causal())
        torch.testing.assert_close(step, full[:, :, t:t + 1], **tol(torch.float64, "sdpa"))


def test_is_a_bias_spec_and_errors():
    spec = ALiBi(4)
    assert isinstance(spec, Bias) and spec.tensors() == () and "ALiBi(4)" in repr(spec)
    with pytest.raises(ValueError, match="num_heads must be an int > 0"):
        alibi_slopes(0)
    with pytest.raises(ValueError, match="slopes must be a float tensor of shape"):
        ALiBi(4, slopes=torch.ones(3))
    q = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="built for 4 heads but the input has Hq=8"):
        attnkit.attention(q, q, q, bias=spec, backend="reference")


@pytest.mark.parametrize("kind", ["causal", "window", "padding"])
def test_blockwise_small_tiles_evaluates_per_tile_and_matches(kind):
    """The memory-bounded backend evaluates the spec per (block_q, block_k) tile: many tiles here."""
    from attnkit.backends.blockwise import BlockwiseOptions, blockwise_attention

    g = torch.Generator().manual_seed(6)
    B, H, hk, nq, nk, D = 2, 6, 3, 19, 29, 8
    f64 = dict(dtype=torch.float64, requires_grad=True)
    q = torch.randn(B, H, nq, D, generator=g, **f64)
    k, v = (torch.randn(B, hk, nk, D, generator=g, **f64) for _ in range(2))
    mask = _mask(kind, B, nq, nk, g)
    spec = ALiBi(H, slopes=alibi_slopes(H, dtype=torch.float64), symmetric=kind == "window")
    want = _formula(q, k, v, _dense_alibi(spec.slopes, nq, nk, kind == "window")[None],
                    mask.to_dense(nq, nk, batch=B, heads=H), D**-0.5)
    got = blockwise_attention(q, k, v, bias=spec, mask=mask, options=BlockwiseOptions(block_q=4, block_k=8))
    torch.testing.assert_close(got, want, **tol(torch.float64, "blockwise"))
    dout = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, **tol(torch.float64, "blockwise", grad=True))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_slopes_keep_exact_distances(half):
    """Slopes cast to a half type (module.to(torch.bfloat16)) must not round the positions:
    bfloat16 holds integers exactly only up to 256, so a distance computed in it is off by whole
    positions at N=600 (found by tools/gpu_check.py: 20x the bf16 tolerance)."""
    H, N = 4, 600
    want = ALiBi(H).to_dense(N, N, heads=H)  # float32 slopes 2^-k: exact in every half type
    spec = ALiBi(H, slopes=alibi_slopes(H, dtype=half))
    got = spec.to_dense(N, N, heads=H)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    r = torch.arange(-N, N).view(1, -1)
    torch.testing.assert_close(spec.relative(torch.arange(H).view(-1, 1), r),
                               ALiBi(H).relative(torch.arange(H).view(-1, 1), r), rtol=0, atol=0)
    q, k, v = (torch.randn(1, H, N, 16, dtype=torch.float64) for _ in range(3))
    ref = attnkit.attention(q, k, v, mask=masks.causal(), bias=ALiBi(H, slopes=alibi_slopes(H, dtype=torch.float64)),
                            backend="reference")
    for backend in ("reference", "blockwise"):
        out = attnkit.attention(q.to(half), k.to(half), v.to(half), mask=masks.causal(), bias=spec, backend=backend)
        torch.testing.assert_close(out.double(), ref, **tol(half, backend))


@pytest.mark.parametrize("symmetric", [False, True])
def test_linear_in_offset_only_for_the_causal_form(symmetric):
    """``linear_in_offset`` promises relative(h, r) = relative(h, 1) * r (the fused engine then adds
    a per-key row and shifts the log-sum-exp per query); only the causal form keeps it."""
    spec = ALiBi(8, symmetric=symmetric)
    h, r = torch.arange(8).view(-1, 1), torch.arange(-40, 41).view(1, -1)
    linear = torch.equal(spec.relative(h, r), spec.relative(h, torch.ones_like(r)) * r)
    assert spec.linear_in_offset == (not symmetric) == linear
