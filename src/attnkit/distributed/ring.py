"""Ring (context-parallel) attention: exact softmax attention over a sequence sharded across ranks.

Legend: B batch, Hq query heads, Hk key/value heads, D head dim, Dv value dim, P ranks in the
group, r this rank, nq / nk local queries / keys, Nq = P nq, Nk = P nk, t ring step 0..P-1.

Each rank holds its shard of q, k, v (``layout``). At step t rank r computes its queries against
the K/V shard of origin (r - t) mod P, received from rank r - 1 while step t - 1 computed (the
transfer of the next shard is posted before the compute of the current one: communication
overlaps compute). Partial results merge by log-sum-exp (Liu, Zaharia & Abbeel 2023, "Ring
Attention with Blockwise Transformers"; the block kernel is FlashAttention-2's online softmax).
Only the Hk key/value heads travel (K and V as two messages, sent from where they lie).

Schedule (identical on every rank, so no rank waits for a message nobody sends):
- ``need[r][s]``: queries of r have a non-empty rectangle with keys of s (all-gathered once
  before the first step, with the call records; see ``comm.agree``).
- the shard of origin j sits at rank j + t at step t and is forwarded only while a later rank
  still needs it (``forwarded``): under a causal contiguous layout rank P-1 never sends.
- backward: the shards travel the same way with a dK/dV accumulator each; the rank holding a
  shard at its last needed step (``last_step``) sends the accumulator straight back to the owner.
  dq stays local. Bias gradients are this rank's share; sum them over the group, like any
  parameter gradient of a context-parallel step.

Memory per rank (s = one q-shard-sized tensor, K/V shard = 2s when Hk = Hq): the output and the
log-sum-exp (s), dq (s), the current and the next K/V shard (4s) and one dK/dV accumulator (2s),
which the block gradients are added into in place (``block_backward(into=...)``), plus the block
kernel's buffers for one rectangle (its gradients, at most a shard's). Every term is O(N / P):
nothing global, nothing that grows with P. The K/V transfer overlaps the compute; the
accumulator is exchanged between steps (one K/V-shard-sized message per hop, not overlapped),
which keeps one accumulator alive instead of three (incoming, outgoing and the block's own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .. import _validate as V
from .._numerics import compute_dtype
from ..backends.blockwise import BlockwiseOptions
from ..biases import as_bias
from ..masks import as_mask
from . import layout as L
from .blocks import Kernel, backward_rect, final_lse, forward_rect, new_result, plan_rects
from .comm import DEFAULT_TIMEOUT_S, Comm, agree


@dataclass(frozen=True)
class RingOptions:
    """timeout_s: how long a rank waits for a peer (finite: a mismatched call raises, never hangs).
    block: tile sizes of the blockwise kernel that computes each block."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    block: BlockwiseOptions | None = None

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < float("inf")):
            raise ValueError(f"RingOptions.timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")
        if self.block is not None and not isinstance(self.block, BlockwiseOptions):
            raise TypeError(f"RingOptions.block must be a BlockwiseOptions, got {type(self.block).__name__}")


@dataclass(frozen=True)
class RingPlan:
    rank: int
    world: int
    need: tuple  # (P, P) bools
    rects: tuple  # per origin: this rank's Rects
    kernel: Kernel
    bias_tensors: tuple  # the global bias spec's tensors(), in order


# ---------------------------------------------------------------------------------------------
# Schedule: pure functions of ``need``
# ---------------------------------------------------------------------------------------------


def forwarded(need, origin: int, t: int) -> bool:
    """Does the holder of origin's shard at step t (rank origin + t) send it on to the next rank?"""
    P = len(need)
    return t < P - 1 and any(need[(origin + u) % P][origin] for u in range(t + 1, P))


def last_step(need, origin: int) -> int:
    """The last step at which a rank needs origin's shard (0 if only the owner, or nobody)."""
    P = len(need)
    return max((t for t in range(P) if need[(origin + t) % P][origin]), default=0)


def sends_per_rank(need) -> list[int]:
    """Number of K/V shards each rank sends in one forward (the backward sends as many K/V
    shards plus one dK/dV accumulator per K/V shard and per return hop)."""
    P = len(need)
    return [sum(forwarded(need, (r - t) % P, t) for t in range(P)) for r in range(P)]


def expected_bytes(need, kv_bytes: int, acc_bytes: int) -> list[tuple[int, int]]:
    """Per rank, the bytes the schedule sends in (forward, backward): K/V shards of ``kv_bytes``
    each; in backward the same K/V shards plus one dK/dV accumulator (``acc_bytes``) per K/V hop
    and per return hop to an owner."""
    P = len(need)
    sends = sends_per_rank(need)
    returns = [0] * P
    for j in range(P):
        t = last_step(need, j)
        if t > 0:
            returns[(j + t) % P] += 1
    return [(s * kv_bytes, s * kv_bytes + (s + ret) * acc_bytes) for s, ret in zip(sends, returns)]


# ---------------------------------------------------------------------------------------------
# Forward and backward over the ring
# ---------------------------------------------------------------------------------------------


def _kv_messages(kv, peer: int, tag: int) -> list:
    """K and V as two messages (tags 2 * tag, 2 * tag + 1): sent from where they lie, no packing copy."""
    return [(x, peer, 2 * tag + i) for i, x in enumerate(kv)]


def _empty_kv(k, v):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (k, v))  # contiguous


def _unpack(flat: torch.Tensor, k_shape, v_shape):
    nk = 1
    for d in k_shape:
        nk *= d
    return flat[:nk].view(k_shape), flat[nk:].view(v_shape)


def ring_forward(plan: RingPlan, comm: Comm, q, k, v):
    """This rank's (out (B, Hq, nq, Dv), running lse (B, Hq, nq)) in the compute dtype."""
    P, r, need = plan.world, plan.rank, plan.need
    out, lse = new_result(q, v.shape[-1], plan.kernel.dtype)
    kv = (k.contiguous(), v.contiguous())  # messages need contiguous tensors (a copy only for views)
    for t in range(P):
        origin = (r - t) % P
        sends = _kv_messages(kv, (r + 1) % P, t) if forwarded(need, origin, t) else []
        nxt = _empty_kv(k, v) if forwarded(need, (r - t - 1) % P, t) else None
        recvs = _kv_messages(nxt, (r - 1) % P, t) if nxt is not None else []
        pending = comm.start(sends, recvs, phase="forward", what=f"the K/V shard of step {t + 1} (forward)")
        for rect in plan.rects[origin]:
            forward_rect(plan.kernel, rect, q, *kv, out, lse)
        pending.wait()
        kv = nxt
    return out, lse


def ring_backward(plan: RingPlan, comm: Comm, q, k, v, out, lse, dout):
    """(dq, dk, dv) in the compute dtype and this rank's bias gradients (global tensors).

    Per step: the dK/dV accumulator of the shard held (packed, K then V) is exchanged first
    (the previous step's leaves, this step's arrives: ``_exchange_accumulator``), then the next
    K/V shard's transfer is posted and the block gradients are added into dq and the
    accumulator in place while it travels. Buffers: the current and next K/V shard and one
    accumulator while computing; the current K/V shard and the outgoing and incoming
    accumulators during the exchange (three K/V-shard-sized tensors at most)."""
    P, r, need, cdt = plan.world, plan.rank, plan.need, plan.kernel.dtype
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)  # (B, Hq, nq, D)
    bias_acc = [torch.zeros_like(t, dtype=torch.promote_types(t.dtype, cdt)) if t.requires_grad else None
                for t in plan.bias_tensors]
    lse = final_lse(lse)
    kv = (k.contiguous(), v.contiguous())  # messages need contiguous tensors (a copy only for views)
    new_acc = lambda: torch.empty(k.numel() + v.numel(), dtype=cdt, device=k.device)  # noqa: E731
    acc = new_acc().zero_()  # dK/dV of the shard held, packed (K then V)
    own = None  # this rank's dK/dV once final (kept, or returned by the last rank that needs it)
    for t in range(P):
        origin = (r - t) % P
        if t > 0:
            acc, back = _exchange_accumulator(plan, comm, t - 1, acc, new_acc)
            own = back if back is not None else own
        send_kv, recv_kv = forwarded(need, origin, t), forwarded(need, (r - t - 1) % P, t)
        nxt = _empty_kv(k, v) if recv_kv else None
        kv_pending = comm.start(_kv_messages(kv, (r + 1) % P, 2 * t) if send_kv else [],
                                _kv_messages(nxt, (r - 1) % P, 2 * t) if recv_kv else [],
                                phase="backward", what=f"the K/V shard of step {t + 1} (backward)")
        if plan.rects[origin]:
            dk, dv = _unpack(acc, k.shape, v.shape)  # views: the block gradients are added in place
            for rect in plan.rects[origin]:
                backward_rect(plan.kernel, rect, q, *kv, out, lse, dout, dq, dk, dv, bias_acc)
        if t == 0 and last_step(need, r) == 0:
            own = acc  # nobody else needs this rank's keys: its accumulator never leaves
        kv_pending.wait()
        kv = nxt
    _, back = _exchange_accumulator(plan, comm, P - 1, acc, new_acc)
    own = back if back is not None else own
    dk, dv = _unpack(own, k.shape, v.shape)
    return dq, dk, dv, bias_acc


def _exchange_accumulator(plan: RingPlan, comm: Comm, t: int, acc, new_acc):
    """After step t: send the accumulator held (origin r - t) on with its K/V shard, or back to
    its owner at the shard's last needed step; receive the one of step t + 1 (from r - 1) and,
    at this rank's own last needed step, this rank's final dK/dV. Posted and waited at once (one
    batch: NCCL needs sends and receives between two ranks in one batch), so the sent buffer is
    freed before the next K/V buffer exists. ``new_acc()`` makes an empty accumulator.
    Returns (the accumulator of step t + 1 or None, this rank's returned dK/dV or None)."""
    P, r, need = plan.world, plan.rank, plan.need
    origin = (r - t) % P
    sends, recvs, nxt, back = [], [], None, None
    if acc is not None and forwarded(need, origin, t):
        sends.append((acc, (r + 1) % P, 4 * t + 2))
    elif acc is not None and t == last_step(need, origin) and origin != r:
        sends.append((acc, origin, 4 * t + 3))  # back to its owner
    if t + 1 < P and forwarded(need, (r - t - 1) % P, t):
        nxt = new_acc()
        recvs.append((nxt, (r - 1) % P, 4 * t + 2))
    if t == last_step(need, r) and t > 0:
        back = new_acc()
        recvs.append((back, (r + t) % P, 4 * t + 3))
    comm.start(sends, recvs, phase="backward", what=f"the dK/dV accumulators of step {t}").wait()
    return nxt, back


class _RingAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the log-sum-exp; backward replays the ring (see module doc)."""

    @staticmethod
    def forward(ctx, plan: RingPlan, comm: Comm, q, k, v, *bias_tensors):
        out, lse = ring_forward(plan, comm, q, k, v)
        ctx.plan, ctx.comm = plan, comm
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, bias_grads = ring_backward(ctx.plan, ctx.comm, q, k, v, out, lse, dout)
        grads = [None if g is None else g.to(t.dtype) for g, t in zip(bias_grads, ctx.plan.bias_tensors)]
        return (None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *grads)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _describe(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _digest(obj, depth: int = 0):
    """Shapes and sums of the tensors a spec carries (public attributes: private ones are caches
    that may differ between ranks), so ranks holding different data disagree."""
    if isinstance(obj, torch.Tensor):
        return [list(obj.shape), str(obj.dtype), float(obj.detach().to(torch.float64).sum())]
    if depth > 3:
        return None
    if isinstance(obj, (tuple, list)):
        return [_digest(x, depth + 1) for x in obj]
    if hasattr(obj, "__dict__"):
        return {k: d for k, x in sorted(vars(obj).items())
                if not k.startswith("_") and (d := _digest(x, depth + 1)) is not None}
    return None


def _needs_grad(q, k, v, bias) -> bool:
    ts = [q, k, v] + (list(bias.tensors()) if bias is not None else [])
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _local_plan(q, k, v, mask, bias, scale, softcap, layout, opts: RingOptions, rank: int, world: int):
    """Validate this rank's call and build its plan parts; raises ValueError/TypeError."""
    V.check_qkv(q, k, v)
    B, Hq, nq, D = q.shape
    nk = k.shape[2]
    L.check_local_length(layout, nq, "the local query length q.shape[2]")
    L.check_local_length(layout, nk, "the local key length k.shape[2]")
    Nq, Nk = world * nq, world * nk
    sizes = {"batch": B, "heads": Hq, "nq": Nq, "nk": Nk, "device": q.device}
    mask = as_mask(mask, **sizes)  # specs and tensors are checked against the global sizes
    bias = as_bias(bias, **sizes)
    kern = Kernel(V.check_scale(scale, D), V.check_softcap(softcap), opts.block or BlockwiseOptions(),
                  compute_dtype(q.dtype))
    rects = plan_rects(mask, bias, rank=rank, world=world, layout=layout, nq=nq, nk=nk, batch=B, heads=Hq)
    return kern, rects, bias


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, mask=None, bias=None,
                   scale: float | None = None, softcap: float | None = None, layout: str = "zigzag",
                   options: RingOptions | None = None) -> torch.Tensor:
    """This rank's shard of ``attnkit.attention`` on the whole sequence, computed over a ring.

    Args:
        q: (B, Hq, nq, D), k: (B, Hk, nk, D), v: (B, Hk, nk, Dv): this rank's shard of the global
            (Nq = P nq, Nk = P nk) sequence in ``layout`` (``shard_sequence`` makes it).
        group: the torch.distributed process group (None = the default group); P = its size.
        mask: None, a bool tensor broadcastable to the global (B, Hq, Nq, Nk), or an
            ``attnkit.masks`` spec; evaluated at global positions (bottom-right aligned).
        bias: None, a global float tensor or a bias spec (ALiBi, T5, functions), at global
            positions; learnable tensors get this rank's share of their gradient.
        scale, softcap: as in ``attnkit.attention``.
        layout: "zigzag" (rank r holds chunks r and 2P-1-r: balanced causal work) or "contiguous".
        options: ``RingOptions`` (timeout, block tile sizes).

    Returns:
        out (B, Hq, nq, Dv) in q's dtype; differentiable in q, k, v and the bias tensors.

    Every rank must call it with the same shapes, dtypes, specs and options (checked before the
    first step: a mismatch raises ``RingMismatchError`` on every rank), and must run the
    backward when any rank does. Cost per rank: O(Nq Nk D / P) time for dense masks (empty blocks
    skipped), K/V traffic (P-1)/P of the global K/V per pass at most.
    """
    opts = options or RingOptions()
    rank, world = L.group_rank_size(group)
    error, kern, rects, bias_spec, need_row = None, None, None, None, None
    try:
        kern, rects, bias_spec = _local_plan(q, k, v, mask, bias, scale, softcap, L.check_layout(layout), opts,
                                             rank, world)
        need_row = [bool(rs) for rs in rects]
    except (ValueError, TypeError) as e:
        error = str(e)
    record = {
        "world size": world, "layout": layout, "q": _describe(q), "k": _describe(k), "v": _describe(v),
        "device type": getattr(getattr(q, "device", None), "type", None), "scale": repr(scale),
        "softcap": repr(softcap), "mask": repr(mask) if not isinstance(mask, torch.Tensor) else _describe(mask),
        "bias": repr(bias) if not isinstance(bias, torch.Tensor) else _describe(bias),
        "mask data": _digest(mask), "bias data": _digest(bias), "options": repr(opts),
        "needs grad": _needs_grad(q, k, v, bias_spec), "_need": need_row,
    }
    device = torch.device("cuda", torch.cuda.current_device()) if _backend(group) == "nccl" else torch.device("cpu")
    records = agree(record, error, group=group, timeout=opts.timeout_s, device=device)
    tensors = tuple(bias_spec.tensors()) if bias_spec is not None else ()
    plan = RingPlan(rank, world, tuple(tuple(rec["_need"]) for rec in records), rects, kern, tensors)
    comm = Comm(group, opts.timeout_s)
    if record["needs grad"]:
        return _RingAttention.apply(plan, comm, q, k, v, *tensors)
    with torch.no_grad():
        return ring_forward(plan, comm, q, k, v)[0].to(q.dtype)


def _backend(group) -> str:
    import torch.distributed as dist

    return str(dist.get_backend(group)).lower()
