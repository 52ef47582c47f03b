"""Additive (Bahdanau) attention (attnkit.additive) against the float64 materialised formula.

Naive formula: E = v_a . tanh(W_q q_i + W_k k_j + b) as a (B, H, Nq, Nk, A) tensor, masked
softmax over j (rows with no allowed key -> 0), times v. Checked: random shapes and tile sizes,
every kind of mask spec and dense bool masks, fully masked rows, gradients of every input and
weight, returned weights, lower precision, the memory bound of what autograd saves, the module
as seq2seq cross-attention with a key padding mask.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import AdditiveAttention
from attnkit import masks as M
from attnkit.variants.additive import additive_attention
from tests.strategies import bool_masks, make_qkv, mask_specs, shapes
from tests.tolerances import assert_close


def _weights(H, A, Dq, Dk, seed, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return mk(H, A, Dq), mk(H, A, Dk), mk(H, A), (mk(H, A) if bias else None)


def naive_additive(q, k, v, w_q, w_k, v_a, bias=None, mask=None):
    """Float64 materialised; returns (out (B, H, Nq, Dv), weights (B, H, Nq, Nk))."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    pq = torch.einsum("bhnd,had->bhna", q, w_q)
    if bias is not None:
        pq = pq + bias[None, :, None, :]
    pk = torch.einsum("bhnd,had->bhna", k, w_k)
    e = (torch.tanh(pq[:, :, :, None] + pk[:, :, None]) * v_a[None, :, None, None]).sum(-1)  # (B, H, Nq, Nk)
    if mask is not None:
        allowed = mask.to_dense(Nq, Nk, batch=B, heads=H) if isinstance(mask, M.Mask) else mask.expand(B, H, Nq, Nk)
        e = e.masked_fill(~allowed, float("-inf"))
    mx = e.amax(-1, keepdim=True)
    p = torch.exp(e - torch.where(torch.isfinite(mx), mx, 0.0))
    s = p.sum(-1, keepdim=True)
    w = p / torch.where(s > 0, s, 1.0)
    return w @ v, w


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data(), shape=shapes(max_groups=1), A=st.integers(1, 6), cq=st.integers(1, 5), ck=st.integers(1, 5),
       kind=st.sampled_from(["none", "spec", "bool"]), seed=st.integers(0, 99))
def test_matches_naive_forward_backward(data, shape, A, cq, ck, kind, seed):
    q, k, v = make_qkv(shape, seed=seed)
    Dk = data.draw(st.integers(1, 5))
    k = torch.randn(shape.B, shape.Hk, shape.Nk, Dk, dtype=torch.float64, requires_grad=True)
    w_q, w_k, v_a, b = _weights(shape.Hq, A, shape.D, Dk, seed, bias=data.draw(st.booleans()))
    mask = {"none": None, "spec": lambda: data.draw(mask_specs(shape)), "bool": lambda: data.draw(bool_masks(shape))}[kind]
    mask = mask() if callable(mask) else mask
    out = additive_attention(q, k, v, w_q, w_k, v_a, bias=b, mask=mask, chunk_size=(cq, ck))
    ref, _ = naive_additive(q, k, v, w_q, w_k, v_a, b, mask)
    assert_close(out, ref, backend="blockwise")
    leaves = [t for t in (q, k, v, w_q, w_k, v_a, b) if t is not None]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for a, r in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert_close(a, r, backend="blockwise", grad=True)


def test_fully_masked_rows_zero_output_zero_grad():
    B, H, Nq, Nk, D = 2, 2, 6, 5, 3
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, requires_grad=True) for n in (Nq, Nk, Nk))
    w_q, w_k, v_a, b = _weights(H, 4, D, D, 0)
    allowed = torch.rand(B, H, Nq, Nk, generator=torch.Generator().manual_seed(0)) < 0.5
    allowed[:, :, 2] = False     # whole rows blocked
    allowed[1] = False           # a whole batch entry blocked
    out = additive_attention(q, k, v, w_q, w_k, v_a, bias=b, mask=allowed, chunk_size=(2, 2))
    assert torch.isfinite(out).all() and (out[:, :, 2] == 0).all() and (out[1] == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v, w_q))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, 2] == 0).all() and (grads[0][1] == 0).all() and (grads[1][1] == 0).all()
    ref, _ = naive_additive(q, k, v, w_q, w_k, v_a, b, allowed)
    assert_close(out, ref, backend="blockwise")


def test_return_weights_and_causal_tile_skipping():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64) for n in (9, 13, 13))
    w_q, w_k, v_a, b = _weights(2, 5, 4, 4, 1)
    mask = M.causal() & M.key_padding(torch.tensor([11]))
    out, w = additive_attention(q, k, v, w_q, w_k, v_a, bias=b, mask=mask, return_weights=True, chunk_size=(2, 3))
    ref, ref_w = naive_additive(q, k, v, w_q, w_k, v_a, b, mask)
    assert_close(out, ref, backend="blockwise")
    assert_close(w, ref_w, backend="blockwise")
    assert not w.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision(dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64).to(dtype) for n in (7, 10, 10))
    w_q, w_k, v_a, b = (t.detach().to(dtype) for t in _weights(2, 6, 4, 4, 3))
    out = additive_attention(q, k, v, w_q, w_k, v_a, bias=b, mask=M.causal(), chunk_size=(3, 4))
    assert out.dtype == dtype
    ref, _ = naive_additive(*(t.double() for t in (q, k, v, w_q, w_k, v_a, b)), mask=M.causal())
    assert_close(out, ref, dtype=dtype, backend="blockwise")


def test_autograd_saves_memory_linear_in_n_not_nq_nk_a():
    """What autograd keeps between forward and backward: O(N (A + Dv)), not O(Nq Nk A)."""
    B, H, N, D, A = 1, 2, 96, 8, 16
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    w_q, w_k, v_a, _ = _weights(H, A, D, D, 0, dtype=torch.float32, bias=False)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = additive_attention(q, k, v, w_q, w_k, v_a, chunk_size=(16, 16))
    bound = 8 * B * H * N * (A + D) + 4 * H * A * D  # a few copies of q/k/v and their projections
    assert sum(saved) <= bound < B * H * N * N * A
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    B, N, E = t.shape
    return t.view(B, N, h, E // h).transpose(1, 2)                 # (B, H, N, D)


def test_module_as_seq2seq_cross_attention_with_key_padding():
    """MultiHeadAttention with Additive on another width's context = projections around the
    functional form with the core's per-head weights (checked against the naive formula)."""
    torch.manual_seed(0)
    att = AdditiveAttention(12, 3, attn_dim=7, kdim=10, vdim=12).double()
    dec = torch.randn(2, 4, 12, dtype=torch.float64)         # decoder states (queries)
    enc = torch.randn(2, 9, 10, dtype=torch.float64)         # encoder outputs (keys)
    val = torch.randn(2, 9, 12, dtype=torch.float64)
    is_pad = torch.zeros(2, 9, dtype=torch.bool)
    is_pad[1, 5:] = True                                      # torch MHA polarity: True = padding
    out, w = att(dec, context=enc, value=val, key_padding_mask=is_pad, need_weights=True, average_attn_weights=False)
    assert out.shape == (2, 4, 12) and w.shape == (2, 3, 4, 9)
    assert (w[1, :, :, 5:] == 0).all()
    assert_close(out[1:], att(dec[1:], context=enc[1:, :5], value=val[1:, :5]), backend="blockwise")
    q, k, v = _heads(att.q_proj(dec), 3), _heads(att.k_proj(enc), 3), _heads(att.v_proj(val), 3)
    c = att.core
    ref, _ = naive_additive(q, k, v, c.w_q, c.w_k, c.v_a, c.b, M.key_padding_from_bool(is_pad))
    assert_close(out, att.out_proj(ref.transpose(1, 2).reshape(2, 4, 12)), backend="blockwise")
    out.sum().backward()
    assert all(p.grad is not None for p in att.parameters())


def test_module_values_default_to_keys_and_single_head_is_bahdanau():
    torch.manual_seed(1)
    att = AdditiveAttention(5, kdim=8, vdim=8, attn_dim=6).double()  # num_heads=1: the paper's attention
    s, h = torch.randn(3, 1, 5, dtype=torch.float64), torch.randn(3, 7, 8, dtype=torch.float64)
    ctx = att(s, context=h)                                           # values default to the context
    c = att.core
    e = torch.tanh(att.q_proj(s) @ c.w_q[0].T + att.k_proj(h) @ c.w_k[0].T + c.b[0]) @ c.v_a[0]  # (3, 7)
    want = att.out_proj(torch.softmax(e, -1).unsqueeze(1) @ att.v_proj(h))
    assert_close(ctx, want, backend="blockwise")


def test_errors():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    w_q, w_k, v_a, _ = _weights(2, 3, 4, 4, 0, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"w_q must be \(H, A, Dq\)"):
        additive_attention(q, k, v, w_q[:1], w_k, v_a)
    with pytest.raises(ValueError, match="v_a must have shape"):
        additive_attention(q, k, v, w_q, w_k, v_a[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        additive_attention(q, k, v, w_q.double(), w_k, v_a)
    with pytest.raises(ValueError, match="batch and heads"):
        additive_attention(q, k[:, :1], v[:, :1], w_q, w_k, v_a)
    with pytest.raises(ValueError, match="chunk_size"):
        additive_attention(q, k, v, w_q, w_k, v_a, chunk_size=0)
    with pytest.raises(ValueError, match="does not broadcast"):
        additive_attention(q, k, v, w_q, w_k, v_a, mask=torch.ones(3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        AdditiveAttention(6, 4)
    with pytest.raises(ValueError, match=r"context has shape \(1, 3, 4\), expected \(1, N, 6\)"):
        AdditiveAttention(4, kdim=6)(torch.randn(1, 2, 4), context=torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="attn_dim"):
        AdditiveAttention(4, attn_dim=0)
