"""Translation-invariant biases in the blockwise tile math (``blockwise_relative``): the strip's
tiles equal the spec at the tile's positions, the per-offset gradient sums equal a brute-force
scatter over every pair, and the tile engine agrees with the reference with the strip and
without it (over budget: the bias is evaluated per tile)."""

from __future__ import annotations

import pytest
import torch

from attnkit import biases as Bi
from attnkit import masks as M
from attnkit.backends import blockwise_relative as R
from attnkit.backends.blockwise import BlockwiseOptions, make_plan
from attnkit.backends.blockwise_tiles import GatherKeys, RangeKeys, positions
from attnkit.functional import make_call
from attnkit.positions import ALiBi, T5RelativeBias
from tests.backends.test_blockwise import check, run_both
from tests.strategies import Shape, make_qkv


def _geometry(nq, nk, hq=4, hk=2, bq=4, bk=3, bias=None):
    q = torch.zeros(1, hq, nq, 8, dtype=torch.float64)
    k = torch.zeros(1, hk, nk, 8, dtype=torch.float64)
    opts = BlockwiseOptions(block_q=bq, block_k=bk, fused=False)
    return make_plan(make_call(q, k, k, bias=bias), opts).geom


def _items(g):
    """(t0, keys, kpos (C, L)): RangeKeys at every (query block, key start) and, when bq == bk, a
    regular GatherKeys of two blocks (each block's keys start one block after its first query)."""
    for t0 in range(g.Tq):
        for k0 in range(0, g.Tk * g.bk - g.bk + 1, g.bk):
            k1 = min(g.Tk * g.bk, k0 + 2 * g.bk)
            yield t0, RangeKeys(k0, k1, False), torch.arange(k0, k1).view(1, -1)
    if g.bq == g.bk and g.Tq >= 2 and g.Tk >= 3:
        idx = torch.tensor([[0, 1], [1, 2]])
        d = -(g.Nk - g.Nq)
        kpos = (idx.unsqueeze(-1) * g.bk + torch.arange(g.bk)).reshape(2, -1)
        yield 0, GatherKeys(idx, torch.ones_like(idx, dtype=torch.bool), False, offset=d), kpos


@pytest.mark.parametrize("bq,bk", [(4, 3), (4, 4)])
@pytest.mark.parametrize("nq,nk", [(13, 13), (7, 17), (17, 7)])
def test_strip_tiles_equal_the_spec_at_the_tile_positions(nq, nk, bq, bk):
    t5 = T5RelativeBias(4, num_buckets=8, max_distance=10, init_std=1.0).double()
    for spec in (t5.spec(), ALiBi(4), t5.spec() + ALiBi(4, symmetric=True)):
        g = _geometry(nq, nk, bq=bq, bk=bk, bias=spec)
        strip = R.BiasStrip.make(g, 1 << 20, "cpu")
        for t0, keys, kpos in _items(g):
            C, L = kpos.shape
            b, h, _, k = positions(g, t0, t0 + C, kpos, "cpu")
            q = (torch.arange(t0 * g.bq, (t0 + C) * g.bq) + g.Nk - g.Nq).view(1, 1, C, 1, g.bq, 1)  # unclamped rows
            want = sum(p(b, h, q, k).to(g.dtype) for p in g.bias_parts).expand(1, g.Hk, C, g.G, g.bq, L)
            got = strip.tile(keys, t0, L)
            torch.testing.assert_close(got.expand_as(want), want, rtol=0, atol=1e-15)


def test_strip_declines_over_budget_and_without_invariant_parts():
    t5 = T5RelativeBias(4, init_std=1.0).double()
    g = _geometry(40, 40, bias=t5.spec())
    size = g.Hq * g.bq * (g.Tk * g.bk + (g.Tq - 1) * g.bq)
    assert R.BiasStrip.make(g, -(-size // R.STRIP_BUDGET), "cpu") is not None
    assert R.BiasStrip.make(g, size // R.STRIP_BUDGET - 1, "cpu") is None
    assert R.BiasStrip.make(_geometry(40, 40), 1 << 20, "cpu") is None
    fn = Bi.from_function(lambda b, h, i, j: 0.5 * i.double())
    f = _geometry(9, 9, bias=t5.spec() + fn)
    only = R.BiasStrip.make(f, 1 << 20, "cpu").S
    torch.testing.assert_close(only, R.BiasStrip.make(_geometry(9, 9, bias=t5.spec()), 1 << 20, "cpu").S)


@pytest.mark.parametrize("nq,nk", [(13, 13), (7, 17), (17, 7)])
def test_offset_sums_equal_a_scatter_over_every_pair(nq, nk):
    g = _geometry(nq, nk, bq=3, bk=3, bias=ALiBi(4))
    gen = torch.Generator().manual_seed(0)
    cases = list(_items(g))
    idx = torch.tensor([[2, 0], [1, 2]])  # irregular: per-tile shear
    cases.append((1, GatherKeys(idx, torch.ones_like(idx, dtype=torch.bool), False, None),
                  (idx.unsqueeze(-1) * g.bk + torch.arange(g.bk)).reshape(2, -1)))
    for t0, keys, kpos in cases:
        C, L = kpos.shape
        ds6 = torch.randn(2, g.Hk, C, g.G, g.bq, L, dtype=torch.float64, generator=gen)
        acc = R.OffsetGrad(g, torch.float64, "cpu")
        acc.add(ds6, keys, t0)
        qpos = (torch.arange(t0 * g.bq, (t0 + C) * g.bq) + g.Nk - g.Nq).view(C, g.bq, 1)
        r = (kpos.reshape(C, 1, L) - qpos).view(1, 1, C, 1, g.bq, L).expand_as(ds6)  # offset of every pair
        want = torch.zeros_like(acc.acc)
        heads = torch.arange(g.Hq).view(1, g.Hk, 1, g.G, 1, 1).expand_as(ds6)
        want.index_put_((heads.reshape(-1), (r + acc.shift).reshape(-1)), ds6.reshape(-1), accumulate=True)
        torch.testing.assert_close(acc.acc, want)


@pytest.mark.parametrize("strip", [True, False])
@pytest.mark.parametrize("sched", ["stream", "gather"])
def test_tile_engine_with_and_without_the_strip(sched, strip, monkeypatch):
    """T5 (learnable) + ALiBi through the tile engine, forward and backward vs the reference, with
    the strip and with the bias evaluated per tile (strip over budget); Nq != Nk, GQA, padding,
    masks giving regular and irregular gathered blocks."""
    if not strip:
        monkeypatch.setattr(R, "STRIP_BUDGET", 0)
    for nq, nk in ((17, 23), (23, 17)):
        q, k, v = make_qkv(Shape(2, 4, 2, nq, nk, 8, 8), seed=3)
        t5 = T5RelativeBias(4, num_buckets=8, max_distance=12, init_std=1.0).double()
        opts = BlockwiseOptions(block_q=4, block_k=3, fused=False, gather_max_keys=1 << 20 if sched == "gather" else 1,
                                gather_max_waste=1e9)
        for mask in (None, M.causal(), M.sliding_window(5, 2)):
            check(*run_both(q, k, v, opts, grads=[t5.weight], bias=t5.spec() + ALiBi(4), mask=mask))
