"""Linformer: float64 formula (forward and backward), padding, errors, and the lucidrains peer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import LinformerAttention, attention, masks
from attnkit.variants.linformer import Linformer, LinformerCore, linformer_attention
from tests.tolerances import tol

F64 = torch.float64


def formula(q, k, v, e, f, lengths=None):
    """Plain Linformer: per head h, softmax(s q (E_h[:, :Nk] k_h)^T) (F_h[:, :Nk] v_h), via attnkit's reference."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if lengths is not None:
        keep = (torch.arange(Nk)[None, :] < lengths[:, None]).to(q.dtype)[:, None, :, None]
        k, v = k * keep, v * keep
    ee = e[..., :Nk] if e.dim() == 3 else e[:, :Nk].expand(Hk, -1, -1)
    ff = f[..., :Nk] if f.dim() == 3 else f[:, :Nk].expand(Hk, -1, -1)
    kp = torch.einsum("hpn,bhnd->bhpd", ee, k)
    vp = torch.einsum("hpn,bhnd->bhpd", ff, v)
    return attention(q, kp, vp, backend="reference")  # GQA by the reference's own expansion


def grads(out, *ts):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    return torch.autograd.grad(out, ts, g)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), Hk=st.integers(1, 2), groups=st.sampled_from([1, 2]), Nq=st.integers(1, 9),
       Nk=st.integers(1, 11), extra=st.integers(0, 4), D=st.integers(1, 6), Dv=st.integers(1, 5),
       Kp=st.integers(1, 6), per_head=st.booleans(), share=st.booleans(), padded=st.booleans(),
       seed=st.integers(0, 2**16))
def test_matches_formula_forward_backward(B, Hk, groups, Nq, Nk, extra, D, Dv, Kp, per_head, share, padded, seed):
    g = torch.Generator().manual_seed(seed)
    Hq = Hk * groups
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, Hk, Nk, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, Hk, Nk, Dv, generator=g, dtype=F64, requires_grad=True)
    shape = (Hk, Kp, Nk + extra) if per_head else (Kp, Nk + extra)
    e = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    f = e if share else torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    lengths = torch.randint(0, Nk + 1, (B,), generator=g) if padded else None
    kp = masks.key_padding(lengths) if padded else None
    out = linformer_attention(q, k, v, e, None if share else f, mask=kp)
    ref = formula(q, k, v, e, f, lengths)
    torch.testing.assert_close(out, ref, **tol(F64))
    ts = (q, k, v, e) if share else (q, k, v, e, f)
    for a, b in zip(grads(out, *ts), grads(ref, *ts)):
        torch.testing.assert_close(a, b, **tol(F64, grad=True))


def test_padding_equals_unpadded_sequence_and_padded_keys_get_no_gradient():
    g = torch.Generator().manual_seed(0)
    B, H, N, D, Kp = 2, 2, 10, 4, 3
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    e, f = torch.randn(Kp, 16, generator=g, dtype=F64), torch.randn(Kp, 16, generator=g, dtype=F64)
    lengths = torch.tensor([10, 6])
    out = linformer_attention(q, k, v, e, f, mask=masks.key_padding(lengths))
    # Batch element 1 equals its unpadded 6-key sequence (the first 6 columns of E, F).
    short = linformer_attention(q[1:], k[1:, :, :6], v[1:, :, :6], e, f)
    torch.testing.assert_close(out[1:], short, **tol(F64))
    gk, gv = torch.autograd.grad(out.sum(), (k, v))
    assert gk[1, :, 6:].abs().max() == 0 and gv[1, :, 6:].abs().max() == 0
    # The bool form (True = padding) gives the same numbers.
    is_pad = torch.arange(N)[None, :] >= lengths[:, None]
    out2 = linformer_attention(q, k, v, e, f, mask=masks.key_padding_from_bool(is_pad))
    torch.testing.assert_close(out2, out, **tol(F64))


def test_fully_padded_sequence_gives_zeros_and_finite_gradients():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 1, 5, 3, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    e = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    out = linformer_attention(q, k, v, e, mask=masks.key_padding(torch.tensor([5, 0])))
    assert out[1].abs().max() == 0
    for t in torch.autograd.grad(out.sum(), (q, k, v, e)):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("block", [1, 96, 1 << 22])  # rows per block: 1, 4 (13 = 4+4+4+1), all
def test_inference_path_by_query_blocks_equals_formula(monkeypatch, block):
    """Without autograd the scores are built a block of query rows at a time (one row, a ragged
    last block, all rows): the float64 formula's numbers, GQA and padding included."""
    from attnkit.variants import linformer as linformer_module

    monkeypatch.setattr(linformer_module, "_INFERENCE_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 13, 5, generator=g, dtype=F64)
    k, v = (torch.randn(2, 2, 11, 5, generator=g, dtype=F64) for _ in range(2))
    e, f = (torch.randn(2, 3, 12, generator=g, dtype=F64) for _ in range(2))
    lengths = torch.tensor([11, 4])
    out = linformer_attention(q, k, v, e, f, mask=masks.key_padding(lengths))
    torch.testing.assert_close(out, formula(q, k, v, e, f, lengths), **tol(F64))


def test_float32_close_to_float64():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 33, 8, generator=g, dtype=F64) for _ in range(3))
    e, f = (torch.randn(5, 40, generator=g, dtype=F64) / 6 for _ in range(2))
    ref = linformer_attention(q, k, v, e, f)
    out = linformer_attention(*(t.float() for t in (q, k, v, e, f)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32, "linformer"))


def test_errors_name_the_problem():
    q = k = v = torch.randn(1, 2, 6, 4)
    e = torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"Linformer cannot honour the mask causal\(\): every projected key mixes"):
        linformer_attention(q, k, v, e, mask=masks.causal())
    with pytest.raises(ValueError, match="up to L=5 but the keys have Nk=6"):
        linformer_attention(q, k, v, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\(Hk, Kp, L\) with Hk=2"):
        linformer_attention(q, k, v, torch.randn(3, 3, 6))
    with pytest.raises(ValueError, match="same shape as e"):
        linformer_attention(q, k, v, e, torch.randn(4, 6))
    with pytest.raises(ValueError, match="lengths has 2 entries"):
        linformer_attention(q, k, v, e, mask=masks.key_padding(torch.tensor([3, 4])))
    with pytest.raises(ValueError, match="sharing must be one of"):
        Linformer(max_len=8, sharing="layer")


def test_sharing_options_and_layerwise_sharing():
    p = LinformerCore(Linformer(max_len=12, proj_dim=4, sharing="none"), num_kv_heads=3)
    assert p.e.shape == (3, 4, 12) and p.f.shape == (3, 4, 12)
    kv = LinformerCore(Linformer(max_len=12, proj_dim=4, sharing="kv"))
    assert kv.e.shape == (4, 12) and kv.f is None
    a = LinformerAttention(8, 2, max_len=12, proj_dim=4, sharing="kv")
    b = LinformerAttention(8, 2, max_len=12, proj_dim=4, sharing="kv")
    b.core.e = a.core.e  # layerwise sharing: one E for every layer, head, key and value
    assert a.core.e is b.core.e and len(list(b.parameters())) == len(list(a.parameters()))
    x = torch.randn(2, 12, 8)
    a(x).sum().backward()
    b(x).sum().backward()
    assert a.core.e.grad is not None


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("n", [16, 11])
def test_matches_lucidrains_linformer_same_weights(share_kv, n):
    linformer = pytest.importorskip("linformer")
    torch.manual_seed(3)
    dim, heads, seq_len, kp = 12, 3, 16, 5
    peer = linformer.LinformerSelfAttention(dim, seq_len, k=kp, heads=heads, share_kv=share_kv).double().eval()
    ours = LinformerAttention(dim, heads, max_len=seq_len, proj_dim=kp, sharing="kv" if share_kv else "headwise")
    ours = ours.double()
    with torch.no_grad():
        ours.q_proj.weight.copy_(peer.to_q.weight)
        ours.k_proj.weight.copy_(peer.to_k.weight)
        ours.v_proj.weight.copy_(peer.to_k.weight if share_kv else peer.to_v.weight)
        for lin in (ours.q_proj, ours.k_proj, ours.v_proj):
            lin.bias.zero_()  # the peer's q/k/v projections have no bias
        ours.out_proj.weight.copy_(peer.to_out.weight)
        ours.out_proj.bias.copy_(peer.to_out.bias)
        ours.core.e.copy_(peer.proj_k.T)  # the peer stores (L, Kp)
        if not share_kv:
            ours.core.f.copy_(peer.proj_v.T)
    x = torch.randn(2, n, dim, dtype=F64)
    torch.testing.assert_close(ours(x), peer(x), **tol(F64))
