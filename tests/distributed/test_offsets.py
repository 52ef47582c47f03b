"""Shifted specs (attnkit.distributed.offsets): a spec at a window's local positions equals the
global spec on that rectangle, tile maps stay conservative, bias gradients land in their piece."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit.biases import TensorBias
from attnkit.distributed.offsets import (
    ShiftedBias,
    ShiftedMask,
    Window,
    add_bias_grads,
    block_status,
    shift_bias,
    shift_mask,
)
from attnkit.positions import ALiBi

from ..strategies import Shape, mask_specs, tile_truth

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def windows(draw, nq_global: int, nk_global: int) -> Window:
    q0 = draw(st.integers(0, nq_global - 1))
    k0 = draw(st.integers(0, nk_global - 1))
    nq = draw(st.integers(1, nq_global - q0))
    nk = draw(st.integers(1, nk_global - k0))
    return Window(q0, nq, k0, nk, nq_global, nk_global)


@st.composite
def cases(draw):
    B, Hq = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Nk = draw(st.integers(2, 14))
    Nq = draw(st.sampled_from([Nk, draw(st.integers(1, 14))]))
    shape = Shape(B, Hq, Hq, Nq, Nk, 2, 2)
    return shape, draw(mask_specs(shape)), draw(windows(Nq, Nk)), draw(st.integers(1, 5)), draw(st.integers(1, 5))


@SETTINGS
@given(cases())
def test_shifted_mask_is_the_global_mask_on_the_window(case):
    shape, mask, w, bq, bk = case
    B, Hq, _, Nq, Nk = shape[:5]
    full = mask.to_dense(Nq, Nk, batch=B, heads=Hq)
    want = full[:, :, w.q0:w.q0 + w.nq, w.k0:w.k0 + w.nk]
    m = shift_mask(mask, w)
    m.check(w.nq, w.nk, batch=B, heads=Hq)
    assert torch.equal(m.to_dense(w.nq, w.nk, batch=B, heads=Hq), want)
    tiles = torch.broadcast_to(m.tiles(w.nq, w.nk, bq, bk, batch=B, heads=Hq), (B, Hq, -(-w.nq // bq), -(-w.nk // bk)))
    any_, all_ = tile_truth(want, bq, bk)
    assert not (any_ & (tiles == M.EMPTY)).any(), "a tile with an allowed pair was called EMPTY"
    assert not (~all_ & (tiles == M.FULL)).any(), "a tile with a blocked pair was called FULL"
    status = block_status(m, w.nq, w.nk, batch=B, heads=Hq)
    assert (status == M.EMPTY) == (not bool(want.any()))


def test_bands_shift_in_closed_form_and_keep_their_type():
    w = Window(q0=8, nq=4, k0=2, nk=6, Nq=16, Nk=16)
    m = shift_mask(M.causal() & M.sliding_window(3), w)
    assert type(m) is M.And and all(type(p) is M.Band for p in m.parts)  # blockwise's band cache applies
    # local query row i sits at local key coordinate i + 2, global i + 8; local key j is global j + 2:
    # global k - q <= 0  <=>  local (j) - (i + 2) <= 4, and k - q >= -3  <=>  local k - q >= 1
    assert (m.parts[0].lo, m.parts[0].hi, m.parts[1].lo, m.parts[1].hi) == (None, 4, 1, 4)
    assert isinstance(shift_mask(M.document(torch.tensor([0, 0, 1, 1] * 4)), w), ShiftedMask)


def test_document_tiles_are_closed_form_on_sorted_ids(monkeypatch):
    ids = torch.tensor([0] * 5 + [1] * 6 + [2] * 5)
    w = Window(q0=4, nq=8, k0=0, nk=8, Nq=16, Nk=16)
    m = shift_mask(M.document(ids), w)
    monkeypatch.setattr(M, "evaluate_tiles", lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated")))
    t = m.tiles(8, 8, 4, 4)  # rows 4..11 x keys 0..7: ids rows [0,1,1,1 | 1,1,1,2], keys [0,0,0,0 | 0,1,1,1]
    assert t[0, 0].tolist() == [[M.PARTIAL, M.PARTIAL], [M.EMPTY, M.PARTIAL]]


def test_shifted_bias_reads_global_positions_and_routes_gradients():
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    dense = torch.randn(1, 2, 10, 12, dtype=torch.float64, requires_grad=True)
    bias = ALiBi(2, slopes=slopes) + TensorBias(dense, 10, 12)
    w = Window(q0=3, nq=4, k0=5, nk=6, Nq=10, Nk=12)
    shifted, slots = shift_bias(bias, w)
    assert isinstance(shifted.parts[0], ShiftedBias) and slots[0] is None and slots[1] is not None
    full = bias.to_dense(10, 12, heads=2, dtype=torch.float64)
    assert torch.equal(shifted.to_dense(4, 6, heads=2, dtype=torch.float64), full[:, :, 3:7, 5:11])
    acc = [torch.zeros_like(slopes), torch.zeros_like(dense)]
    add_bias_grads(acc, [torch.ones(2, dtype=torch.float64), torch.ones(1, 2, 4, 6, dtype=torch.float64)], slots)
    assert acc[0].tolist() == [1.0, 1.0] and acc[1].sum() == 48 and acc[1][:, :, 3:7, 5:11].sum() == 48


def test_shifted_specs_check_the_global_sizes():
    w = Window(q0=0, nq=4, k0=4, nk=4, Nq=8, Nk=8)
    m = shift_mask(M.document(torch.zeros(7, dtype=torch.long)), w)  # ids cover 7 keys, not Nk=8
    try:
        m.check(4, 4)
    except ValueError as e:
        assert "Nk=8" in str(e)
    else:
        raise AssertionError("expected a ValueError")
    q = torch.randn(1, 1, 4, 2)
    out = attnkit.attention(q, q, q, mask=shift_mask(M.causal(), Window(4, 4, 0, 4, 8, 8)))  # all keys in the past
    assert torch.allclose(out, attnkit.attention(q, q, q))
