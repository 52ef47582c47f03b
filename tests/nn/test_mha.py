"""MultiHeadAttention: equal to torch.nn.MultiheadAttention (float64), to the plain formula, and
to each variant's function on the module's own projections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit import masks as M
from attnkit.nn import (
    LSH,
    T5,
    XL,
    Additive,
    Alibi,
    Linear,
    Linformer,
    MultiHeadAttention,
    Nystrom,
    Performer,
    Rope,
    Shaw,
    Softmax,
)
from tests.tolerances import assert_close

F64 = torch.float64


def _torch_mha(E=12, H=3, kdim=None, vdim=None, bias=True, batch_first=True, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first).to(F64).eval()
    if bias:  # torch zero-inits the biases; make them count
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return m


def _bf(t, batch_first):
    return t if batch_first else t.transpose(0, 1)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_equals_torch_mha_with_torch_masks(cross, batch_first, bias, average):
    g = torch.Generator().manual_seed(1)
    kdim, vdim = (5, 7) if cross else (None, None)
    t = _torch_mha(kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first)
    m = MultiHeadAttention.from_torch(t)
    B, Nq, Nk = 2, 4, (6 if cross else 4)
    x = torch.randn(B, Nq, 12, dtype=F64, generator=g, requires_grad=True)
    key = torch.randn(B, Nk, kdim or 12, dtype=F64, generator=g) if cross else x
    val = torch.randn(B, Nk, vdim or 12, dtype=F64, generator=g) if cross else x
    kpm = torch.zeros(B, Nk, dtype=torch.bool)
    kpm[1, -2:] = True
    am = torch.rand(Nq, Nk, generator=g) < 0.3
    am[:, 0] = False  # no fully blocked rows (torch gives NaN there)
    args = [_bf(a, batch_first) for a in (x, key, val)]
    o_t, w_t = t(*args, key_padding_mask=kpm, attn_mask=am, average_attn_weights=average)
    o_m, w_m = m.torch_forward(*args, key_padding_mask=kpm, attn_mask=am, average_attn_weights=average)
    assert_close(o_m, o_t)
    assert_close(w_m, w_t)
    # the native forward with the converted masks gives the same numbers
    o_n, w_n = m(args[0], context=args[1] if cross else None, value=args[2] if cross else None,
                 key_padding_mask=kpm, torch_attn_mask=am, need_weights=True, average_attn_weights=average)
    assert_close(o_n, o_t)
    assert_close(w_n, w_t)
    gt = torch.autograd.grad(o_t.sum(), x)[0]
    gm = torch.autograd.grad(o_n.sum(), x)[0]
    assert_close(gm, gt, grad=True)


@pytest.mark.parametrize("shape", ["2d", "3d"])
def test_torch_float_and_batched_attn_masks(shape):
    g = torch.Generator().manual_seed(2)
    t = _torch_mha()
    m = MultiHeadAttention.from_torch(t)
    x = torch.randn(2, 5, 12, dtype=F64, generator=g)
    am = torch.randn(5, 5, dtype=F64, generator=g) if shape == "2d" else torch.randn(6, 5, 5, dtype=F64, generator=g)
    am = am.masked_fill(torch.rand(am.shape, generator=g) < 0.3, float("-inf"))
    am[..., 0] = 0.0
    kpm = torch.zeros(2, 5, dtype=F64)
    kpm[0, 3] = -1.5  # torch also takes float key padding masks (added)
    o_t, w_t = t(x, x, x, attn_mask=am, key_padding_mask=kpm, average_attn_weights=False)
    o_m, w_m = m.torch_forward(x, x, x, attn_mask=am, key_padding_mask=kpm, average_attn_weights=False)
    assert_close(o_m, o_t)
    assert_close(w_m, w_t)


def test_bool_mask_polarity_is_the_opposite_of_torch():
    t = _torch_mha()
    m = MultiHeadAttention.from_torch(t)
    x = torch.randn(1, 4, 12, dtype=F64)
    allowed = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert_close(m(x, mask=allowed), t(x, x, x, attn_mask=~allowed)[0])
    assert_close(m(x, mask=M.causal()), t(x, x, x, attn_mask=~allowed)[0])
    assert_close(m(x, torch_attn_mask=~allowed), t(x, x, x, attn_mask=~allowed)[0])


def test_fully_masked_row_gives_zeros_not_nan():
    t = _torch_mha(bias=False)
    m = MultiHeadAttention.from_torch(t)
    x = torch.randn(1, 3, 12, dtype=F64, requires_grad=True)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[1] = False
    out = m(x, mask=allowed)
    assert torch.isnan(t(x, x, x, attn_mask=~allowed)[0]).any()
    assert torch.equal(out[0, 1], torch.zeros(12, dtype=F64))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_from_to_torch_state_dict_round_trip():
    for kw in ({}, {"kdim": 5, "vdim": 7}, {"bias": False}):
        t = _torch_mha(**kw)
        back = MultiHeadAttention.from_torch(t).to_torch()
        sd_t, sd_b = t.state_dict(), back.state_dict()
        assert list(sd_t) == list(sd_b)
        for key in sd_t:
            assert torch.equal(sd_t[key], sd_b[key]), key
        assert back.batch_first == t.batch_first and back.kdim == t.kdim
    m = MultiHeadAttention(12, 3, num_kv_heads=1, dtype=F64)
    m2 = MultiHeadAttention(12, 3, num_kv_heads=1, dtype=F64)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 12, dtype=F64)
    assert torch.equal(m(x), m2(x))


def test_from_to_torch_refusals():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(ValueError, match="grouped-query"):
        MultiHeadAttention(8, 2, num_kv_heads=1).to_torch()
    with pytest.raises(ValueError, match="position"):
        MultiHeadAttention(8, 2, position=Rope()).to_torch()
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))


def _plain(m: MultiHeadAttention, x, ctx, allowed):
    """Float64 formula: project, repeat kv heads, softmax(q k^T / sqrt(D)) with blocked = -inf."""
    B, Nq, _ = x.shape
    H, Hk, D = m.num_heads, m.num_kv_heads, m.head_dim
    q = m.q_proj(x).view(B, Nq, H, D).transpose(1, 2)
    k = m.k_proj(ctx).view(B, -1, Hk, D).transpose(1, 2).repeat_interleave(H // Hk, 1)
    v = m.v_proj(ctx).view(B, -1, Hk, D).transpose(1, 2).repeat_interleave(H // Hk, 1)
    s = (q @ k.transpose(-1, -2)) / D ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(s, -1) @ v
    return m.out_proj(out.transpose(1, 2).reshape(B, Nq, H * D))


@pytest.mark.parametrize("hk", [4, 2, 1])
def test_gqa_self_and_cross_equal_the_formula(hk):
    torch.manual_seed(hk)
    m = MultiHeadAttention(16, 4, num_kv_heads=hk, kdim=16, vdim=16, dtype=F64)
    x, ctx = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 8, 16, dtype=F64)
    causal = M.causal().to_dense(5, 5)
    assert_close(m(x, mask=M.causal()), _plain(m, x, x, causal))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 5:] = True
    assert_close(m(x, context=ctx, key_padding_mask=pad), _plain(m, x, ctx, ~pad[:, None, None, :]))
    # bottom-right causal with a longer context (Nq != Nk)
    assert_close(m(x, context=ctx, mask=M.causal()), _plain(m, x, ctx, M.causal().to_dense(5, 8)))


def _heads(m, x):
    B, N, _ = x.shape
    q = m.q_proj(x).view(B, N, m.num_heads, m.head_dim).transpose(1, 2)
    k = q if m.k_proj is None else m.k_proj(x).view(B, N, m.num_kv_heads, m.head_dim).transpose(1, 2)
    v = m.v_proj(x).view(B, N, m.num_kv_heads, m.head_dim).transpose(1, 2)
    return q, k, v


def _merge(m, out):
    B, H, N, D = out.shape
    return m.out_proj(out.transpose(1, 2).reshape(B, N, H * D))


def _direct(name, m, x, pad):
    """The variant's own function on the module's projections (what MHA must compute)."""
    from attnkit.positions import ALiBi, shaw_attention, xl_attention
    from attnkit.variants import additive, linear, linformer, lsh, nystrom, performer

    q, k, v = _heads(m, x)
    kp = M.key_padding_from_bool(pad)
    if name == "linear":
        return _merge(m, linear.linear_attention(q, k, v, mask=kp))
    if name == "performer":
        return _merge(m, performer.performer_attention(q, k, v, projection=m.core.projection, mask=kp))
    if name == "linformer":
        return _merge(m, linformer.linformer_attention(q, k, v, m.core.e, m.core.f, mask=kp))
    if name == "nystrom":
        return _merge(m, nystrom.nystrom_attention(q, k, v, num_landmarks=3, mask=kp, query_valid=~pad))
    if name == "lsh":
        return _merge(m, lsh.lsh_attention(q, v, n_hashes=2, bucket_size=4, mask=kp, seed=0))
    if name == "additive":
        c = m.core
        return _merge(m, additive.additive_attention(q, k, v, c.w_q, c.w_k, c.v_a, bias=c.b, mask=kp))
    if name == "alibi":
        import attnkit
        return _merge(m, attnkit.attention(q, k, v, mask=kp, bias=ALiBi(4, symmetric=True)))
    if name == "t5":
        import attnkit
        return _merge(m, attnkit.attention(q, k, v, mask=kp, bias=m.pos.t5.spec()))
    if name == "rope":
        import attnkit
        q, k = m.pos.rope.apply(q, k)
        return _merge(m, attnkit.attention(q, k, v, mask=kp))
    if name == "shaw":
        return _merge(m, shaw_attention(q, k, v, m.pos.kernel.rel_k, m.pos.kernel.rel_v, mask=kp))
    if name == "xl":
        xl = m.pos.kernel
        r = xl.relative_keys(q.shape[2], k.shape[2])
        return _merge(m, xl_attention(q, k, v, r, r_w_bias=xl.r_w_bias, r_r_bias=xl.r_r_bias, mask=kp & M.causal()))
    raise AssertionError(name)


VARIANTS = {
    "linear": (Linear(), None),
    "performer": (Performer(num_features=8), None),
    "linformer": (Linformer(max_len=8, proj_dim=3), None),
    "nystrom": (Nystrom(num_landmarks=3), None),
    "lsh": (LSH(n_hashes=2, bucket_size=4), None),
    "additive": (Additive(attn_dim=6), None),
    "alibi": (Softmax(), Alibi()),
    "t5": (Softmax(), T5(num_buckets=8, max_distance=16)),
    "rope": (Softmax(), Rope()),
    "shaw": (Softmax(), Shaw(max_distance=2)),
    "xl": (Softmax(mask=M.causal()), XL()),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_runs_its_function_on_the_heads(name):
    att, pos = VARIANTS[name]
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4, attention=att, position=pos, dtype=F64).eval()
    x = torch.randn(2, 8, 16, dtype=F64, requires_grad=True)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 6:] = True
    out = m(x, key_padding_mask=pad)
    assert out.shape == (2, 8, 16)
    assert_close(out, _direct(name, m, x, pad))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_additive_returns_weights_and_respects_padding():
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 2, attention=Additive(), dtype=F64)
    x, ctx = torch.randn(2, 3, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    out, w = m(x, context=ctx, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    assert w.shape == (2, 2, 3, 5)
    assert torch.equal(w[0, :, :, 3:], torch.zeros(2, 3, 2, dtype=F64))
    assert_close(w.sum(-1), torch.ones(2, 2, 3, dtype=F64))


def test_dropout_is_seeded_and_only_in_training():
    m = MultiHeadAttention(16, 4, dropout=0.5, dtype=F64)
    x = torch.randn(1, 6, 16, dtype=F64)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    assert torch.equal(a, m(x))
    assert not torch.allclose(a, m.eval()(x))


@pytest.mark.parametrize("dtype, exc, match", [
    (torch.int64, TypeError, r"x must be a floating-point tensor \(embeddings, not token ids\), got dtype torch.int64"),
    (torch.float64, TypeError, r"x has dtype torch.float64 but the module's weights are torch.float32; convert one"),
])
def test_input_dtype_errors_name_the_fix(dtype, exc, match):
    """int64 / float64 inputs to float32 weights used to die in a mat1/mat2 dtype error."""
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(exc, match=match):
        mha(torch.ones(1, 3, 8, dtype=dtype))
    with pytest.raises(exc, match=match.replace("x ", "context ").replace(r"x must", "context must")):
        mha(torch.ones(1, 3, 8), context=torch.ones(1, 4, 8, dtype=dtype))


def test_sparse_transformer_head_decodes_with_a_cache():
    """The docs' merged strided head was refused for cached decoding ("is not causal")."""
    torch.manual_seed(0)
    s = 4
    mha = MultiHeadAttention(8, 2, attention=Softmax(mask=M.sliding_window(s - 1) | M.strided(s))).to(F64)
    x = torch.randn(2, 11, 8, dtype=F64)
    full = mha(x)
    cache = mha.make_cache(2, 11)
    steps = torch.cat([mha(x[:, :5], cache=cache)] + [mha(x[:, i:i + 1], cache=cache) for i in range(5, 11)], dim=1)
    assert_close(steps, full)
