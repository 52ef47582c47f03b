"""The blockwise backend: memory-bounded exact attention that skips masked tiles and trains.

Legend: B batch, Hq query heads, Hk key/value heads (G = Hq // Hk), Nq queries, Nk keys,
D head dim, Dv value dim, bq / bk tile sizes, Tq = ceil(Nq / bq), Tk = ceil(Nk / bk).

FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning", Algorithms 1 and 2) written in PyTorch: an online softmax over
(bq, bk) tiles with running max and sum in float32 (float64 for float64 inputs), and a custom
autograd Function that saves only the output and the log-sum-exp and recomputes tiles in
backward. Peak extra memory O(B * H * N * D + one work item), never O(Nq * Nk), forward and
backward; time O(number of non-empty tiles * bq * bk * D).

Two engines run the planned tiles (``BlockwiseOptions.fused`` picks; results are equal within
the tolerance table, and both are tested against the reference):

- fused (``blockwise_plan`` plans, ``blockwise_fused`` runs; CPU, no softcap, no dropout, head dims equal): the tile map is
  turned into rectangles that torch's CPU flash-attention kernel (the one behind SDPA) runs in
  C++, merged per query row by log-sum-exp: plain causal-like bands are two rectangles, finite
  bands (sliding windows) one call over overlapping strided key windows, other masks one
  rectangle per span of non-empty tiles with the mask evaluated on its PARTIAL tiles only, and
  translation-invariant biases (ALiBi, T5) a view of one strip tensor per pass; under a
  causal-like band, biases linear in the offset (causal ALiBi) add a per-key row to full
  rectangles (the per-query part only shifts the log-sum-exp) and a shared strip to the diagonal. Its backward is
  the kernel's FlashAttention-2 backward with the merged output and log-sum-exp.
- tile math (``blockwise_tiles``; everything else, and the backward when bias tensors need
  gradients). Forward softmax: when no bias spec is added and |scale * q.k| <= 30 is
  guaranteed for a query block (Cauchy-Schwarz bound from the row norms, or the softcap),
  p = exp(s) is used without a running max (exact to rounding: no overflow, no subnormals) and
  masks are applied after exp by zeroing; otherwise the running max of FlashAttention-2.
  Per-item buffers (scores, gathered K/V) are reused across items (``Workspace``), and for band
  masks the keep pattern of every regular item is one cached (bq, L) 0/1 multiplier.
  Translation-invariant biases are read from one strip per call (``blockwise_relative``: a view
  per item whose keys run at one offset from its queries) instead of evaluated per pair.

The mask spec's ``tiles()`` map decides the work: EMPTY tiles are skipped, FULL tiles need no
mask, the mask is evaluated only where a tile is PARTIAL. Bias specs are evaluated per item
from positions; their learnable tensors (``bias.tensors()``) get gradients from the per-tile
dS (a dense float bias tensor by scatter-add, translation-invariant specs by per-offset sums of
dS, other specs by autograd on the tile's bias evaluation). The tile math has two schedules:

- stream: for each query block, runs of consecutive non-empty key tiles of equal status (a
  contiguous slice of K/V, no copy), folded in by the online softmax. Used for dense, causal,
  document and other masks whose rows reach far.
- gather: when every query block needs at most a few key tiles (sliding windows, block-sparse
  layouts, dilated/BigBird patterns), the tiles of many query blocks are gathered and
  processed as one batched matmul, one softmax per block: no Python loop over tiles.

Second-order gradients (``create_graph=True``) recompute the attention with the reference's
differentiable ops inside the backward (exact, at O(B * Hq * Nq * Nk) memory for that step).

Dropout uses ``attnkit._hash.dropout_keep(seed, p, b, h, i, j)`` at the same coordinates as the
reference, so it equals the reference exactly and backward regenerates the same pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _nonfinite as nonfinite
from .._call import AttentionCall, make_call
from .._denormal import flush_denormals
from .._numerics import compute_dtype
from ..masks import EMPTY, FULL, PARTIAL, TileMap
from . import blockwise_fused as engine
from .base import Backend
from .blockwise_plan import plan_items
from .blockwise_relative import BiasStrip, OffsetGrad
from .blockwise_tiles import (
    SHIFT_FREE_BOUND,
    GatherKeys,
    Geometry,
    RangeKeys,
    Workspace,
    backward_group,
    flatten_bias,
    forward_group,
)


@dataclass(frozen=True)
class BlockwiseOptions:
    """Tile sizes, per-item memory budgets and the engine.

    block_q, block_k: tile sizes (rows of queries, keys) of the tile map. fused: run the tiles
    through torch's CPU flash-attention kernel where it can (``blockwise_fused``), else the
    PyTorch tile math. item_elements: score elements (B * Hq * rows * keys) of one work item of
    the PyTorch tile math (a few score-sized float tensors are live at once), and the budget of
    the fused backward's overlapping window gradients. mask_elements: elements of one mask /
    bias tensor that the fused engine materialises for a rectangle; the tile math's strip of
    translation-invariant biases (Hq * block_q * (Nq + Nk) values, ``blockwise_relative``) may
    take ``STRIP_BUDGET`` (4) times this, else their tiles evaluate the bias. gather_max_keys: the tile
    math's gather schedule is used when each query block needs at most this many keys and
    padding rows to the longest wastes at most ``gather_max_waste`` of the work.
    """

    block_q: int = 128
    block_k: int = 128
    item_elements: int = 1 << 20
    gather_max_keys: int = 2048
    gather_max_waste: float = 1.34
    fused: bool = True
    mask_elements: int = 1 << 24

    def __post_init__(self):
        for name in ("block_q", "block_k", "item_elements", "gather_max_keys", "mask_elements"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"BlockwiseOptions.{name} must be an int > 0, got {v!r}")
        if not self.gather_max_waste >= 1.0:
            raise ValueError(f"BlockwiseOptions.gather_max_waste must be >= 1, got {self.gather_max_waste!r}")
        if not isinstance(self.fused, bool):
            raise ValueError(f"BlockwiseOptions.fused must be a bool, got {self.fused!r}")


@dataclass(frozen=True)
class Plan:
    """What one call runs. ``items``: the fused engine's rectangles (None: the tile math runs
    the forward); ``fused_backward``: the backward runs them too. ``schedule`` / ``groups``: the
    tile math's work ("stream" or "gather"; None / () when the fused engine does everything)."""

    geom: Geometry
    Dv: int
    items: tuple | None
    fused_backward: bool
    schedule: str | None
    groups: tuple
    options: BlockwiseOptions


def tile_status(call: AttentionCall, bq: int, bk: int, *, pad_partial: bool = True) -> torch.Tensor:
    """(Tq, Tk) int8 EMPTY/PARTIAL/FULL, reduced over batch and heads; with ``pad_partial`` the
    last key tile is PARTIAL when it pads keys (the tile math reads whole tiles)."""
    B, Hq, Hk, Nq, Nk, D = call.shape
    return TileMap(call.mask, batch=B, heads=Hq, nq=Nq, nk=Nk, block_q=bq, block_k=bk, device=call.q.device,
                   pad_keys=pad_partial).status


def _stream_groups(st: torch.Tensor, bk: int, run_tiles: int) -> tuple:
    groups = []
    for t, row in enumerate(st.tolist()):
        items, j, Tk = [], 0, len(row)
        while j < Tk:
            if row[j] == EMPTY:
                j += 1
                continue
            status, j0 = row[j], j
            while j < Tk and row[j] == status and j - j0 < run_tiles:
                j += 1
            items.append(RangeKeys(j0 * bk, j * bk, status == PARTIAL))
        groups.append((t, t + 1, tuple(items)))
    return tuple(groups)


def _gather_groups(st: torch.Tensor, M: int, chunk: int, bq: int, bk: int, Nq: int, Nk: int) -> tuple:
    Tq, Tk = st.shape
    nonempty = st != EMPTY
    # Non-empty tiles of each row first, in key order; padding slots point at tile 0 (masked).
    # (int64 sort key: an int8 one overflows at Tk >= 128 and would pick empty tiles.)
    key = (~nonempty).to(torch.int64) * Tk + torch.arange(Tk, device=st.device)
    order = torch.argsort(key, dim=1)[:, :M]
    slot_ok = torch.gather(nonempty, 1, order)
    idx = torch.where(slot_ok, order, torch.zeros_like(order))
    partial = (torch.gather(st, 1, order) == PARTIAL) | ~slot_ok
    # Regular blocks (GatherKeys.offset): M consecutive real tiles, whole block of real queries.
    t = torch.arange(Tq, device=st.device)
    regular = (slot_ok.all(dim=1) & (torch.diff(idx, dim=1) == 1).all(dim=1)
               & ((idx[:, -1] + 1) * bk <= Nk) & ((t + 1) * bq <= Nq))
    offset = (idx[:, 0] * bk - (t * bq + Nk - Nq)).tolist()
    regular = regular.tolist()
    groups = []
    for t0 in range(0, Tq, chunk):
        t1 = min(Tq, t0 + chunk)
        masked = bool(partial[t0:t1].any())
        same = all(regular[t0:t1]) and len(set(offset[t0:t1])) == 1
        groups.append((t0, t1, (GatherKeys(idx[t0:t1], slot_ok[t0:t1], masked, offset[t0] if same else None),)))
    return tuple(groups)


def _tile_schedule(call: AttentionCall, st: torch.Tensor, opts: BlockwiseOptions) -> tuple[str, tuple]:
    B, Hq, Hk, Nq, Nk, D = call.shape
    bq, bk = opts.block_q, opts.block_k
    Tq, Tk = st.shape
    nnz = (st != EMPTY).sum(dim=1)
    M, total = int(nnz.max()), int(nnz.sum())
    rows = B * Hq * bq
    if 0 < M and M * bk <= opts.gather_max_keys and Tq * M <= opts.gather_max_waste * total:
        chunk = max(1, opts.item_elements // (rows * M * bk))
        return "gather", _gather_groups(st, M, chunk, bq, bk, Nq, Nk)
    run_tiles = max(1, opts.item_elements // (rows * bk))
    return "stream", _stream_groups(st, bk, run_tiles)


def make_plan(call: AttentionCall, opts: BlockwiseOptions, *, backward: bool = True) -> Plan:
    """The work of ``call``: fused rectangles where the kernel can run it, else tile groups.
    ``backward``: also plan the backward (the tile math when bias tensors need gradients)."""
    B, Hq, Hk, Nq, Nk, D = call.shape
    bq, bk = opts.block_q, opts.block_k
    parts = flatten_bias(call.bias)
    geom = Geometry(B=B, Hq=Hq, Hk=Hk, G=Hq // Hk, Nq=Nq, Nk=Nk, bq=bq, bk=bk, Tq=-(-Nq // bq), Tk=-(-Nk // bk),
                    scale=call.scale, softcap=call.softcap, mask=call.mask, bias_parts=parts,
                    dropout_p=call.dropout_p, dropout_seed=call.dropout_seed,
                    dtype=compute_dtype(call.q.dtype))
    fused = opts.fused and not engine.kernel_reasons(call.q, call.v, call.softcap, call.dropout_p)
    bias_grads = any(t.requires_grad for p in parts for t in p.tensors())
    fused_backward = fused and not bias_grads
    st = None
    items = None
    if fused:
        needs_map = call.mask is not None or parts
        st = tile_status(call, bq, bk, pad_partial=False) if needs_map else None
        items = plan_items(geom, st, mask_elements=opts.mask_elements, window_rows=bq)
    schedule, groups = None, ()
    if not fused or (backward and not fused_backward):
        st = tile_status(call, bq, bk) if st is None else _pad_partial(st, Nk, bk)
        schedule, groups = _tile_schedule(call, st, opts)
    return Plan(geom, call.v.shape[3], items, fused_backward, schedule, groups, opts)


def _pad_partial(st: torch.Tensor, Nk: int, bk: int) -> torch.Tensor:
    st = st.clone()
    if Nk % bk:
        last = st[:, -1]
        st[:, -1] = torch.where(last == FULL, torch.full_like(last, PARTIAL), last)
    return st


# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------


def rows_of(x: torch.Tensor, g: Geometry, t0: int, t1: int) -> torch.Tensor:
    """Query blocks t0..t1-1 of x (B, Hq, Nq, X) as (B, Hk, C, G*bq, X), zero-padded rows.

    A view when G == 1 and the blocks are whole, else a copy of those rows only (never of x).
    """
    X, C = x.shape[-1], t1 - t0
    r0, r1 = t0 * g.bq, min(t1 * g.bq, g.Nq)
    part = x[:, :, r0:r1]  # (B, Hq, rows, X)
    if r1 - r0 < C * g.bq:
        part = F.pad(part, (0, 0, 0, C * g.bq - (r1 - r0)))
    if g.G == 1:
        return part.reshape(g.B, g.Hk, C, g.bq, X)
    part = part.reshape(g.B, g.Hk, g.G, C, g.bq, X).permute(0, 1, 3, 2, 4, 5)  # (B, Hk, C, G, bq, X)
    return part.reshape(g.B, g.Hk, C, g.G * g.bq, X)


def put_rows(dst: torch.Tensor, val: torch.Tensor, g: Geometry, t0: int, t1: int) -> None:
    """Inverse of rows_of: write val (B, Hk, C, G*bq, X) into dst (B, Hq, Nq, X)."""
    X, C = val.shape[-1], t1 - t0
    r0, r1 = t0 * g.bq, min(t1 * g.bq, g.Nq)
    val = val.view(g.B, g.Hk, C, g.G, g.bq, X).permute(0, 1, 3, 2, 4, 5)  # (B, Hk, G, C, bq, X)
    val = val.reshape(g.B, g.Hq, C * g.bq, X)
    dst[:, :, r0:r1] = val[:, :, :r1 - r0]


def pad_kv(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(B, Hk, Nk, X) -> (B, Hk, Tk*bk, X), zero-padded keys (no copy when Nk % bk == 0)."""
    if g.Nk % g.bk == 0:
        return x.contiguous()
    return F.pad(x, (0, 0, 0, g.Tk * g.bk - g.Nk))


def shift_free_blocks(g: Geometry, qc: torch.Tensor, kp: torch.Tensor) -> list[bool]:
    """Per query block: may the forward use p = exp(s) without a running max?

    True when no bias spec is added and every score of the block is bounded by
    SHIFT_FREE_BOUND: |scale * q.k| <= |scale| * |q| * max |k| (Cauchy-Schwarz), or the softcap.
    Costs one pass over q and k (their row norms). NaN/inf inputs give False.
    """
    if g.bias_parts or g.dtype not in SHIFT_FREE_BOUND:
        return [False] * g.Tq
    qn = qc.norm(dim=-1)  # (B, Hq, Nq)
    qn = F.pad(qn, (0, g.Tq * g.bq - g.Nq)).view(g.B, g.Hq, g.Tq, g.bq).amax(dim=(0, 1, 3))  # (Tq,)
    bound = qn * (kp.norm(dim=-1).amax() * abs(g.scale))
    if g.softcap is not None:
        bound = torch.where(torch.isnan(bound), bound, bound.clamp_max(abs(g.softcap)))
    return (bound <= SHIFT_FREE_BOUND[g.dtype]).tolist()


# ---------------------------------------------------------------------------------------------
# Autograd Function
# ---------------------------------------------------------------------------------------------


def forward_pass(plan: Plan, q, k, v):
    """Run the forward of ``plan``: out (B, Hq, Nq, Dv) and the log-sum-exp (B, Hq, Nq), both in
    the compute dtype (+inf lse and zero output on rows with no allowed key). No autograd."""
    with flush_denormals():
        return _forward_pass(plan, q, k, v)


def _forward_pass(plan: Plan, q, k, v):
    g = plan.geom
    if plan.items is not None:
        return engine.forward(g, plan.items, q, k, v)
    qc = q.to(g.dtype)
    kp, vp = pad_kv(k.to(g.dtype), g), pad_kv(v.to(g.dtype), g)
    out = torch.empty(g.B, g.Hq, g.Nq, plan.Dv, dtype=g.dtype, device=q.device)  # (B, Hq, Nq, Dv)
    lse = torch.full((g.B, g.Hk, g.Tq, g.G * g.bq), float("inf"), dtype=g.dtype, device=q.device)
    kT = kp.transpose(-1, -2).contiguous() if plan.schedule == "stream" else None  # (B, Hk, D, Tk*bk)
    shift_free = shift_free_blocks(g, qc, kp)
    band_cache = {} if g.mask is not None and g.mask.translation_invariant else None
    ws = Workspace(g.dtype, q.device)
    strip = BiasStrip.make(g, plan.options.mask_elements, q.device)
    for t0, t1, items in plan.groups:
        if items:
            rows = rows_of(qc, g, t0, t1)  # (B, Hk, C, G*bq, D)
            qt = torch.mul(rows, g.scale, out=ws.take("q", rows.shape))
            o, s = forward_group(g, qt, kp, vp, t0, t1, items, plan.Dv, kT,
                                 shift_free=all(shift_free[t0:t1]), band_cache=band_cache, ws=ws, strip=strip)
            put_rows(out, o, g, t0, t1)
            lse[:, :, t0:t1] = s
        else:  # no key tile at all: zeros (lse stays +inf)
            out[:, :, t0 * g.bq:t1 * g.bq] = 0
    return out, lse_to_rows(lse, g)


def backward_pass(plan: Plan, q, k, v, out, lse, dout, bias_needs_grad: bool = True, into=None):
    """Gradients of ``plan``'s attention given the (possibly global, e.g. merged over a ring)
    output ``out`` (B, Hq, Nq, Dv) and log-sum-exp ``lse`` (B, Hq, Nq).

    Returns (dq, dk, dv) in the compute dtype and the bias tensors' gradients as a flat list in
    ``bias.tensors()`` order (None where a tensor needs none). ``into``: None, or (dq, dk, dv)
    in the compute dtype to add the gradients to in place (then returned). No autograd."""
    with flush_denormals():
        if plan.fused_backward:  # adds in place into ``into``: no gradient-sized buffers of its own
            g = plan.geom
            dq, dk, dv = engine.backward(g, plan.items, q, k, v, out, lse, dout,
                                         item_elements=plan.options.item_elements,
                                         mask_elements=plan.options.mask_elements, into=into)
            return dq, dk, dv, [None for p in g.bias_parts for _ in p.tensors()]
        dq, dk, dv, flat = _backward_pass(plan, q, k, v, out, lse, dout, bias_needs_grad)
    if into is None:
        return dq, dk, dv, flat
    for acc, grad in zip(into, (dq, dk, dv)):
        acc += grad
    return (*into, flat)


def _backward_pass(plan: Plan, q, k, v, out, lse, dout, bias_needs_grad):
    g = plan.geom
    if not plan.groups and plan.schedule is None:
        raise RuntimeError("this blockwise plan was made without a backward (make_plan(backward=False))")
    lse = lse_to_tiles(lse.to(g.dtype), g)
    qc, doc = q.to(g.dtype), dout.to(g.dtype)
    kp, vp = pad_kv(k.to(g.dtype), g), pad_kv(v.to(g.dtype), g)
    dq = torch.zeros(q.shape, dtype=g.dtype, device=q.device)  # (B, Hq, Nq, D)
    dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
    kT = kp.transpose(-1, -2).contiguous() if plan.schedule == "stream" else None  # (B, Hk, D, Tk*bk)
    bias_grads = {}
    for i, part in enumerate(g.bias_parts):
        ts = part.tensors()
        if bias_needs_grad and any(t.requires_grad for t in ts):
            bias_grads[i] = [torch.zeros_like(t, dtype=torch.promote_types(t.dtype, g.dtype)) for t in ts]
    with torch.no_grad():
        strip = BiasStrip.make(g, plan.options.mask_elements, q.device)
        for t0, t1, items in plan.groups:
            if items:
                dot = rows_of(doc, g, t0, t1)  # (B, Hk, C, G*bq, Dv)
                delta = (dot * rows_of(out.to(g.dtype), g, t0, t1)).sum(dim=-1)  # (B, Hk, C, G*bq)
                dqt = backward_group(g, rows_of(qc, g, t0, t1) * g.scale, kp, vp, dot, lse[:, :, t0:t1], delta,
                                     t0, t1, items, dkp, dvp, bias_grads, kT, strip)
                put_rows(dq, dqt.mul_(g.scale), g, t0, t1)
    flat = []
    for i, part in enumerate(g.bias_parts):
        grads = bias_grads.get(i)
        if grads and isinstance(grads[-1], OffsetGrad):  # per-offset sums of a translation-invariant bias
            for slot, got in enumerate(grads.pop().finish(part)):
                if got is not None:
                    grads[slot].add_(got)
        for j, t in enumerate(part.tensors()):
            flat.append(grads[j].to(t.dtype) if grads is not None and t.requires_grad else None)
    return dq, dkp[:, :, :g.Nk], dvp[:, :, :g.Nk], flat


def lse_to_rows(lse: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Tile-layout log-sum-exp (B, Hk, Tq, G*bq) -> (B, Hq, Nq)."""
    out = torch.empty(g.B, g.Hq, g.Nq, 1, dtype=lse.dtype, device=lse.device)
    put_rows(out, lse.unsqueeze(-1), g, 0, g.Tq)
    return out.squeeze(-1)


def lse_to_tiles(lse: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(B, Hq, Nq) log-sum-exp -> tile layout (B, Hk, Tq, G*bq); padding rows get +inf."""
    lse = F.pad(lse, (0, g.Tq * g.bq - g.Nq), value=float("inf"))  # (B, Hq, Tq*bq)
    lse = lse.view(g.B, g.Hk, g.G, g.Tq, g.bq).permute(0, 1, 3, 2, 4)  # (B, Hk, Tq, G, bq)
    return lse.reshape(g.B, g.Hk, g.Tq, g.G * g.bq)


class _Blockwise(torch.autograd.Function):
    """Saves q, k, v (inputs), the output and the log-sum-exp; everything else is recomputed.

    Double backward (``create_graph=True``, e.g. a gradient penalty): the backward then
    recomputes the attention with the reference backend's differentiable ops and returns
    gradients that carry a graph, so second-order terms are exact (at the reference's
    O(B * Hq * Nq * Nk) memory for that step)."""

    @staticmethod
    def forward(ctx, plan: Plan, call: AttentionCall, q, k, v, *bias_tensors):
        out, lse = forward_pass(plan, q, k, v)
        ctx.plan, ctx.call = plan, call
        result = out.to(q.dtype)
        # Save the returned tensor when it has the compute dtype (autograd then guards it against
        # in-place edits), else the compute-dtype output; never both.
        ctx.saved_result = result is out
        ctx.save_for_backward(q, k, v, result if ctx.saved_result else out, lse, *bias_tensors)
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *bias_tensors = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable recompute
            return (None, None, *_double_backward(ctx.call, q, k, v, bias_tensors, dout))
        dq, dk, dv, flat = backward_pass(ctx.plan, q, k, v, out, lse, dout)
        return (None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *flat[:len(bias_tensors)])


def _double_backward(call: AttentionCall, q, k, v, bias_tensors, dout):
    from dataclasses import replace

    from .reference import ReferenceBackend

    out = ReferenceBackend().run(replace(call, q=q, k=k, v=v))
    inputs = [q, k, v, *bias_tensors]
    wanted = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, dout, create_graph=True, allow_unused=True))
    return [next(got) if t.requires_grad else None for t in inputs]


def _bias_tensor_list(parts) -> list[torch.Tensor]:
    return [t for p in parts for t in p.tensors()]


def blockwise_attention(q, k, v, *, mask=None, bias=None, scale=None, softcap=None, dropout_p=0.0,
                        dropout_seed=None, options: BlockwiseOptions | None = None):
    """Blockwise exact attention; same arguments and result as ``attnkit.attention``.

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> (B, Hq, Nq, Dv). Memory
    O(B * H * N * D + tile) in forward and backward; time proportional to the non-empty tiles.
    """
    call = make_call(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap, dropout_p=dropout_p,
                     dropout_seed=dropout_seed)
    backend = BlockwiseBackend(options or BlockwiseOptions())
    reasons = backend.not_supported_reasons(call)
    if reasons:
        raise ValueError("blockwise_attention cannot run this call: " + "; ".join(reasons))
    return nonfinite.run(backend, call)  # the NaN/inf rule of attnkit.attention (attnkit._nonfinite)


def _block_plan(q, k, v, mask, bias, scale, softcap, options, backward):
    call = make_call(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)
    return make_plan(call, options or BlockwiseOptions(), backward=backward)


def block_forward(q, k, v, *, mask=None, bias=None, scale=None, softcap=None,
                  options: BlockwiseOptions | None = None):
    """One block of exact attention with its log-sum-exp, for merging partial results.

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) -> (out (B, Hq, Nq, Dv) in q's dtype,
    lse (B, Hq, Nq) in the compute dtype; +inf on rows with no allowed key, whose out is 0).
    Partial results over disjoint key sets merge exactly with a log-sum-exp:
    lse = logaddexp(lse1, lse2), out = out1 exp(lse1 - lse) + out2 exp(lse2 - lse).
    No dropout (its hash is indexed by local positions). No autograd: see ``block_backward``.
    """
    plan = _block_plan(q, k, v, mask, bias, scale, softcap, options, backward=False)
    with torch.no_grad():
        out, lse = forward_pass(plan, q, k, v)
    return out.to(q.dtype), lse


def block_backward(q, k, v, out, lse, dout, *, mask=None, bias=None, scale=None, softcap=None,
                   options: BlockwiseOptions | None = None, into=None):
    """Gradients of one block given the final (merged) ``out`` (B, Hq, Nq, Dv) and ``lse``
    (B, Hq, Nq) of the whole attention (FlashAttention-2 backward with an external lse).

    Returns (dq (B, Hq, Nq, D), dk (B, Hk, Nk, D), dv (B, Hk, Nk, Dv), bias_grads) in the
    compute dtype; bias_grads lists one gradient (or None) per tensor of ``bias.tensors()``.
    Summing a query's dq over all its key blocks (and a key's dk, dv over all query blocks)
    gives the gradients of the whole attention. ``into``: None, or (dq, dk, dv) of those shapes in
    the compute dtype (views are fine): the gradients are added to them in place and they are
    returned, so a caller summing blocks holds no block-sized gradient buffers of this call.
    """
    plan = _block_plan(q, k, v, mask, bias, scale, softcap, options, backward=True)
    if into is not None:
        _check_into(into, (q, k, v), plan.geom.dtype)
    with torch.no_grad():
        return backward_pass(plan, q, k, v, out, lse.to(plan.geom.dtype), dout, into=into)


def _check_into(into, qkv, dtype: torch.dtype) -> None:
    if not (isinstance(into, (tuple, list)) and len(into) == 3 and all(isinstance(t, torch.Tensor) for t in into)):
        raise TypeError(f"block_backward: into must be None or a (dq, dk, dv) tuple of tensors, got {into!r:.80}")
    for name, acc, x in zip(("dq", "dk", "dv"), into, qkv):
        if acc.shape != x.shape or acc.dtype != dtype or acc.device != x.device:
            raise ValueError(f"block_backward: into's {name} must have shape {tuple(x.shape)}, dtype {dtype} and "
                             f"device {x.device} (those of {name[1]} in the compute dtype), got "
                             f"{tuple(acc.shape)} {acc.dtype} {acc.device}")


class BlockwiseBackend(Backend):
    name = "blockwise"

    def __init__(self, options: BlockwiseOptions | None = None):
        self.options = options or BlockwiseOptions()

    def static_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        if call.return_weights:
            reasons.append("blockwise never materialises the (Nq, Nk) weights; use backend='reference'")
        for p in flatten_bias(call.bias):
            if p.dense_tensor is not None and p.dense_tensor.device != call.q.device:
                reasons.append(f"bias tensor is on {p.dense_tensor.device}, q on {call.q.device}")
        return reasons

    def run(self, call: AttentionCall):
        grad = call.needs_grad
        plan = make_plan(call, self.options, backward=grad)
        if not grad:
            with torch.no_grad():
                out, _ = forward_pass(plan, call.q, call.k, call.v)
            return out.to(call.q.dtype)
        tensors = _bias_tensor_list(plan.geom.bias_parts)
        from dataclasses import replace

        bare = replace(call, q=None, k=None, v=None)  # the tensors are saved by autograd
        return _Blockwise.apply(plan, bare, call.q, call.k, call.v, *tensors)
