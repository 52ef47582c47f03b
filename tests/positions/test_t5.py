"""T5 relative buckets and bias: equal to transformers' T5Attention (buckets for every r in
[-1000, 1000], compute_bias with a decoding offset, the whole attention on the same weights),
and the table's gradient through attnkit.attention equal to a materialised formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Attention

import attnkit
from attnkit import masks
from attnkit.backends import BACKENDS
from attnkit.positions import T5Bias, T5RelativeBias, t5_relative_bucket
from tests.tolerances import tol

hf_bucket = T5Attention._relative_position_bucket


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (64, 256), (8, 20)])
def test_buckets_equal_transformers_everywhere(bidirectional, num_buckets, max_distance):
    r = torch.arange(-1000, 1001)
    got = t5_relative_bucket(r, bidirectional, num_buckets, max_distance)
    want = hf_bucket(r, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(got, want)
    assert got.dtype == torch.int64 and int(got.min()) >= 0 and int(got.max()) < num_buckets


def test_bucket_anchor_constants():
    bi = {-1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -23: 11, -45: 12, -46: 13, -90: 14, -91: 15, -200: 15,
          1: 17, 8: 24, 12: 25, 91: 31, 500: 31}
    uni = {5: 0, 1: 0, -15: 15, -16: 16, -20: 17, -32: 21, -64: 26, -112: 30, -113: 31, -999: 31}
    for table, bidir in ((bi, True), (uni, False)):
        r = torch.tensor(list(table))
        assert t5_relative_bucket(r, bidir).tolist() == list(table.values()), (bidir, table)


def _hf_attention(H, D, decoder, seed):
    cfg = T5Config(d_model=H * D, d_kv=D, num_heads=H, is_decoder=decoder, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, dropout_rate=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0).eval()


@pytest.mark.parametrize("nq,past", [(7, 0), (1, 150), (5, 40)])
def test_compute_bias_with_decoding_offset_equals_transformers(nq, past):
    hf = _hf_attention(4, 8, decoder=True, seed=0)
    mod = T5RelativeBias(4, bidirectional=False)
    with torch.no_grad():
        mod.weight.copy_(hf.relative_attention_bias.weight)
        want = hf.compute_bias(nq, past + nq, past_seen_tokens=past)  # (1, H, Nq, Nk)
        got = mod.spec().to_dense(nq, past + nq, heads=4)  # bottom-right: query i at past + i
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("decoder", [False, True])
def test_whole_attention_equals_transformers_t5(decoder):
    B, N, H, D = 2, 11, 4, 8
    hf = _hf_attention(H, D, decoder, seed=1)
    with torch.no_grad():
        hf.relative_attention_bias.weight.normal_()  # make the bias matter
    t5 = T5RelativeBias(H, bidirectional=not decoder)
    with torch.no_grad():
        t5.weight.copy_(hf.relative_attention_bias.weight)
    x = torch.randn(B, N, H * D, generator=torch.Generator().manual_seed(2))
    hf_mask = None
    if decoder:  # transformers takes an additive (B, 1, N, N) mask
        hf_mask = torch.zeros(N, N).masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))[None, None]
    want = hf(x, mask=hf_mask)[0]
    split = lambda t: t.view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    q, k, v = split(hf.q(x)), split(hf.k(x)), split(hf.v(x))
    out = attnkit.attention(q, k, v, bias=t5.spec(), scale=1.0, mask=masks.causal() if decoder else None)
    got = hf.o(out.transpose(1, 2).reshape(B, N, H * D))
    torch.testing.assert_close(got, want, **tol(torch.float32, "sdpa"))


def _materialised_bias(table, nq, nk, bidirectional):
    q = torch.arange(nq)[:, None] + (nk - nq)
    k = torch.arange(nk)[None, :]
    bucket = hf_bucket(k - q, bidirectional=bidirectional, num_buckets=table.shape[0], max_distance=128)
    return table[bucket].permute(2, 0, 1)[None]  # (1, H, Nq, Nk)


def _formula(q, k, v, bias, allowed):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) + bias  # T5: scale 1.0
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _backends():
    return [b for b in ("reference", "sdpa", "blockwise") if b in BACKENDS]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), nq=st.integers(1, 9), extra=st.integers(0, 150), hk=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2]), kind=st.sampled_from(["none", "causal", "window", "padding"]))
def test_attention_and_table_gradient_match_formula(seed, nq, extra, hk, groups, kind):
    g = torch.Generator().manual_seed(seed)
    B, D, nk, H = 2, 4, nq + extra, hk * groups
    bidirectional = kind != "causal"
    t5 = T5RelativeBias(H, bidirectional=bidirectional, init_std=1.0).double()
    q = torch.randn(B, H, nq, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, hk, nk, D, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, hk, nk, D, dtype=torch.float64, generator=g, requires_grad=True)
    mask = {"none": None, "causal": masks.causal(), "window": masks.sliding_window(20, 3),
            "padding": masks.key_padding(torch.tensor([0, nk]))}[kind]
    allowed = None if mask is None else mask.to_dense(nq, nk, batch=B, heads=H)
    want = _formula(q, k, v, _materialised_bias(t5.weight, nq, nk, bidirectional), allowed)
    dout = torch.randn_like(want)
    inputs = (q, k, v, t5.weight)
    want_g = torch.autograd.grad(want, inputs, dout)
    for backend in _backends():
        try:
            got = attnkit.attention(q, k, v, bias=t5.spec(), scale=1.0, mask=mask, backend=backend)
        except attnkit.NoBackendError:
            assert backend == "sdpa"  # declines fully masked rows
            continue
        torch.testing.assert_close(got, want, **tol(torch.float64, backend))
        got_g = torch.autograd.grad(got, inputs, dout)
        for name, a, b in zip("qkvT", got_g, want_g):
            torch.testing.assert_close(a, b, **tol(torch.float64, backend, grad=True), msg=f"{backend} grad {name}")
    if nk > 1:  # with one key the softmax is constant and nothing gets a gradient
        assert want_g[3].abs().sum() > 0  # the table does get a gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float64(dtype):
    g = torch.Generator().manual_seed(7)
    B, H, nq, nk, D = 2, 4, 6, 40, 16
    t5 = T5RelativeBias(H, bidirectional=False, init_std=1.0)
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, generator=g) / 3 for n in (nq, nk, nk))
    want = _formula(q, k, v, _materialised_bias(t5.weight.detach().double(), nq, nk, False),
                    masks.causal().to_dense(nq, nk))
    for backend in _backends():
        with torch.no_grad():
            got = attnkit.attention(q.to(dtype), k.to(dtype), v.to(dtype), bias=t5.spec(), scale=1.0,
                                    mask=masks.causal(), backend=backend)
        torch.testing.assert_close(got.double(), want, **tol(dtype, backend))


def test_module_spec_and_errors():
    mod = T5RelativeBias(3, num_buckets=16, max_distance=40)
    spec = mod()
    assert isinstance(spec, T5Bias) and spec.tensors()[0] is mod.weight and mod.weight.shape == (16, 3)
    assert spec.to_dense(5, 5, heads=3).shape == (1, 3, 5, 5)
    with pytest.raises(ValueError, match="num_buckets must be an int >= 4 and even"):
        T5RelativeBias(2, num_buckets=7)
    with pytest.raises(ValueError, match="max_distance must be an int > 4"):
        t5_relative_bucket(torch.arange(3), True, 16, 4)
    with pytest.raises(TypeError, match="integer tensor"):
        t5_relative_bucket(torch.arange(3.0))
    with pytest.raises(ValueError, match="table must be a float tensor"):
        T5Bias(torch.zeros(32))
    q = torch.randn(1, 4, 3, 4)
    with pytest.raises(ValueError, match="3 heads but the input has Hq=4"):
        attnkit.attention(q, q, q, bias=spec, backend="reference")


@pytest.mark.parametrize("kind", ["none", "causal", "padding"])
def test_blockwise_small_tiles_table_gradient_matches(kind):
    """Memory-bounded backend: bias gathered per (block_q, block_k) tile, table gradient per tile."""
    from attnkit.backends.blockwise import BlockwiseOptions, blockwise_attention

    g = torch.Generator().manual_seed(8)
    B, H, hk, nq, nk, D = 2, 4, 2, 21, 170, 4
    t5 = T5RelativeBias(H, bidirectional=kind != "causal", init_std=1.0).double()
    f64 = dict(dtype=torch.float64, requires_grad=True)
    q = torch.randn(B, H, nq, D, generator=g, **f64)
    k, v = (torch.randn(B, hk, nk, D, generator=g, **f64) for _ in range(2))
    mask = {"none": None, "causal": masks.causal(), "padding": masks.key_padding(torch.tensor([0, 90]))}[kind]
    allowed = None if mask is None else mask.to_dense(nq, nk, batch=B, heads=H)
    inputs = (q, k, v, t5.weight)
    want = _formula(q, k, v, _materialised_bias(t5.weight, nq, nk, kind != "causal"), allowed)
    got = blockwise_attention(q, k, v, bias=t5.spec(), scale=1.0, mask=mask,
                              options=BlockwiseOptions(block_q=8, block_k=16))
    torch.testing.assert_close(got, want, **tol(torch.float64, "blockwise"))
    dout = torch.randn_like(want)
    for name, a, b in zip("qkvT", torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(a, b, **tol(torch.float64, "blockwise", grad=True), msg=f"grad {name}")


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (32, 3000)])
def test_spec_lookup_equals_bucket_function_far_out(bidirectional, num_buckets, max_distance):
    """The spec clamps r to +-2 max_distance before its lookup table: same buckets as transformers."""
    table = torch.arange(num_buckets, dtype=torch.float64)[:, None].repeat(1, 2)  # bias value = bucket id
    spec = T5Bias(table, bidirectional=bidirectional, max_distance=max_distance)
    r = torch.arange(-20000, 20001)
    got = spec(torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long), torch.zeros_like(r), r)
    want = hf_bucket(r, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(got.long(), want)


def test_huge_max_distance_keeps_no_huge_table():
    """T5Bias(max_distance=10**6) kept a 4-million-entry lookup table for an 8-token input."""
    from attnkit.positions import t5 as T5mod

    table = torch.arange(32, dtype=torch.float64)[:, None].repeat(1, 2)
    spec = T5Bias(table, max_distance=10**6)
    got = spec.to_dense(8, 8, heads=2)
    r = torch.arange(8)[None, :] - torch.arange(8)[:, None]  # k - q
    assert torch.equal(got[0, 0].long(), hf_bucket(r, bidirectional=True, num_buckets=32, max_distance=10**6))
    assert all(lut.numel() <= 2 * T5mod.LUT_LIMIT + 1 for lut in spec._luts.values())
    small = T5Bias(table, max_distance=128)
    small.to_dense(8, 8, heads=2)
    assert [lut.numel() for lut in small._luts.values()] == [513]  # the fast lookup stays for T5's sizes


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_bfloat16_table_gradient_accumulates_in_float32(backend):
    """The table gradient sums over every (q, k) pair of a bucket (thousands of terms here);
    summed in bfloat16 it was 2.5% off at N=300 (1.6x the tolerance, found by tools/gpu_check.py)."""
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 4, 300, 64
    q, k, v, go = (torch.randn(B, H, N, D, dtype=torch.float64, generator=g) for _ in range(4))
    table = torch.randn(32, H, dtype=torch.float64, generator=g)

    def table_grad(dtype, backend):
        ins = [t.to(dtype).requires_grad_(True) for t in (q, k, v, table)]
        out = attnkit.attention(*ins[:3], mask=masks.causal(), bias=T5Bias(ins[3], bidirectional=False), backend=backend)
        return torch.autograd.grad(out, ins[3], go.to(dtype))[0]

    got = table_grad(torch.bfloat16, backend)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), table_grad(torch.float64, "reference"), **tol(torch.bfloat16, backend, grad=True))
