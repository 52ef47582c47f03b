"""blockwise backend vs the float64 reference, forward and backward, on hypothesis-drawn shapes.

Legend: B batch, Hq query heads, Hk kv heads, Nq queries, Nk keys, D head dim, Dv value dim.
Tiles are tiny (1..8) so that small shapes cover many tiles, partial tiles, padded tails and
both schedules (stream: online softmax over key runs; gather: batched gathered key tiles).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit import biases as Bi
from attnkit import masks as M
from attnkit.backends import BACKENDS
from attnkit.backends.blockwise import (
    BlockwiseBackend,
    BlockwiseOptions,
    blockwise_attention,
    make_plan,
    shift_free_blocks,
)
from attnkit.functional import make_call
from tests.strategies import Shape, bool_masks, make_qkv, mask_specs, shapes
from tests.tolerances import assert_close

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def options(draw) -> BlockwiseOptions:
    sched = draw(st.sampled_from(["fused", "stream", "gather"]))
    return BlockwiseOptions(
        block_q=draw(st.integers(1, 8)), block_k=draw(st.integers(1, 8)),
        item_elements=draw(st.sampled_from([1, 64, 1 << 20])),
        gather_max_keys=1 << 20 if sched == "gather" else 1, gather_max_waste=1e9,
        fused=sched == "fused", mask_elements=draw(st.sampled_from([1, 64, 1 << 20])),
    )


def run_both(q, k, v, opts, grads=(), seed=0, **kw):
    """(out, grads) of the reference and of blockwise (with ``opts``), same upstream gradient."""
    res = []
    for backend in ("reference", "blockwise"):
        call = make_call(q, k, v, **kw)
        be = BACKENDS["reference"] if backend == "reference" else BlockwiseBackend(opts)
        assert be.not_supported_reasons(call) == []
        out = be.run(call)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(out.dtype)
        inputs = [q, k, v, *grads]
        res.append((out, torch.autograd.grad(out, inputs, g, allow_unused=True)))
    return res


def check(ref, got, dtype=torch.float64):
    (o_ref, g_ref), (o, g) = ref, got
    assert torch.isfinite(o).all()
    assert_close(o, o_ref, dtype, "blockwise")
    for name, a, b in zip("qkvBT", g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, dtype, "blockwise", grad=True, msg=f"grad {name}")


@SETTINGS
@given(data=st.data())
def test_matches_reference_every_mask(data):
    shape = data.draw(shapes(max_len=23))
    mask = data.draw(st.one_of(st.none(), mask_specs(shape), bool_masks(shape)))
    opts = data.draw(options())
    q, k, v = make_qkv(shape, seed=data.draw(st.integers(0, 99)))
    check(*run_both(q, k, v, opts, mask=mask))


@SETTINGS
@given(data=st.data())
def test_bias_softcap_dropout_gradients(data):
    """Float bias tensor (broadcast shapes) + learnable bias spec + softcap + dropout, with grads."""
    shape = data.draw(shapes(max_len=17))
    B, Hq, Hk, Nq, Nk, D, Dv = shape
    opts = data.draw(options())
    q, k, v = make_qkv(shape, seed=1)
    g = torch.Generator().manual_seed(2)
    bsize = (data.draw(st.sampled_from([1, B])), data.draw(st.sampled_from([1, Hq])),
             data.draw(st.sampled_from([1, Nq])), Nk)
    dense = torch.randn(*bsize, generator=g, dtype=torch.float64).requires_grad_(True)
    table = torch.randn(Hq, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    spec = Bi.from_function(lambda b, h, i, j: table[h, (i - j).abs() % 3] + 0.1 * table[h, 0] * (i - j),
                            tensors=[table], name="learned")
    kind = data.draw(st.sampled_from(["tensor", "spec", "sum"]))
    bias = {"tensor": dense, "spec": spec, "sum": Bi.TensorBias(dense, Nq, Nk) + spec}[kind]
    grads = {"tensor": [dense], "spec": [table], "sum": [dense, table]}[kind]
    mask = data.draw(st.one_of(st.none(), mask_specs(shape)))
    softcap = data.draw(st.sampled_from([None, 2.5]))
    p = data.draw(st.sampled_from([0.0, 0.3]))
    check(*run_both(q, k, v, opts, grads=grads, mask=mask, bias=bias, softcap=softcap, dropout_p=p,
                    dropout_seed=data.draw(st.integers(0, 1000))))


def test_large_tiles_and_both_schedules_agree():
    """Default options on a longer sequence: causal + sliding window + document, Nq != Nk, GQA."""
    shape = Shape(2, 4, 2, 300, 517, 16, 8)
    q, k, v = make_qkv(shape, seed=3)
    ids = torch.sort(torch.randint(0, 3, (517,), generator=torch.Generator().manual_seed(0))).values
    for mask in (M.causal(), M.sliding_window(100, 20), M.document(ids) & M.causal(), None):
        for opts in (BlockwiseOptions(), BlockwiseOptions(fused=False), BlockwiseOptions(gather_max_keys=1, fused=False),
                     BlockwiseOptions(gather_max_waste=100.0, fused=False)):
            check(*run_both(q, k, v, opts, mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_tolerance(dtype):
    shape = Shape(1, 2, 1, 200, 260, 16, 16)
    q, k, v = make_qkv(shape, dtype=dtype, seed=4)
    decay = Bi.from_function(lambda b, h, i, j: -0.05 * (i - j).abs().to(torch.float32), name="decay")
    # with the bias spec: running-max softmax; without: shift-free softmax and cached band pattern
    for mask, bias in ((M.causal(), decay), (M.sliding_window(64), decay), (M.causal(), None),
                       (M.sliding_window(64), None)):
        ref = run_both(*(t.detach().double().requires_grad_() for t in (q, k, v)), BlockwiseOptions(block_q=32, block_k=32),
                       mask=mask, bias=bias)[0]
        out = blockwise_attention(q, k, v, mask=mask, bias=bias, options=BlockwiseOptions(block_q=32, block_k=32))
        assert out.dtype == dtype
        gr = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                                             dtype=torch.float64).to(dtype))
        check(ref, (out, gr), dtype)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    shape = Shape(2, 2, 2, 9, 9, 4, 4)
    q, k, v = make_qkv(shape, seed=5)
    mask = M.key_padding(torch.tensor([0, 5])) & M.from_function(lambda b, h, i, j: (i != 3) | (h == 1), name="row3")
    out = blockwise_attention(q, k, v, mask=mask, options=BlockwiseOptions(block_q=4, block_k=4))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, 0, 3], torch.zeros_like(out[1, 0, 3]))
    out.sum().backward()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0])) and torch.isfinite(q.grad).all()
    assert torch.equal(q.grad[1, 0, 3], torch.zeros_like(q.grad[1, 0, 3]))
    assert torch.equal(k.grad[0], torch.zeros_like(k.grad[0])) and torch.isfinite(v.grad).all()


def test_dropout_pattern_equals_reference_exactly():
    shape = Shape(1, 2, 1, 40, 50, 8, 8)
    q, k, v = make_qkv(shape, seed=6, requires_grad=False)
    a = attnkit.attention(q, k, v, dropout_p=0.5, dropout_seed=7, backend="reference")
    b = attnkit.attention(q, k, v, dropout_p=0.5, dropout_seed=7, backend="blockwise")
    c = attnkit.attention(q, k, v, dropout_p=0.5, dropout_seed=8, backend="blockwise")
    assert_close(b, a, torch.float64, "blockwise")
    assert (c - a).abs().max() > 1e-3  # a different seed gives a different pattern


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op returns (the test's instrument for O(N^2) memory)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("mask", [M.causal(), M.sliding_window(64)], ids=repr)
def test_no_nq_by_nk_tensor_in_forward_or_backward(mask):
    N, D = 1024, 8
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    table = torch.zeros(1, requires_grad=True)
    bias = Bi.from_function(lambda b, h, i, j: table[0] * (i - j).float(), tensors=[table], name="slope")
    opts = BlockwiseOptions(block_q=64, block_k=64, item_elements=64 * 256, mask_elements=64 * 256)
    with _MaxNumel() as rec:
        out = blockwise_attention(q, k, v, mask=mask, bias=bias, options=opts)
        out.sum().backward()
    assert table.grad is not None
    assert rec.max_numel <= 4 * N * D  # inputs and O(N * D) buffers; the scores would be N * N


@st.composite
def band_masks(draw, shape: Shape) -> M.Mask:
    """Bands (causal, windows, arbitrary [lo, hi], possibly empty rows) and their & / |."""
    def band():
        lo = draw(st.one_of(st.none(), st.integers(-shape.Nk, 3)))
        hi = draw(st.one_of(st.none(), st.integers(-3, shape.Nk)))
        return M.Band(lo, hi, f"Band({lo}, {hi})")
    kind = draw(st.sampled_from(["causal", "window", "band", "and", "or"]))
    if kind == "causal":
        return M.causal()
    if kind == "window":
        return M.sliding_window(draw(st.integers(0, 6)), draw(st.integers(0, 2)))
    if kind == "band":
        return band()
    return (band() & band()) if kind == "and" else (band() | band())


@SETTINGS
@given(data=st.data())
def test_bands_shift_free_and_max_paths(data):
    """Band masks through the cached band pattern (regular blocks) and the per-tile path
    (boundary blocks, padding, Nq != Nk), with the shift-free softmax (unit-scale inputs) and
    with the running-max softmax (inputs scaled so that the score bound exceeds it)."""
    shape = data.draw(shapes(max_len=40))
    mask = data.draw(band_masks(shape))
    assert mask.translation_invariant
    opts = data.draw(options())
    big = data.draw(st.booleans())
    q, k, v = make_qkv(shape, seed=data.draw(st.integers(0, 99)), scale=8.0 if big else 1.0)
    check(*run_both(q, k, v, opts, mask=mask))


def test_shift_free_only_when_bounded():
    """The bound |scale| |q| max|k| (or the softcap) decides; bias specs always take the max path."""
    q, k, v = make_qkv(Shape(1, 2, 1, 64, 64, 8, 8), seed=0, requires_grad=False)
    plan = make_plan(make_call(q, k, v, mask=M.causal()), BlockwiseOptions(block_q=16, block_k=16, fused=False))
    assert shift_free_blocks(plan.geom, q, k) == [True] * 4
    q2 = q.clone()
    q2[0, 1, 40] *= 100.0  # one huge query row: only its block (rows 32..47) loses the fast path
    assert shift_free_blocks(plan.geom, q2, k) == [True, True, False, True]
    capped = make_plan(make_call(q2, k, v, softcap=5.0), BlockwiseOptions(block_q=16, block_k=16))
    assert shift_free_blocks(capped.geom, q2, k) == [True] * 4
    bias = Bi.from_function(lambda b, h, i, j: -0.01 * (i - j).abs().to(torch.float64), name="decay")
    biased = make_plan(make_call(q, k, v, bias=bias), BlockwiseOptions(block_q=16, block_k=16))
    assert shift_free_blocks(biased.geom, q, k) == [False] * 4
    nan = q.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert shift_free_blocks(plan.geom, nan, k)[0] is False


@pytest.mark.parametrize("big", [False, True])
def test_gather_with_many_key_tiles(big):
    """Tk >= 128 key tiles in the gather schedule (an int8 sort key once overflowed there and
    gathered empty tiles), interior blocks through the cached band pattern, Nq != Nk, GQA."""
    shape = Shape(1, 4, 2, 280, 301, 8, 8)
    q, k, v = make_qkv(shape, seed=7, scale=6.0 if big else 1.0)
    opts = BlockwiseOptions(block_q=2, block_k=2, item_elements=4096, fused=False)
    mask = M.sliding_window(5, 1)
    plan = make_plan(make_call(q, k, v, mask=mask), opts)
    assert plan.schedule == "gather" and plan.geom.Tk >= 128
    assert all(shift_free_blocks(plan.geom, q.detach(), k.detach())) != big
    offsets = {it.offset for _, _, items in plan.groups for it in items}
    assert len(offsets - {None}) == 1  # interior groups share one offset (one cached pattern)
    check(*run_both(q, k, v, opts, mask=mask))


def test_tiles_empty_are_skipped_and_full_are_unmasked():
    call = make_call(*make_qkv(Shape(1, 1, 1, 256, 256, 4, 4)), mask=M.sliding_window(32))
    plan = make_plan(call, BlockwiseOptions(block_q=32, block_k=32, gather_max_keys=1, fused=False))
    assert plan.schedule == "stream"
    for t0, _, items in plan.groups:
        spans = [(it.k0, it.k1, it.masked) for it in items]
        # query block t: the diagonal tile and the one before, both partial (one run), nothing else
        want = [(32 * (t0 - 1), 32 * (t0 + 1), True)] if t0 else [(0, 32, True)]
        assert spans == want
    plan = make_plan(call, BlockwiseOptions(block_q=32, block_k=32, fused=False))
    assert plan.schedule == "gather"
    dense_plan = make_plan(make_call(*make_qkv(Shape(1, 1, 1, 256, 256, 4, 4))), BlockwiseOptions(block_k=64, block_q=64,
                                                                                                    gather_max_keys=1, fused=False))
    assert all(not it.masked for _, _, items in dense_plan.groups for it in items)


def test_local_attention_peer_equals_sliding_window():
    local_attention = pytest.importorskip("local_attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16, dtype=torch.float64) for _ in range(3))
    peer = local_attention.LocalAttention(window_size=64, causal=True, look_backward=1, look_forward=0,
                                          exact_windowsize=True, use_rotary_pos_emb=False, autopad=True, dim=16)
    ours = blockwise_attention(q, k, v, mask=M.sliding_window(64))
    assert_close(ours, peer(q, k, v), torch.float64, "blockwise")


def test_reasons_and_errors():
    q, k, v = make_qkv(Shape(1, 1, 1, 4, 4, 2, 2), requires_grad=False)
    reasons = BACKENDS["blockwise"].not_supported_reasons(make_call(q, k, v, return_weights=True))
    assert any("weights" in r for r in reasons)
    with pytest.raises(ValueError, match="block_q"):
        BlockwiseOptions(block_q=0)
    with pytest.raises(ValueError, match="cannot run"):
        blockwise_attention(q, k, v, bias=Bi.TensorBias(torch.zeros(4, 4, dtype=torch.float64, device="meta"), 4, 4))


def test_auto_decision_table_cpu():
    big = Shape(1, 8, 8, 2048, 2048, 8, 8)
    q, k, v = make_qkv(big, requires_grad=False)
    which = lambda **kw: attnkit.which_backend(q, k, v, **kw)
    assert which() == "sdpa" and which(mask=M.causal()) == "sdpa"
    assert which(mask=M.sliding_window(256)) == "blockwise"
    assert which(mask=M.causal(), bias=Bi.from_function(lambda b, h, i, j: -0.01 * (i - j).float())) == "blockwise"
    assert which(softcap=5.0) == "blockwise" and which(dropout_p=0.1, dropout_seed=1) == "blockwise"
    assert which(return_weights=True) == "reference"
    small = make_qkv(Shape(1, 2, 2, 64, 64, 8, 8), requires_grad=False)
    assert attnkit.which_backend(*small, mask=M.sliding_window(8)) == "sdpa"


def test_block_functions_merge_over_key_blocks_like_the_whole_attention():
    """block_forward's (out, lse) over two disjoint key sets merge by log-sum-exp into the whole
    attention; block_backward with the merged (out, lse) gives gradients that sum to the whole."""
    from attnkit.backends.blockwise import block_backward, block_forward

    g = torch.Generator().manual_seed(3)
    B, Hq, Hk, Nq, Nk, D = 2, 4, 2, 21, 37, 8
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64) for h, n in ((Hq, Nq), (Hk, Nk), (Hk, Nk)))
    opts = BlockwiseOptions(block_q=8, block_k=8)
    parts = [(k[:, :, :16], v[:, :, :16]), (k[:, :, 16:], v[:, :, 16:])]
    res = [block_forward(q, kk, vv, options=opts) for kk, vv in parts]
    lse = torch.logaddexp(res[0][1], res[1][1])  # (B, Hq, Nq)
    out = sum(o * torch.exp(s - lse).unsqueeze(-1) for o, s in res)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = attnkit.attention(qr, kr, vr, backend="reference")
    assert_close(out, ref.detach(), backend="blockwise")
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gq, gk, gv = torch.autograd.grad(ref, (qr, kr, vr), dout)
    grads = [block_backward(q, kk, vv, out, lse, dout, options=opts) for kk, vv in parts]
    assert_close(grads[0][0] + grads[1][0], gq, backend="blockwise", grad=True)
    assert_close(torch.cat([grads[0][1], grads[1][1]], dim=2), gk, backend="blockwise", grad=True)
    assert_close(torch.cat([grads[0][2], grads[1][2]], dim=2), gv, backend="blockwise", grad=True)


@pytest.mark.parametrize("fused", [True, False])
def test_block_backward_into_adds_in_place_and_returns_the_accumulators(fused):
    """``into=(dq, dk, dv)`` (views of one packed buffer, holding earlier blocks' sums) gets the
    block's gradients added in place, on both engines; wrong accumulators are a clear error."""
    from attnkit.backends.blockwise import block_backward, block_forward

    g = torch.Generator().manual_seed(5)
    B, Hq, Hk, Nq, Nk, D = 1, 4, 2, 19, 26, 8
    q, k, v, prior = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
                      for h, n in ((Hq, Nq), (Hk, Nk), (Hk, Nk), (Hq, Nq)))
    opts = BlockwiseOptions(block_q=8, block_k=8, fused=fused)
    mask = M.causal()
    out, lse = block_forward(q, k, v, mask=mask, options=opts)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    want = block_backward(q, k, v, out, lse, dout, mask=mask, options=opts)[:3]
    packed = torch.randn(k.numel() + v.numel(), generator=g, dtype=torch.float64)
    dk, dv = packed[:k.numel()].view(k.shape), packed[k.numel():].view(v.shape)
    dq, before = prior.clone(), (prior.clone(), dk.clone(), dv.clone())
    got = block_backward(q, k, v, out, lse, dout, mask=mask, options=opts, into=(dq, dk, dv))
    assert got[0] is dq and got[1] is dk and got[2] is dv and got[3] == []
    for acc, b, w in zip((dq, dk, dv), before, want):
        assert_close(acc, b + w, backend="blockwise", grad=True)
    with pytest.raises(ValueError, match="into's dk must have shape"):
        block_backward(q, k, v, out, lse, dout, mask=mask, options=opts, into=(dq, dq, dv))
    with pytest.raises(TypeError, match="into must be None or a"):
        block_backward(q, k, v, out, lse, dout, mask=mask, options=opts, into=dq)


@pytest.mark.parametrize("fused", [True, False])
def test_rows_blocked_by_minus_inf_bias_give_zeros(fused):
    """A dense bias holding -inf blocks whole rows: zeros and zero gradients, on both engines."""
    shape = Shape(1, 2, 1, 20, 20, 4, 4)
    q, k, v = make_qkv(shape, seed=8)
    bias = torch.zeros(1, 1, 20, 20, dtype=torch.float64)
    bias[0, 0, 5] = float("-inf")
    bias[0, 0, 7, :13] = float("-inf")
    check(*run_both(q, k, v, BlockwiseOptions(block_q=4, block_k=4, fused=fused), bias=bias, mask=M.causal()))


@pytest.mark.parametrize("kind", ["mask", "bias", "softcap"])
def test_double_backward_matches_reference(kind):
    """create_graph=True (a gradient penalty): the gradient carries a graph and its own gradient
    equals the reference's double backward (issue 10: never drop the graph silently)."""
    shape = Shape(2, 4, 2, 11, 13, 4, 4)
    table = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    spec = Bi.from_function(lambda b, h, i, j: table[h, (i - j).abs() % 3], tensors=[table], name="t")
    kw = {"mask": dict(mask=M.sliding_window(4, 1)), "bias": dict(bias=spec, mask=M.causal()),
          "softcap": dict(softcap=2.0, dropout_p=0.2, dropout_seed=5)}[kind]
    res = []
    for backend in ("reference", "blockwise"):
        q, k, v = make_qkv(shape, seed=9)
        out = attnkit.attention(q, k, v, backend=backend, **kw)
        inputs = [q, k, v] + ([table] if kind == "bias" else [])
        grads = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
        assert all(g.requires_grad for g in grads)
        penalty = sum(g.pow(2).sum() for g in grads)
        res.append((grads, torch.autograd.grad(penalty, inputs)))
    for (g_ref, gg_ref), (g, gg) in zip([res[0]], [res[1]]):
        for a, b in zip(g, g_ref):
            assert_close(a, b, torch.float64, "blockwise", grad=True)
        for a, b in zip(gg, gg_ref):
            assert_close(a, b, torch.float64, "blockwise", grad=True)


def test_decode_step_on_a_long_cache_reads_only_allowed_keys():
    """One query against a 32k-key cache with a window or document mask: auto runs blockwise
    (no materialised mask, only the allowed keys are read) and matches sdpa with the dense mask."""
    from attnkit.bench.cases_softmax import _doc_ids

    Nk = 32768
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, Nk, 16, generator=g), torch.randn(1, 2, Nk, 16, generator=g)
    for mask in (M.sliding_window(256), M.document(_doc_ids(Nk)) & M.causal()):
        assert attnkit.which_backend(q, k, v, mask=mask) == "blockwise"
        plan = make_plan(make_call(q, k, v, mask=mask), BlockwiseOptions())
        area = [it.n * it.R * it.L if hasattr(it, "L") else (it.r1 - it.r0) * (it.k1 - it.k0) for it in plan.items]
        assert sum(area) <= 2048  # keys read, not 32k (Docs items: n documents of R rows, L keys)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask.to_dense(1, Nk))
        assert_close(attnkit.attention(q, k, v, mask=mask), want, torch.float32, "blockwise")


@pytest.mark.parametrize("sched", ["fused", "stream", "gather"])
@pytest.mark.parametrize("kind", ["t5", "alibi", "alibi_sym", "alibi_fixed", "t5_fixed"])
def test_translation_invariant_bias_gradients_by_offset(kind, sched):
    """Learnable T5 table / ALiBi slopes: their gradients come from per-offset sums of dS (the
    tile backward's OffsetGrad), equal to the reference's autograd, with Nq != Nk, GQA, padding.
    Fixed ones run the fused engine's strip (one bias tensor per pass) forward and backward."""
    from attnkit.positions import ALiBi, T5RelativeBias

    shape = Shape(2, 4, 2, 17, 23, 8, 8)
    q, k, v = make_qkv(shape, seed=10)
    if kind.startswith("t5"):
        mod = T5RelativeBias(4, init_std=1.0).double().requires_grad_(kind == "t5")
        spec, tensors = mod.spec(), [mod.weight] if kind == "t5" else []
    elif kind == "alibi_fixed":
        spec, tensors = ALiBi(4), []
    else:
        slopes = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        spec, tensors = ALiBi(4, slopes=slopes, symmetric=kind == "alibi_sym"), [slopes]
    assert spec.translation_invariant
    opts = BlockwiseOptions(block_q=4, block_k=3, fused=sched == "fused", gather_max_keys=1 << 20 if sched == "gather" else 1,
                            gather_max_waste=1e9)
    for mask in (None, M.causal(), M.sliding_window(5, 2)):
        check(*run_both(q, k, v, opts, grads=tensors, bias=spec, mask=mask))


@pytest.mark.parametrize("mask_elements", [1 << 20, 4000, 300])
@pytest.mark.parametrize("nq,nk", [(37, 37), (20, 45), (45, 20)])
def test_causal_like_band_with_bias_in_bands(nq, nk, mask_elements):
    """Causal-like bands (any diagonal offset) with a head-dependent bias spec: bands of rows,
    each a full and a kernel-causal rectangle carrying the bias (fused engine), vs the reference."""
    shape = Shape(2, 4, 2, nq, nk, 8, 8)
    q, k, v = make_qkv(shape, seed=11)
    bias = Bi.from_function(lambda b, h, i, j: -0.05 * (i - j).double() + 0.1 * h.double(), name="f")
    opts = BlockwiseOptions(block_q=8, block_k=8, mask_elements=mask_elements)
    for mask in (M.causal(), M.Band(None, 3, "band(None, 3)"), M.Band(None, -5, "band(None, -5)")):
        check(*run_both(q, k, v, opts, mask=mask, bias=bias))


@pytest.mark.parametrize("mask_elements", [1 << 20, 4000, 1200])
@pytest.mark.parametrize("nq,nk", [(37, 37), (20, 45), (45, 20), (1, 30)])
def test_causal_alibi_key_row_plan(nq, nk, mask_elements):
    """Causal-like bands with biases linear in the offset (causal ALiBi, and a sum of two):
    full rectangles carry a (1, Hq, 1, L) key row with a per-query log-sum-exp shift, causal
    squares one shared strip; forward and backward against the reference, with GQA, Nq != Nk,
    rows with no key (band(None, -5) when Nq > Nk) and several bands (small mask budgets)."""
    from attnkit.backends.blockwise_fused import Rect
    from attnkit.positions import ALiBi

    shape = Shape(2, 4, 2, nq, nk, 8, 8)
    q, k, v = make_qkv(shape, seed=12)
    slopes = torch.tensor([0.5, 0.25, 2.0, 1e-3], dtype=torch.float64)
    opts = BlockwiseOptions(block_q=8, block_k=8, mask_elements=mask_elements)
    for bias in (ALiBi(4, slopes=slopes), ALiBi(4) + ALiBi(4, slopes=slopes)):
        for mask in (M.causal(), M.Band(None, 3, "band(None, 3)"), M.Band(None, -5, "band(None, -5)")):
            plan = make_plan(make_call(q, k, v, mask=mask, bias=bias), opts)
            rects = [it for it in plan.items if isinstance(it, Rect)]
            if mask_elements == 4000 and nq > 16:
                assert any(it.strip for it in rects)  # the key-row plan ran, in several 16-row bands
                assert all(it.linear or it.strip for it in rects)
            check(*run_both(q, k, v, opts, mask=mask, bias=bias))


def test_causal_alibi_key_row_plan_float32_long():
    """float32, 600 keys in 16-row bands, steep slopes (biases down to -600): the key rows and
    log-sum-exp shifts lose nothing against the float64 reference (tolerance table)."""
    from attnkit.positions import ALiBi

    shape = Shape(1, 4, 4, 600, 600, 16, 16)
    q, k, v = make_qkv(shape, seed=13, dtype=torch.float32)
    bias = ALiBi(4, slopes=torch.tensor([1.0, 0.1, 0.01, 1e-4]))
    opts = BlockwiseOptions(mask_elements=4 * 64 * 64)
    got = run_both(q, k, v, opts, mask=M.causal(), bias=bias)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = run_both(q64, k64, v64, opts, mask=M.causal(), bias=bias)[0]
    check(ref, got[1], torch.float32)
