"""The fused engine's closed-form plans (``blockwise_fused``): documents and windows.

Legend: B batch, Hq query heads, Hk kv heads, Nq queries, Nk keys, D head dim (= Dv: the fused
kernel needs equal head dims).

Each test asserts the plan really takes the path under test, then compares forward and
backward with the float64 reference (``test_blockwise.check``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import biases as Bi
from attnkit import masks as M
from attnkit.backends import blockwise_fused as fused
from attnkit.backends.blockwise import BlockwiseOptions, make_plan
from attnkit.backends.blockwise_plan import Docs, Windows
from attnkit.functional import make_call
from tests.backends.test_blockwise import check, run_both
from tests.strategies import Shape, make_qkv

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def _ids(lengths) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


def _items(q, k, v, mask, opts=None):
    return make_plan(make_call(q, k, v, mask=mask), opts or BlockwiseOptions()).items


@st.composite
def doc_cases(draw):
    """(shape, lengths, mask): packed documents (repeated lengths, so equal ones batch) with a
    causal-like band or none; Nq != Nk, GQA, single-key and single-query cases reachable."""
    pool = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    lengths = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=8))
    Nk = sum(lengths)
    Nq = draw(st.one_of(st.just(Nk), st.integers(1, Nk + 4)))
    Hk = draw(st.integers(1, 2))
    shape = Shape(draw(st.integers(1, 2)), Hk * draw(st.integers(1, 3)), Hk, Nq, Nk, 3, 3)
    docs = M.document(_ids(lengths))
    band = draw(st.sampled_from([None, 0, -1, 2]))  # hi of Band(None, hi); -1: first rows see no key
    mask = docs if band is None else docs & M.Band(None, band, f"band({band})")
    return shape, lengths, mask


@SETTINGS
@given(case=doc_cases(), seed=st.integers(0, 9))
def test_documents_as_batched_squares(case, seed):
    shape, lengths, mask = case
    q, k, v = make_qkv(shape, seed=seed)
    items = _items(q, k, v, mask)
    assert items and all(isinstance(it, Docs) for it in items)
    check(*run_both(q, k, v, BlockwiseOptions(), mask=mask))


def test_equal_documents_share_one_call_per_arithmetic_run():
    # the bench's layout in small: lengths cycle, so equal ones are equally spaced, plus a tail
    lengths = [4, 12, 8, 6, 10] * 3 + [4, 4]
    shape = Shape(2, 4, 2, sum(lengths), sum(lengths), 8, 8)
    q, k, v = make_qkv(shape, seed=3)
    mask = M.document(_ids(lengths)) & M.causal()
    items = _items(q, k, v, mask)
    assert sorted((it.L, it.n) for it in items) == [(4, 1), (4, 4), (6, 3), (8, 3), (10, 3), (12, 3)]
    check(*run_both(q, k, v, BlockwiseOptions(), mask=mask))


def test_documents_with_transposed_inputs():
    """q, k, v as (B, N, H, D).transpose(1, 2) views (how attention modules call): the strided
    document views need contiguous tensors, the engine makes them once."""
    lengths = [5, 9, 5, 9, 3]
    N = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, N, 4, 6, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for _ in range(3))
    mask = M.document(_ids(lengths)) & M.causal()
    assert all(isinstance(it, Docs) for it in _items(q, k, v, mask))
    check(*run_both(q, k, v, BlockwiseOptions(), mask=mask))


def test_documents_the_closed_form_does_not_take():
    """Unsorted ids (an id in two runs), per-batch ids, a windowed band and key padding go
    through the tile plan, and stay exact."""
    shape = Shape(2, 2, 1, 20, 20, 4, 4)
    q, k, v = make_qkv(shape, seed=4)
    per_batch = torch.stack([_ids([7, 13]), _ids([10, 10])])
    cases = [M.document(torch.tensor([0] * 5 + [1] * 5 + [0] * 10)) & M.causal(),
             M.document(per_batch) & M.causal(),
             M.document(_ids([7, 13])) & M.sliding_window(3),
             M.document(_ids([7, 13])) & M.causal() & M.key_padding(torch.tensor([15, 20]))]
    for mask in cases:
        assert not any(isinstance(it, Docs) for it in _items(q, k, v, mask))
        check(*run_both(q, k, v, BlockwiseOptions(), mask=mask))


def test_many_varied_documents_fall_back_to_tiles():
    lengths = list(range(1, 25))  # 24 distinct lengths: more calls than max(16, Tq)
    N = sum(lengths)
    q, k, v = make_qkv(Shape(1, 2, 2, N, N, 4, 4), seed=5)
    mask = M.document(_ids(lengths)) & M.causal()
    assert not any(isinstance(it, Docs) for it in _items(q, k, v, mask))
    check(*run_both(q, k, v, BlockwiseOptions(), mask=mask))


@SETTINGS
@given(nq=st.integers(40, 90), extra=st.integers(0, 30), left=st.integers(2, 12), right=st.integers(0, 3),
       groups=st.sampled_from([1, 2]), chunk=st.sampled_from([1, 64, 1 << 20]))
def test_windows_forward_and_chunked_backward(nq, extra, left, right, groups, chunk):
    """Sliding windows as ``Windows`` items (overlapping strided K/V views), the backward's
    window gradients in chunks of ``item_elements`` (1: one block per call), G = 1 (dq rows added
    in place through a view) and G = 2 (through a copy)."""
    shape = Shape(2, 2 * groups, 2, nq, nq + extra, 4, 4)
    q, k, v = make_qkv(shape, seed=nq)
    mask = M.sliding_window(left, right)
    opts = BlockwiseOptions(item_elements=chunk)
    assert any(isinstance(it, Windows) for it in _items(q, k, v, mask, opts))
    check(*run_both(q, k, v, opts, mask=mask))


def test_merge_into_partly_written_rows():
    """``_merge`` on rows of which only some hold a result: the others start from nothing (the
    output buffer is uninitialised), whatever garbage it holds."""
    from attnkit.backends.blockwise_fused import _merge

    g = torch.Generator().manual_seed(0)
    o1, o2 = torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64), torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64)
    s1, s2 = torch.randn(1, 2, 6, generator=g, dtype=torch.float64), torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    out = torch.full((1, 2, 8, 3), float("nan"), dtype=torch.float64)
    lse = torch.full((1, 2, 8), float("nan"), dtype=torch.float64)
    seen = torch.zeros(8, dtype=torch.bool)
    _merge(out, lse, seen, 0, 6, o1, s1)  # rows 0..5
    _merge(out, lse, seen, 2, 8, o2, s2)  # rows 2..7: 2..5 fold, 6..7 are new
    tot = torch.logaddexp(s1[..., 2:], s2[..., :4])
    want = o1[..., 2:, :] * (s1[..., 2:] - tot).exp().unsqueeze(-1) + o2[..., :4, :] * (s2[..., :4] - tot).exp().unsqueeze(-1)
    torch.testing.assert_close(out[..., 2:6, :], want)
    torch.testing.assert_close(out[..., 6:, :], o2[..., 4:, :])
    torch.testing.assert_close(lse[..., 6:], s2[..., 4:])
    torch.testing.assert_close(out[..., :2, :], o1[..., :2, :])
    assert bool(seen.all())


def test_block_backward_into_strided_accumulators_for_whole_and_document_plans():
    """``block_backward(into=...)`` with non-contiguous accumulators (transposed views) on the
    plans that bypass the generic loop: one whole rectangle (causal, dense: the kernel's
    gradients) and documents (strided views need contiguous tensors: added through temporaries)."""
    from attnkit.backends.blockwise import block_backward, block_forward
    from tests.tolerances import assert_close

    g = torch.Generator().manual_seed(6)
    B, Hq, Hk, N, D = 2, 4, 2, 23, 8
    q = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    for mask in (M.causal(), None, M.document(_ids([5, 7, 5, 6])) & M.causal()):
        out, lse = block_forward(q, k, v, mask=mask)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
        want = block_backward(q, k, v, out, lse, dout, mask=mask)[:3]
        into = tuple(torch.randn(x.shape[0], x.shape[2], x.shape[1], D, generator=g, dtype=torch.float64).transpose(1, 2)
                     for x in (q, k, v))  # (B, H, N, D) views of (B, N, H, D) buffers
        before = tuple(t.clone() for t in into)
        got = block_backward(q, k, v, out, lse, dout, mask=mask, into=into)
        assert all(a is b for a, b in zip(got[:3], into))
        for acc, b, w in zip(into, before, want):
            assert_close(acc, b + w, backend="blockwise", grad=True)


@pytest.mark.parametrize("eval_elements", [1, 40, 1 << 20])
def test_rect_masks_evaluated_a_few_rows_at_a_time(eval_elements, monkeypatch):
    """Bias / mask tensors of rectangles are built in row chunks of ``EVAL_ELEMENTS`` values into
    one buffer reused by every item (1: one row per call; 40: chunks that end mid-rectangle):
    head- and batch-dependent bias functions, a dense tensor bias under a mask, masked key
    ranges of tile-map plans, rows with no key; forward and backward vs the reference."""
    monkeypatch.setattr(fused, "EVAL_ELEMENTS", eval_elements)
    shape = Shape(2, 4, 2, 13, 19, 8, 8)
    q, k, v = make_qkv(shape, seed=21)
    head = Bi.from_function(lambda b, h, i, j: -0.1 * (i - j).double() + 0.3 * h.double() - 0.2 * b.double(), name="f")
    dense = torch.randn(1, 4, 13, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    doc = M.document(_ids([5, 6, 8])) & M.causal()
    for mask_elements in (1 << 20, 60):
        opts = BlockwiseOptions(block_q=4, block_k=4, mask_elements=mask_elements)
        for mask, bias in ((M.causal(), head), (doc, head), (M.sliding_window(3, 1), head), (doc, dense),
                           (M.Band(None, -8, "band(None, -8)"), head)):
            plan = make_plan(make_call(q, k, v, mask=mask, bias=bias), opts)
            assert plan.items is not None and plan.fused_backward
            check(*run_both(q, k, v, opts, mask=mask, bias=bias))
