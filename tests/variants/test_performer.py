"""Performer FAVOR+ (attnkit.performer): exact against its own float64 formula with the same
random features, approximate against softmax attention, equal to performer-pytorch on the same
projection, and padding handled where performer-pytorch gets it wrong.

Naive formula: phi(x) = m^-1/2 exp(W x - |x|^2/2) unstabilised, x = q D^-1/4, y = k D^-1/4;
A = phi(x) phi(y)^T masked; out = A v / A 1.
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import PerformerAttention
from attnkit import masks as M
from attnkit.variants.performer import (
    draw_favor_projection,
    favor_features,
    performer_attention,
    performer_attention_step,
)
from tests.strategies import Shape, make_qkv, shapes
from tests.tolerances import assert_close
from tests.variants.test_linear import naive_linear


def _proj(m, d, seed=0):
    return draw_favor_projection(m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_performer(q, k, v, w, *, causal=False, valid=None):
    s = q.shape[-1] ** -0.25
    fm = lambda t: favor_features(t * s, w)  # raw, unstabilised estimator
    return naive_linear(q, k, v, causal=causal, valid=valid, feature_map=fm)


def exact_softmax(q, k, v, *, causal=False):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~M.causal().to_dense(q.shape[2], k.shape[2])[0, 0], float("-inf"))
    return torch.softmax(s, -1) @ v


@settings(max_examples=30, deadline=None, derandomize=True)
@given(shape=shapes(), causal=st.booleans(), pad=st.booleans(), m=st.integers(1, 20), chunk=st.integers(1, 6),
       seed=st.integers(0, 99))
def test_matches_own_formula_forward_backward(shape, causal, pad, m, chunk, seed):
    q, k, v = make_qkv(shape, seed=seed)
    w = _proj(m, shape.D, seed)
    lengths = torch.randint(0, shape.Nk + 1, (shape.B,), generator=torch.Generator().manual_seed(seed))
    valid = torch.arange(shape.Nk)[None] < lengths[:, None] if pad else None
    out = performer_attention(q, k, v, projection=w, causal=causal, mask=M.key_padding(lengths) if pad else None,
                              chunk_size=chunk)
    ref = naive_performer(q, k, v, w, causal=causal, valid=valid)
    assert_close(out, ref, backend="blockwise")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, backend="blockwise", grad=True)


def test_fully_masked_rows_zero_output_zero_grad():
    q = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    out = performer_attention(q, k, v, projection=_proj(8, 4), mask=M.causal() & M.key_padding(torch.tensor([4, 0])))
    assert torch.isfinite(out).all() and (out[:, :, :2] == 0).all() and (out[1] == 0).all()
    gq, gk = torch.autograd.grad(out.sum(), (q, k))
    assert (gq[:, :, :2] == 0).all() and (gq[1] == 0).all() and (gk[1] == 0).all()


@pytest.mark.parametrize("hq, hk", [(2, 2), (4, 2)])
def test_causal_parallel_equals_steps_and_prefill(hq, hk):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, hq, 11, 5, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, hk, 11, 5, generator=g, dtype=torch.float64) for _ in range(2))
    k[:, :, 7] *= 4  # a key that raises the running stabiliser mid-sequence
    w = _proj(16, 5)
    par = performer_attention(q, k, v, projection=w, causal=True, chunk_size=3)
    assert_close(par, naive_performer(q, k, v, w, causal=True), backend="blockwise")
    state, outs = None, []
    for t in range(11):
        o, state = performer_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, projection=w)
        outs.append(o)
    assert_close(torch.cat(outs, 2), par, backend="blockwise")
    o1, st1 = performer_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], projection=w, causal=True, return_state=True)
    o2, st2 = performer_attention_step(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], st1, projection=w)
    assert st2.length == 11
    assert_close(torch.cat([o1, o2], 2), par, backend="blockwise")


@pytest.mark.parametrize("hq, hk", [(2, 2), (4, 2)])
def test_fused_noncausal_path_equals_the_autograd_path(hq, hk):
    """Non-causal, robust stabiliser, eps = 0 runs a fused function with a hand-written backward; a
    projection that requires grad takes the autograd path (which also gives its gradient). Same
    numbers, with padding and garbage (huge keys, NaN values) in the padded slots."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, hq, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, hk, 11, 6, generator=g, dtype=torch.float64) for _ in range(2))
    k[1, :, 8:], v[1, :, 8:] = 1e3, float("nan")
    k.requires_grad_()
    v.requires_grad_()
    w = _proj(20, 6)
    mask = M.key_padding(torch.tensor([11, 8]))
    fused = performer_attention(q, k, v, projection=w, mask=mask)
    auto = performer_attention(q, k, v, projection=w.clone().requires_grad_(), mask=mask)
    assert torch.isfinite(fused).all()
    assert_close(fused, auto)
    gout = torch.randn(fused.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(fused, (q, k, v), gout), torch.autograd.grad(auto, (q, k, v), gout)):
        assert torch.isfinite(a).all()
        assert_close(a, b, grad=True)
    clean = performer_attention(q[1:], k[1:, :, :8], v[1:, :, :8], projection=w)
    assert_close(fused[1:], clean)


def test_error_vs_softmax_shrinks_as_features_grow():
    g = torch.Generator().manual_seed(3)
    q, k, v = (0.5 * torch.randn(2, 4, 64, 16, generator=g, dtype=torch.float64) for _ in range(3))
    exact = exact_softmax(q, k, v)
    errs = []
    for m in (16, 256, 4096):  # mean over 4 draws; error ~ m^-1/2, so each step divides it by ~4
        e = [(performer_attention(q, k, v, projection=_proj(m, 16, s)) - exact).abs().mean() for s in range(4)]
        errs.append(torch.stack(e).mean().item())
    assert errs[0] > 2 * errs[1] > 4 * errs[2]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("stabilizer, eps", [("robust", 0.0), ("paper", 1e-4)])
def test_garbage_in_padded_keys_changes_nothing(stabilizer, eps, causal):
    """Peer-free padding check for both stabilisers: padded keys hold garbage that would set the
    key stabiliser if padding were ignored there (zeros beat large real keys under "robust",
    whose key logit is w.k - |k|^2/2; huge keys dominate w.k under "paper"). Each sequence's
    result equals the computation on its truncated keys (and queries, when causal)."""
    g = torch.Generator().manual_seed(6)
    B, H, N, D = 3, 2, 9, 8
    lengths = torch.tensor([9, 6, 4])
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    if stabilizer == "robust":  # real keys with |k D^-1/4|^2 / 2 = 2000: every real key logit is far below 0
        k = k / k.norm(dim=-1, keepdim=True) * (4000 ** 0.5) * D ** 0.25
    v = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        if n < N:
            k[b, :, n] = 0.0  # a zero key
            k[b, :, n + 1:] = 1e3 * torch.randn(H, N - n - 1, D, generator=g, dtype=torch.float64)  # huge keys
            v[b, :, n:] = 1e6
    w = _proj(16, D)
    kw = {"projection": w, "eps": eps, "stabilizer": stabilizer, "causal": causal}
    out = performer_attention(q, k, v, mask=M.key_padding(lengths), **kw)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lengths.tolist()):
        rows = slice(0, n) if causal else slice(0, N)
        want = performer_attention(q[b:b + 1, :, rows], k[b:b + 1, :, :n], v[b:b + 1, :, :n], **kw)
        assert_close(out[b:b + 1, :, rows], want, msg=f"sequence {b} (length {n})")


def test_matches_performer_pytorch_on_the_same_projection():
    pp = pytest.importorskip("performer_pytorch")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 13, 8, generator=g, dtype=torch.float64) for _ in range(3))
    fa = pp.FastAttention(dim_heads=8, nb_features=24, causal=False).double()
    ours = performer_attention(q, k, v, projection=fa.projection_matrix, eps=1e-4, stabilizer="paper")
    assert_close(ours, fa(q, k, v))


def test_performer_pytorch_counts_padded_keys_in_the_normaliser_and_we_do_not():
    pp = pytest.importorskip("performer_pytorch")
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        attn = pp.performer_pytorch.Attention(dim=16, heads=2, dim_head=8, nb_features=24).double().eval()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    real = 6
    valid = torch.arange(10)[None] < real                                  # (B, N) True = real
    truncated = attn(x[:, :real])                                           # what padding should reproduce
    theirs = attn(x, mask=valid)[:, :real]
    assert (theirs - truncated).abs().max() > 1e-2                          # their bug: padded keys in k_cumsum

    def heads(t):
        return t.view(1, -1, 2, 8).transpose(1, 2)                          # (B, H, N, D)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
    out = performer_attention(q, k, v, projection=attn.fast_attention.projection_matrix, eps=1e-4,
                              stabilizer="paper", mask=valid[:, None, None, :])
    ours = attn.to_out(out.transpose(1, 2).reshape(1, 10, 16))[:, :real]
    assert_close(ours, truncated)


def test_module_redraw_policy_and_seed():
    cfg = {"num_features": 12, "redraw_interval": 2, "seed": 7}
    a, b = PerformerAttention(16, 2, **cfg), PerformerAttention(16, 2, **cfg)
    assert torch.equal(a.core.projection, b.core.projection)                # seeded
    assert PerformerAttention(16, 2).core.projection.shape == (int(8 * math.log(8)), 8)
    x = torch.randn(1, 5, 16)
    p0 = a.core.projection.clone()
    a.train()
    a(x)
    a(x)
    assert torch.equal(a.core.projection, p0)                                    # calls 1, 2 use the first draw
    a(x)
    p1 = a.core.projection.clone()
    assert not torch.equal(p1, p0)                                          # call 3 redraws
    a.eval()
    for _ in range(4):
        a(x)
    assert torch.equal(a.core.projection, p1)                                    # never in eval mode
    a.redraw()
    assert not torch.equal(a.core.projection, p1)
    b.train()
    for _ in range(3):
        b(x)
    b.redraw()
    assert torch.equal(a.core.projection, b.core.projection)                          # same sequence of draws


def test_module_padding_and_causal():
    torch.manual_seed(1)
    mod = PerformerAttention(16, 2, causal=True, num_features=32).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y = mod(x)
    assert_close(y[:, :5], mod(x[:, :5]))
    enc = PerformerAttention(16, 2, num_features=32).double()
    is_pad = torch.zeros(2, 9, dtype=torch.bool)
    is_pad[0, 6:] = True
    out = enc(x, key_padding_mask=is_pad)
    assert_close(out[0, :6], enc(x[:1, :6])[0])


def test_errors():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="projection must be"):
        performer_attention(q, k, v, projection=torch.randn(8, 5))
    with pytest.raises(ValueError, match="stabilizer='paper'"):
        performer_attention(q, k, v, projection=w, eps=1e-4)
    with pytest.raises(ValueError, match="needs eps == 0"):
        performer_attention(q, k, v, projection=w, eps=1e-4, stabilizer="paper", return_state=True)
    with pytest.raises(ValueError, match="cannot honour the mask sliding_window"):
        performer_attention(q, k, v, projection=w, mask=M.sliding_window(2))
    with pytest.raises(ValueError, match="redraw_interval"):
        PerformerAttention(16, 2, redraw_interval=0)
    with pytest.raises(TypeError, match="projection must be a floating-point tensor"):
        performer_attention(q, k, v, projection=torch.ones(8, 4, dtype=torch.long))


def test_scale_argument_sets_the_softmax_temperature():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    w = _proj(16, 4)
    out = performer_attention(q, k, v, projection=w, scale=0.3)
    fm = lambda t: favor_features(t * 0.3 ** 0.5, w)                        # x = q scale^1/2
    assert_close(out, naive_linear(q, k, v, feature_map=fm))


def test_default_projection_is_float64_so_float64_calls_get_the_exact_draw():
    """draw_favor_projection used to default to float32: a float64 call was silently given a
    float32-rounded projection. Decision: draw (and return) float64 by default; lower-precision
    calls cast it to their compute dtype."""
    from attnkit.variants import draw_favor_projection

    w = draw_favor_projection(16, 4, generator=torch.Generator().manual_seed(1))
    assert w.dtype == torch.float64
    assert torch.equal(w.float(), draw_favor_projection(16, 4, generator=torch.Generator().manual_seed(1),
                                                        dtype=torch.float32))
    q, k, v = (t.detach() for t in make_qkv(Shape(1, 2, 2, 6, 6, 4, 4)))
    exact = performer_attention(q, k, v, projection=w)
    rounded = performer_attention(q, k, v, projection=w.float())
    assert not torch.equal(exact, rounded)  # the rounding is visible in float64 ...
    f32 = performer_attention(q.float(), k.float(), v.float(), projection=w)
    assert torch.equal(f32, performer_attention(q.float(), k.float(), v.float(), projection=w.float()))  # ... not in float32
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        draw_favor_projection(4, 4, dtype=torch.int64)


def test_module_redraws_in_its_own_dtype():
    mod = PerformerAttention(16, 2, num_features=12, seed=3).double()
    mod.redraw()
    ref = PerformerAttention(16, 2, num_features=12, seed=3)
    want = ref.core._draw(torch.float64)  # the generator's second draw, exact
    assert mod.core.projection.dtype == torch.float64 and torch.equal(mod.core.projection, want)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_fast_paths_at_bench_like_sizes_forward_backward(causal):
    """Float32, m = 64 features, odd Nq != Nk, GQA, key padding with one batch fully padded: the
    fused non-causal function and the chunked causal one (several chunks and a padded tail), forward
    and backward, within the float32 table of the float64 formula on the rounded inputs."""
    q, k, v = make_qkv(Shape(3, 4, 2, 389, 401, 16, 8), dtype=torch.float32, seed=22, scale=0.5)
    w = _proj(64, 16, 3)
    lengths = torch.tensor([401, 250, 0])
    out = performer_attention(q, k, v, projection=w.float(), causal=causal, mask=M.key_padding(lengths))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_performer(qd, kd, vd, w.float().double(), causal=causal,
                          valid=torch.arange(401)[None] < lengths[:, None])
    assert out.dtype == torch.float32 and (out[2] == 0).all()
    assert_close(out, ref, dtype=torch.float32, backend="blockwise")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, (qd, kd, vd), g)):
        assert torch.isfinite(a).all()
        assert_close(a, b, dtype=torch.float32, backend="blockwise", grad=True)
