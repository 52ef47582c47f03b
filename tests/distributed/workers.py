"""Functions run on every rank by tests/distributed/test_ring.py (through attnkit's spawn helper).

Each returns plain data (numbers, strings) for the test to assert on, so a failure shows in the
test's own report. Legend: B batch, Hq / Hk heads, N global length, n = N / P, D head dim.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import attnkit
from attnkit import masks as M
from attnkit.backends.blockwise import BlockwiseOptions
from attnkit.biases import TensorBias
from attnkit.distributed import RingOptions, count_bytes, gather_sequence, ring_attention, shard_sequence
from attnkit.positions import ALiBi

B, HQ, N, D = 2, 4, 40, 8
OPTS = RingOptions(timeout_s=60, block=BlockwiseOptions(block_q=4, block_k=4))


def _cases(gen):
    ids = torch.tensor([0] * 7 + [1] * 15 + [2] * 11 + [3] * 7)  # sorted document ids of the global sequence
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    dense_bias = torch.randn(1, HQ, N, N, generator=gen, dtype=torch.float64)
    bool_mask = torch.rand(B, 1, N, N, generator=gen) < 0.7
    # name: (layout, Hk, mask, bias builder (leaf -> spec) or None, bias leaf, softcap)
    return {
        "dense/contiguous": ("contiguous", HQ, None, None, None, None),
        "dense/zigzag": ("zigzag", HQ, None, None, None, None),
        "causal/contiguous": ("contiguous", HQ, M.causal(), None, None, None),
        "causal/zigzag": ("zigzag", HQ, M.causal(), None, None, None),
        "window/contiguous": ("contiguous", HQ, M.sliding_window(6), None, None, None),
        "window/zigzag": ("zigzag", HQ, M.sliding_window(6, 2), None, None, None),
        "document/zigzag": ("zigzag", HQ, M.document(ids) & M.causal(), None, None, None),
        "alibi/zigzag": ("zigzag", HQ, M.causal(), lambda s: ALiBi(HQ, slopes=s), slopes, None),
        "gqa/zigzag": ("zigzag", 2, M.causal(), None, None, None),
        "mqa/contiguous": ("contiguous", 1, M.sliding_window(9), None, None, None),
        "softcap/zigzag": ("zigzag", HQ, None, None, None, 5.0),
        "tensors/contiguous": ("contiguous", 2, bool_mask, lambda t: TensorBias(t, N, N), dense_bias, None),
    }


def exactness(rank: int, world: int) -> dict:
    """Per case: max |ring - single process| of out, dq, dk, dv, bias grads; bytes sent."""
    gen = torch.Generator().manual_seed(0)
    results = {}
    for name, (layout, hk, mask, make_bias, leaf, softcap) in _cases(gen).items():
        q = torch.randn(B, HQ, N, D, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(B, hk, N, D, generator=gen, dtype=torch.float64) for _ in range(2))
        dout = torch.randn(B, HQ, N, D, generator=gen, dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        bleaf = leaf.clone().requires_grad_() if leaf is not None else None
        ref = attnkit.attention(*full, mask=mask, bias=make_bias(bleaf) if leaf is not None else None,
                                softcap=softcap)
        ref.backward(dout)
        shard = lambda x, layout=layout: shard_sequence(x, 2, layout=layout)
        local = [shard(t).requires_grad_() for t in (q, k, v)]
        rleaf = leaf.clone().requires_grad_() if leaf is not None else None
        with count_bytes() as c:
            out = ring_attention(*local, mask=mask, bias=make_bias(rleaf) if leaf is not None else None,
                                 softcap=softcap, layout=layout, options=OPTS)
            out.backward(shard(dout))
        errs = {"out": (out - shard(ref)).abs().max().item(),
                "gathered out": (gather_sequence(out.detach(), 2, layout=layout) - ref).abs().max().item()}
        for what, a, b in zip(("dq", "dk", "dv"), local, full):
            errs[what] = (a.grad - shard(b.grad)).abs().max().item()
        if rleaf is not None:
            dist.all_reduce(rleaf.grad)  # each rank holds its share of a parameter's gradient
            errs["bias"] = (rleaf.grad - bleaf.grad).abs().max().item()
        results[name] = {"errors": errs, "sent": dict(c.sent), "kv_bytes": k.element_size() * 2 * k.numel() // world}
    results["bfloat16"] = _half_precision(rank, world, gen)
    return results


def _half_precision(rank: int, world: int, gen) -> dict:
    """bfloat16 shards (K/V travel in bfloat16, statistics and dK/dV accumulators in float32)
    against a float64 single-process run: errors relative to the bfloat16 tolerance."""
    from attnkit.tolerances import tol

    q, k, v, dout = (torch.randn(B, h, N, D, generator=gen, dtype=torch.float64) for h in (HQ, 2, 2, HQ))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attnkit.attention(*full, mask=M.causal())
    ref.backward(dout)
    local = [shard_sequence(t, 2).to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, mask=M.causal(), options=OPTS)
    out.backward(shard_sequence(dout, 2).to(torch.bfloat16))
    errs = {}
    for name, a, b, grad in (("out", out, ref, False), *((n, t.grad, f.grad, True) for n, t, f in
                                                            zip(("dq", "dk", "dv"), local, full))):
        t = tol(torch.bfloat16, "blockwise", grad)
        want = shard_sequence(b.detach(), 2)
        errs[name] = ((a.double() - want).abs() / (t["atol"] + t["rtol"] * want.abs())).max().item()
    return {"relative": errs, "dtypes": [str(t.grad.dtype) for t in local] + [str(out.dtype)]}


def mismatches(rank: int, world: int) -> list:
    """Calls that disagree across ranks or are invalid on one rank: (error type, message, seconds)."""
    gen = torch.Generator().manual_seed(1)
    n = N // world
    q, k, v = (torch.randn(B, HQ, n, D, generator=gen) for _ in range(3))
    opts = RingOptions(timeout_s=20)
    calls = [
        ("shape", lambda: ring_attention(q[:, :, : n - 2] if rank == 1 else q, k, v, options=opts)),
        ("dtype", lambda: ring_attention(*(t.double() if rank == 0 else t for t in (q, k, v)), options=opts)),
        ("spec", lambda: ring_attention(q, k, v, mask=M.causal() if rank == 0 else None, options=opts)),
        ("invalid on one rank", lambda: ring_attention(
            q, k, v, mask=M.document(torch.zeros(N - (rank == 1), dtype=torch.long)), options=opts)),
        ("odd zigzag", lambda: ring_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], options=opts)),
    ]
    out = []
    for name, call in calls:
        t0 = time.monotonic()
        try:
            call()
            out.append((name, None, "no error", time.monotonic() - t0))
        except Exception as e:  # noqa: BLE001 (the test asserts the type)
            out.append((name, type(e).__name__, str(e), time.monotonic() - t0))
    # after all that, a good call still works on every rank
    ok = ring_attention(q, k, v, options=opts)
    out.append(("good call after errors", None, str(tuple(ok.shape)), 0.0))
    return out


def silent_peer(rank: int, world: int) -> tuple:
    """Rank 0 calls ring_attention; rank 1 never does: rank 0 must raise within its timeout."""
    if rank == 1:
        time.sleep(6.0)
        return ("idle", None, 0.0)
    q = torch.randn(1, 1, 4, 2)
    t0 = time.monotonic()
    try:
        ring_attention(q, q, q, options=RingOptions(timeout_s=2.0))
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e), time.monotonic() - t0)
    return ("no error", None, time.monotonic() - t0)


def training_step(rank: int, world: int) -> dict:
    """A DecoderLM training step (loss, every parameter's gradient) and a MultiHeadAttention call
    on shards, against the same on the whole sequence in this process."""
    import torch.nn.functional as F

    from attnkit.distributed import ContextParallel
    from attnkit.models import DecoderLM, LayerSpec, TransformerConfig
    from attnkit.nn import Alibi, Rope
    from attnkit.variants import Softmax

    cp = ContextParallel(options=OPTS)
    errs = {}
    cfg = TransformerConfig(vocab_size=37, d_model=32, num_heads=4, num_kv_heads=2, num_layers=3, max_len=64,
                            abs_position="learned",
                            layers=(LayerSpec(Softmax(), Rope()), LayerSpec(Softmax(mask=M.sliding_window(5)), Rope()),
                                    LayerSpec(Softmax(softcap=20.0), Alibi())))
    torch.manual_seed(0)
    model = DecoderLM(cfg).double()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 37, (2, N + 1), generator=gen)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]  # next-token targets, shifted before sharding
    loss = F.cross_entropy(model(inp).flatten(0, 1), tgt.flatten())
    loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(cp.shard(inp, 1), context_parallel=cp)  # (B, n, V)
    local = F.cross_entropy(logits.flatten(0, 1), cp.shard(tgt, 1).flatten(), reduction="sum") / tgt.numel()
    local.backward()
    shared = local.detach().clone()
    dist.all_reduce(shared)
    errs["loss"] = abs(shared.item() - loss.item())
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)  # each rank holds its tokens' share of the gradient
        errs[f"grad {n}"] = (p.grad - full[n]).abs().max().item()

    from attnkit import MultiHeadAttention

    torch.manual_seed(1)
    mha = MultiHeadAttention(32, 4, num_kv_heads=1, attention=Softmax(mask=M.causal()), position=Alibi()).double()
    x = torch.randn(2, N, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = mha(x)
    ref.sum().backward()
    xs = cp.shard(x.detach(), 1).requires_grad_()
    out = mha(xs, context_parallel=cp)
    out.sum().backward()
    errs["mha out"] = (out - cp.shard(ref, 1)).abs().max().item()
    errs["mha dx"] = (xs.grad - cp.shard(x.grad, 1)).abs().max().item()
    return errs


def allocations(rank: int, world: int, n_global: int) -> dict:
    """Torch's allocation events (profiler) during one causal zigzag ring forward + backward in
    float32: the largest single allocation and the peak of the live bytes allocated during the
    step, with the size s of one q shard (B, H, n, D)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from attnkit.distributed.check import seeded_rows
    from attnkit.distributed.layout import local_positions

    pos = local_positions("zigzag", n_global // world, rank, world)
    q, k, v, dout = (seeded_rows(1, 8, 32, pos, seed) for seed in (1, 2, 3, 4))  # (1, 8, n, 32)
    for t in (q, k, v):
        t.requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ring_attention(q, k, v, mask=M.causal(), options=RingOptions(timeout_s=60)).backward(dout)
    events = []

    def walk(e):
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size))
        for c in e.children:
            walk(c)

    for e in prof.profiler.kineto_results.experimental_event_tree():
        walk(e)
    live, now, peak, largest = {}, 0, 0, 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr], now, largest = size, now + size, max(largest, size)
            peak = max(peak, now)
        elif ptr in live:  # frees of tensors made before the step are not counted
            now -= live.pop(ptr)
    return {"largest": largest, "peak": peak, "s": q.numel() * q.element_size()}
