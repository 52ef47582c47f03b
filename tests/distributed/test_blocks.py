"""One process plays every rank of a ring (attnkit.distributed.blocks): the rectangles of all
ranks, merged by log-sum-exp, give attnkit.attention's output and gradients at global positions;
the schedule delivers every shard a rank needs and skips the rest."""

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit.backends.blockwise import BlockwiseOptions
from attnkit.distributed.blocks import (
    Kernel,
    backward_rect,
    final_lse,
    forward_rect,
    need_matrix,
    new_result,
    plan_rects,
)
from attnkit.distributed.layout import local_positions
from attnkit.distributed.ring import forwarded, last_step, sends_per_rank
from attnkit.positions import ALiBi

from ..strategies import Shape, make_qkv, mask_specs
from ..tolerances import assert_close

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def simulate(q, k, v, dout, *, world, layout, mask=None, bias=None, softcap=None, block=3):
    """Output, dq, dk, dv (global order) and bias-tensor grads of a ring played in one process."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    nq, nk = Nq // world, Nk // world
    kern = Kernel(D ** -0.5, softcap, BlockwiseOptions(block_q=block, block_k=block), q.dtype)
    qpos = [local_positions(layout, nq, r, world) for r in range(world)]
    kpos = [local_positions(layout, nk, r, world) for r in range(world)]
    shard = lambda x, pos: x[:, :, pos]
    tensors = list(bias.tensors()) if bias is not None else []
    bias_acc = [torch.zeros_like(t) for t in tensors]
    out, dq = torch.zeros(B, Hq, Nq, v.shape[3], dtype=q.dtype), torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for r in range(world):
        rects = plan_rects(mask, bias, rank=r, world=world, layout=layout, nq=nq, nk=nk, batch=B, heads=Hq)
        ql, dl = shard(q, qpos[r]), shard(dout, qpos[r])
        o, lse = new_result(ql, v.shape[3], q.dtype)
        for s in range(world):
            for rect in rects[s]:
                forward_rect(kern, rect, ql, shard(k, kpos[s]), shard(v, kpos[s]), o, lse)
        out[:, :, qpos[r]] = o
        gq = torch.zeros_like(ql)
        for s in range(world):
            gk, gv = torch.zeros_like(shard(k, kpos[s])), torch.zeros_like(shard(v, kpos[s]))
            for rect in rects[s]:
                backward_rect(kern, rect, ql, shard(k, kpos[s]), shard(v, kpos[s]), o, final_lse(lse), dl, gq, gk, gv,
                              bias_acc)
            dk[:, :, kpos[s]] += gk
            dv[:, :, kpos[s]] += gv
        dq[:, :, qpos[r]] = gq
    return out, dq, dk, dv, bias_acc


def reference(q, k, v, dout, *, mask=None, bias=None, softcap=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attnkit.attention(*leaves, mask=mask, bias=bias, softcap=softcap, backend="reference")
    tensors = list(bias.tensors()) if bias is not None else []
    grads = torch.autograd.grad(out, leaves + tensors, dout)
    return (out.detach(), *grads[:3], list(grads[3:]))


def check(q, k, v, **kw):
    dout = torch.randn(q.shape[:3] + v.shape[3:], generator=torch.Generator().manual_seed(7), dtype=q.dtype)
    sim = simulate(q, k, v, dout, **kw)
    kw.pop("world"), kw.pop("layout"), kw.pop("block", None)
    ref = reference(q, k, v, dout, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), sim[:4], ref[:4]):
        assert_close(a, b, backend="blockwise", grad=name != "out", msg=name)
    for a, b in zip(sim[4], ref[4]):
        assert_close(a, b, backend="blockwise", grad=True, msg="bias grad")


@st.composite
def ring_cases(draw):
    world = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["contiguous", "zigzag"]))
    unit = 2 * world if layout == "zigzag" else world
    Nk = unit * draw(st.integers(1, 12 // unit + 1))
    Nq = draw(st.sampled_from([Nk, unit * draw(st.integers(1, 12 // unit + 1))]))
    Hk = draw(st.integers(1, 2))
    shape = Shape(draw(st.integers(1, 2)), Hk * draw(st.integers(1, 2)), Hk, Nq, Nk, 3, draw(st.integers(2, 3)))
    mask = draw(st.one_of(st.none(), mask_specs(shape)))
    return shape, world, layout, mask, draw(st.sampled_from([None, 3.0])), draw(st.integers(1, 4)), draw(st.booleans())


@SETTINGS
@given(ring_cases())
def test_every_rank_played_in_one_process_equals_the_whole_attention(case):
    shape, world, layout, mask, softcap, block, alibi = case
    q, k, v = (t.detach() for t in make_qkv(shape, seed=shape.Nq + 10 * world))
    bias = ALiBi(shape.Hq, slopes=torch.linspace(0.1, 0.7, shape.Hq, dtype=torch.float64).requires_grad_()) \
        if alibi else None
    check(q, k, v, world=world, layout=layout, mask=mask, bias=bias, softcap=softcap, block=block)


def test_dense_bias_tensor_gradient_lands_in_each_rectangle():
    q, k, v = (t.detach() for t in make_qkv(Shape(1, 2, 1, 12, 12, 4, 4), seed=1))
    dense = torch.randn(1, 2, 12, 12, dtype=torch.float64, requires_grad=True)
    from attnkit.biases import TensorBias

    check(q, k, v, world=3, layout="zigzag", mask=M.causal(), bias=TensorBias(dense, 12, 12))


def test_causal_needs_and_sends():
    P = 4
    contiguous = need_matrix(M.causal(), world=P, layout="contiguous", nq=8, nk=8)
    assert contiguous == tuple(tuple(s <= r for s in range(P)) for r in range(P))
    assert sends_per_rank(contiguous) == [1, 2, 3, 0]  # rank r forwards shards r..0; rank P-1 none
    zigzag = need_matrix(M.causal(), world=P, layout="zigzag", nq=8, nk=8)
    assert all(all(row) for row in zigzag) and sends_per_rank(zigzag) == [P - 1] * P
    window = need_matrix(M.sliding_window(3), world=P, layout="contiguous", nq=8, nk=8)
    assert sends_per_rank(window) == [1, 1, 1, 0]
    # zigzag causal: rank 0 holds chunks 0, 7 and rank 1 chunks 1, 6 (4 positions each); of the 4
    # rectangles only query chunk 7 against key chunks 1 and 6 are non-empty
    rects = plan_rects(M.causal(), None, rank=0, world=P, layout="zigzag", nq=8, nk=8, batch=1, heads=1)
    assert [(r.q.start, r.k.start) for r in rects[1]] == [(28, 4), (28, 24)]


@given(st.integers(1, 5), st.data())
@settings(max_examples=40, deadline=None, derandomize=True)
def test_schedule_delivers_every_needed_shard_and_returns_accumulators(P, data):
    need = tuple(tuple(data.draw(st.booleans()) for _ in range(P)) for _ in range(P))
    for origin, t in itertools.product(range(P), range(P)):
        holder = (origin + t) % P
        arrived = t == 0 or all(forwarded(need, origin, u) for u in range(t))
        if need[holder][origin]:
            assert arrived, f"rank {holder} needs shard {origin} at step {t} but it is not sent"
        if t >= last_step(need, origin):
            assert not forwarded(need, origin, t)
    assert sum(sends_per_rank(need)) == sum(last_step(need, j) for j in range(P))


def test_learnable_t5_table_gets_its_gradient_at_global_offsets():
    from attnkit.positions import T5Bias

    q, k, v = (t.detach() for t in make_qkv(Shape(2, 4, 2, 24, 24, 4, 4), seed=2))
    table = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    check(q, k, v, world=4, layout="zigzag", mask=M.sliding_window(9, 3), bias=T5Bias(table, max_distance=12))
