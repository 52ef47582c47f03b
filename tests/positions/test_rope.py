"""RotaryEmbedding: equal to transformers (Llama half-split, GPT-NeoX partial, GPT-J interleaved),
to the complex-number formula in float64, relative (q.k depends on m - n only), and to the full
pass when decoding with an offset."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply
from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import attnkit
from attnkit import masks
from attnkit.positions import RotaryEmbedding, apply_rotary, interleaved_to_half_split
from tests.tolerances import tol


def _hf_cos_sin(head_dim, base, x, position_ids):
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      rope_parameters={"rope_type": "default", "rope_theta": base})
    return LlamaRotaryEmbedding(cfg)(x, position_ids)


def _complex_rope(x, pos, base, rotary_dim):
    """Interleaved RoPE by the definition: pairs (x[2p], x[2p+1]) as complex numbers times e^{i m theta_p}."""
    xr = x[..., :rotary_dim].to(torch.float64)
    z = torch.complex(xr[..., 0::2], xr[..., 1::2])
    theta = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = pos.to(torch.float64)[..., None] * theta  # (..., N, P)
    z = z * torch.polar(torch.ones_like(ang), ang)
    out = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    return torch.cat([out, x[..., rotary_dim:].to(torch.float64)], dim=-1)


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_equals_transformers_llama(base):
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 4, 13, 16
    q, k = torch.randn(B, H, N, D, generator=g), torch.randn(B, 2, N, D, generator=g)
    pos = torch.randint(0, 3000, (B, N), generator=g)
    cos, sin = _hf_cos_sin(D, base, q, pos)  # (B, N, D), duplicated halves
    hq, _ = apply_rotary_pos_emb(q, q, cos, sin)
    hk, _ = apply_rotary_pos_emb(k, k, cos, sin)
    # 1) Same convention: fed transformers' own cos/sin, the rotation is the same to float32 rounding.
    P = D // 2
    torch.testing.assert_close(apply_rotary(q, cos[:, None, :, :P], sin[:, None, :, :P]), hq, **tol(torch.float32))
    torch.testing.assert_close(apply_rotary(k, cos[:, None, :, :P], sin[:, None, :, :P]), hk, **tol(torch.float32))
    # 2) End to end: transformers rounds the angle m * theta to float32 (and theta itself), an
    #    angle error up to 2 * m * 2^-24 rad; ours is computed in float64. Allow exactly that.
    oq, ok = RotaryEmbedding(D, base=base).apply(q, k, pos)
    angle_err = 2 * int(pos.max()) * 2.0**-24
    for got, want, x in ((oq, hq, q), (ok, hk, k)):
        bound = tol(torch.float32)["atol"] + angle_err * x.abs().amax(-1, keepdim=True) * math.sqrt(2)
        assert bool(((got - want).abs() <= bound).all())


def test_partial_rotary_equals_gpt_neox():
    g = torch.Generator().manual_seed(1)
    B, H, N, D, R = 2, 3, 9, 16, 8
    q, k = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    pos = torch.arange(N)[None].expand(B, N) + 5
    cos, sin = _hf_cos_sin(R, 10000.0, q, pos)  # NeoX builds cos/sin for the rotary dims only
    hq, hk = neox_apply(q, k, cos, sin)
    oq, ok = RotaryEmbedding(D, rotary_dim=R).apply(q, k, offset=5)
    torch.testing.assert_close(oq, hq, **tol(torch.float32))
    torch.testing.assert_close(ok, hk, **tol(torch.float32))
    torch.testing.assert_close(oq[..., R:], q[..., R:], rtol=0, atol=0)  # pass-through channels untouched


def test_interleaved_equals_gptj():
    g = torch.Generator().manual_seed(2)
    B, H, N, D, R = 2, 3, 11, 16, 8
    x = torch.randn(B, H, N, D, generator=g)
    pos = torch.randint(0, 200, (B, N), generator=g)
    sincos = create_sinusoidal_positions(256, R)[pos]  # (B, N, R)
    sin, cos = torch.split(sincos, R // 2, dim=-1)
    xt = x.transpose(1, 2)  # GPT-J layout (B, N, H, D)
    want = torch.cat([gptj_apply(xt[..., :R], sin, cos), xt[..., R:]], dim=-1).transpose(1, 2)
    got = RotaryEmbedding(D, interleaved=True, rotary_dim=R).rotate(x, pos)
    torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 6])
def test_float64_formula(interleaved, rotary_dim):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 7, 10, dtype=torch.float64, generator=g)
    pos = torch.randint(0, 10**5, (7,), generator=g)
    r = rotary_dim or 10
    rope = RotaryEmbedding(10, interleaved=interleaved, rotary_dim=rotary_dim)
    if interleaved:
        want = _complex_rope(x, pos, 10000.0, r)
        got = rope.rotate(x, pos)
    else:  # half-split is interleaved after the channel permutation
        perm = torch.cat([interleaved_to_half_split(r), torch.arange(r, 10)])
        inv = torch.argsort(perm)
        want = _complex_rope(x[..., inv], pos, 10000.0, r)[..., perm]
        got = rope.rotate(x, pos)
    # angles pos * theta of up to 1e5 rad carry an absolute rounding error of about pos * u, so
    # the float64 tolerance scales with the largest position (relative to positions of ~1e3)
    t = tol(torch.float64)
    scale = max(1.0, float(pos.max()) / 1e3)
    torch.testing.assert_close(got, want, atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def test_interleaved_equals_half_split_after_permutation():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 12, dtype=torch.float64, generator=g)
    perm = interleaved_to_half_split(12)
    assert perm.tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]
    inter = RotaryEmbedding(12, interleaved=True).rotate(x, offset=3)
    half = RotaryEmbedding(12).rotate(x[..., perm], offset=3)
    torch.testing.assert_close(half, inter[..., perm], **tol(torch.float64))


@pytest.mark.parametrize("interleaved", [False, True])
def test_dot_product_depends_only_on_relative_position(interleaved):
    g = torch.Generator().manual_seed(5)
    rope = RotaryEmbedding(16, interleaved=interleaved)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64, generator=g), torch.randn(1, 1, 1, 16, dtype=torch.float64, generator=g)
    dots = {}
    for m, n in [(0, 0), (5, 5), (900, 900), (7, 3), (104, 100), (3, 7), (1000, 1004)]:
        dots[(m, n)] = float((rope.rotate(q, offset=m) * rope.rotate(k, offset=n)).sum())
    assert dots[(0, 0)] == pytest.approx(float((q * k).sum()), abs=1e-12)
    assert dots[(5, 5)] == pytest.approx(dots[(0, 0)], abs=1e-10)
    assert dots[(900, 900)] == pytest.approx(dots[(0, 0)], abs=1e-10)
    assert dots[(104, 100)] == pytest.approx(dots[(7, 3)], abs=1e-10)
    assert dots[(1000, 1004)] == pytest.approx(dots[(3, 7)], abs=1e-10)
    assert abs(dots[(7, 3)] - dots[(3, 7)]) > 1e-6  # and it does depend on m - n


def test_offset_decoding_equals_full_pass_and_attention():
    g = torch.Generator().manual_seed(6)
    B, H, N, D = 2, 4, 10, 8
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, generator=g) for _ in range(3))
    rope = RotaryEmbedding(D)
    fq, fk = rope.apply(q, k)
    full = attnkit.attention(fq, fk, v, mask=masks.causal(), backend="reference")
    k_cache = rope.rotate(k[:, :, :6])
    for t in range(6, N):
        q1, k1 = rope.apply(q[:, :, t:t + 1], k[:, :, t:t + 1], offset=t)
        torch.testing.assert_close(q1, fq[:, :, t:t + 1], **tol(torch.float64))
        k_cache = torch.cat([k_cache, k1], dim=2)
        out = attnkit.attention(q1, k_cache, v[:, :, :t + 1], mask=masks.causal(), backend="reference")
        torch.testing.assert_close(out, full[:, :, t:t + 1], **tol(torch.float64))
    # Nq < Nk without positions: queries sit bottom-right, at the last Nq key positions.
    bq, bk = rope.apply(q[:, :, -3:], k)
    torch.testing.assert_close(bq, fq[:, :, -3:], **tol(torch.float64))
    torch.testing.assert_close(bk, fk, **tol(torch.float64))


@pytest.mark.parametrize("mask_name", ["sliding", "padding"])
def test_bf16_attention_with_masks_matches_float64(mask_name):
    g = torch.Generator().manual_seed(7)
    B, H, N, D = 2, 2, 12, 16
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, generator=g) for _ in range(3))
    mask = masks.sliding_window(3) if mask_name == "sliding" else masks.key_padding(torch.tensor([12, 7]))
    rope = RotaryEmbedding(D)
    want = attnkit.attention(*rope.apply(q, k), v, mask=mask, backend="reference")
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    rq, rk = rope.apply(qb, kb)
    assert rq.dtype == torch.bfloat16
    torch.testing.assert_close(rq.double(), rope.apply(qb.double(), kb.double())[0], **tol(torch.bfloat16))
    got = attnkit.attention(rq, rk, vb, mask=mask)
    torch.testing.assert_close(got.double(), want, **tol(torch.bfloat16))


def test_gradients_flow_and_match_float64():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    rope = RotaryEmbedding(8)
    rope.rotate(q, offset=2).pow(2).sum().backward()
    # A rotation preserves norms, so d/dq sum(rot(q)^2) = 2 q.
    torch.testing.assert_close(q.grad, 2 * q.detach(), **tol(torch.float64))


def test_cache_grows_and_module_apply_still_works():
    rope = RotaryEmbedding(8)
    c1, _ = rope.cos_sin(10)
    c2, _ = rope.cos_sin(5000)
    torch.testing.assert_close(c2[:10], c1, rtol=0, atol=0)
    assert c2[4999, 0].item() == pytest.approx(math.cos(4999.0), abs=1e-6)
    seen = []
    torch.nn.Sequential(rope).apply(lambda m: seen.append(type(m).__name__))
    assert "RotaryEmbedding" in seen


def test_errors():
    with pytest.raises(ValueError, match="dim must be an even"):
        RotaryEmbedding(7)
    for base in (float("inf"), float("nan"), 0.0, -5, "10000", True):  # inf used to be accepted
        with pytest.raises(ValueError, match=r"base must be a finite number > 0"):
            RotaryEmbedding(8, base=base)
    with pytest.raises(TypeError, match="interleaved must be a bool, got 'no'"):
        RotaryEmbedding(8, interleaved="no")
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(8, rotary_dim=10)
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="built for dim=8"):
        rope.rotate(torch.randn(1, 1, 4, 6))
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        rope.rotate(x, offset=-1)
    with pytest.raises(ValueError, match=r"positions must have shape"):
        rope.rotate(x, torch.arange(5))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope.rotate(x, torch.tensor([0, 1, -2, 3]))
    with pytest.raises(ValueError, match="Nq=5 > Nk=4"):
        rope.apply(torch.randn(1, 1, 5, 8), x)
    with pytest.raises(TypeError, match="integer"):
        rope.rotate(x, torch.arange(4.0))
