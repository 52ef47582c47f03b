"""Ring attention across processes (gloo on CPU, spawned with a free port, a timeout and one thread
per rank): float64 forward and backward equal single-process attnkit.attention within 1e-10 for
every mask and bias family; bytes sent follow the schedule; mismatched calls raise on every rank.

Cases are grouped per spawn (process start-up dominates on a 2-core machine)."""

import pytest

from attnkit import masks as M
from attnkit.distributed.blocks import need_matrix
from attnkit.distributed.launch import spawn
from attnkit.distributed.ring import expected_bytes

from . import workers

EXACT = 1e-10


@pytest.mark.parametrize("world", [2, 4])
def test_ring_equals_single_process_forward_and_backward(world):
    results = spawn(workers.exactness, world, timeout_s=120)
    for rank, per_case in enumerate(results):
        half = per_case.pop("bfloat16")
        assert half["dtypes"] == ["torch.bfloat16"] * 4
        assert all(e <= 1.0 for e in half["relative"].values()), (rank, half)  # within bfloat16's tolerance
        for case, res in per_case.items():
            for what, err in res["errors"].items():
                assert err <= EXACT, f"rank {rank}/{world}, {case}: {what} differs by {err:.3g}"
    # bytes sent: K/V shards along the schedule (P-1 per rank under zigzag, (P-1)/P of the global K/V),
    # dK/dV accumulators along the same hops plus one return hop to the owner
    n = workers.N // world
    for case, mask, layout in (("causal/contiguous", M.causal(), "contiguous"), ("causal/zigzag", M.causal(), "zigzag"),
                               ("window/contiguous", M.sliding_window(6), "contiguous"),
                               ("gqa/zigzag", M.causal(), "zigzag")):  # kv_bytes counts the Hk = 2 heads only
        need = need_matrix(mask, world=world, layout=layout, nq=n, nk=n)
        for rank, per_case in enumerate(results):
            res = per_case[case]
            fwd, bwd = expected_bytes(need, res["kv_bytes"], res["kv_bytes"])[rank]  # float64: dK/dV as big as K/V
            assert (res["sent"].get("forward", 0), res["sent"].get("backward", 0)) == (fwd, bwd), (case, rank)
    zz = [r["causal/zigzag"] for r in results]
    assert all(r["sent"]["forward"] == (world - 1) * r["kv_bytes"] for r in zz)
    if world == 4:
        assert [r["causal/contiguous"]["sent"].get("forward", 0) // r["causal/contiguous"]["kv_bytes"]
                for r in results] == [1, 2, 3, 0]


def test_mismatched_or_invalid_calls_raise_on_every_rank():
    results = spawn(workers.mismatches, 2, timeout_s=60)
    for rank, calls in enumerate(results):
        by_name = {name: (kind, msg, secs) for name, kind, msg, secs in calls}
        for name, want in (("shape", "q:"), ("dtype", "float64"), ("spec", "mask:"),
                           ("invalid on one rank", "invalid input on rank 1"), ("odd zigzag", "must be even")):
            kind, msg, secs = by_name[name]
            assert kind == "RingMismatchError", f"rank {rank}, {name}: {kind}: {msg}"
            assert want in msg, f"rank {rank}, {name}: {msg}"
            assert secs < 20
        assert "ranks 0, 1: " in by_name["odd zigzag"][1]  # every rank reported the same error
        assert by_name["good call after errors"][1] == "(2, 4, 20, 8)"
    assert results[0][0][2] == results[1][0][2]  # the same message on both ranks


def test_a_rank_that_never_calls_gives_a_timeout_error_not_a_hang():
    kind, msg, secs = spawn(workers.silent_peer, 2, timeout_s=30)[0]
    assert kind == "RingTimeoutError" and "same ring_attention calls" in msg
    assert secs < 10


def test_ring_memory_per_rank_is_a_few_shards_and_no_global_tensor():
    """Allocation events of a 4-rank causal zigzag step (float32): no tensor larger than one K/V
    shard (2s, s = one q shard; the global q alone is 4s) and at most 12s live at once (output
    and dq 2s, dK/dV accumulator 2s, current and next K/V shard 4s, the block kernel's buffers
    for one rectangle ~2.3s; the ring before this bound held ~16s)."""
    for rank, r in enumerate(spawn(workers.allocations, 4, 4096, timeout_s=120)):
        assert r["largest"] <= 2 * r["s"], (rank, r)
        assert r["peak"] <= 12 * r["s"], (rank, r["peak"] / r["s"])
