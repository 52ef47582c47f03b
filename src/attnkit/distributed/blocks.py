"""The blocks of one rank and their compute, without communication (testable in one process).

Legend: B batch, Hq query heads, Hk key/value heads, D head dim, Dv value dim, P ranks,
nq / nk local queries / keys of a shard, Nq = P nq, Nk = P nk global lengths.

A rank's queries meet the keys of every origin rank s (the rank whose shard they are). With the
shards split into segments (``layout.segments``), each (query segment, key segment) pair is a
rectangle of the global score matrix, a ``Rect``: the local rows and keys it covers and the mask
and bias specs shifted to its global positions (``offsets``). Rectangles whose mask is empty
everywhere are dropped when the plan is made, so an empty block costs nothing at any step; a
rank needs origin s (``need``) iff one of its rectangles with s survives.

``forward_rect`` / ``backward_rect`` run the public blockwise block functions on one rectangle:
the forward merges (out, lse) into the rank's running result by log-sum-exp, the backward takes
the final (out, lse) and returns dq rows, the dK/dV of the origin's keys and bias gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masks as M
from ..backends.blockwise import BlockwiseOptions, block_backward, block_forward
from .layout import Segment, segments
from .offsets import Window, add_bias_grads, block_status, shift_bias, shift_mask


@dataclass(frozen=True)
class Rect:
    """Local query rows ``q`` of this rank against keys ``k`` of an origin's shard."""

    q: Segment
    k: Segment
    mask: object  # attnkit.masks.Mask | None, at this rectangle's global positions
    bias: object  # attnkit.biases.Bias | None, likewise
    slots: tuple  # per global bias tensor: None or the index of the piece ``bias`` reads


@dataclass(frozen=True)
class Kernel:
    """What every rectangle's block call shares."""

    scale: float
    softcap: float | None
    options: BlockwiseOptions
    dtype: torch.dtype  # compute dtype (float32 for half inputs)


def plan_rects(mask, bias, *, rank: int, world: int, layout: str, nq: int, nk: int, batch: int,
               heads: int) -> tuple[tuple[Rect, ...], ...]:
    """Per origin rank s (index s), this rank's non-empty rectangles against s's keys.

    ``mask`` / ``bias`` are specs for the global (Nq, Nk) problem (already checked)."""
    Nq, Nk = world * nq, world * nk
    qsegs = segments(layout, nq, rank, world)
    out = []
    for s in range(world):
        rects = []
        for ks in segments(layout, nk, s, world):
            for qs in qsegs:
                w = Window(qs.start, qs.length, ks.start, ks.length, Nq, Nk)
                m = shift_mask(mask, w)
                if block_status(m, qs.length, ks.length, batch=batch, heads=heads) == M.EMPTY:
                    continue
                b, slots = shift_bias(bias, w)
                rects.append(Rect(qs, ks, m, b, slots))
        out.append(tuple(rects))
    return tuple(out)


def need_matrix(mask, *, world: int, layout: str, nq: int, nk: int, batch: int = 1, heads: int = 1) -> tuple:
    """need[r][s] for every rank (what the ranks all-gather in a call), computed in one process."""
    return tuple(tuple(bool(rs) for rs in plan_rects(mask, None, rank=r, world=world, layout=layout, nq=nq, nk=nk,
                                                     batch=batch, heads=heads)) for r in range(world))


def merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, o: torch.Tensor, s: torch.Tensor) -> None:
    """Fold a partial (o (B, Hq, n, Dv), s (B, Hq, n)) into out/lse rows in place (o is consumed).

    Running lse is -inf on rows with no allowed key yet; block_forward marks those rows +inf."""
    s = s.masked_fill(s == float("inf"), float("-inf"))
    old = lse[:, :, rows]  # (B, Hq, n)
    new = torch.logaddexp(old, s)
    ref = new.masked_fill(new == float("-inf"), 0.0)
    a, b = torch.exp(old - ref).unsqueeze(-1), torch.exp(s - ref).unsqueeze(-1)  # (B, Hq, n, 1)
    out[:, :, rows].mul_(a).add_(o.to(out.dtype).mul_(b))  # in place: no output-sized temporaries
    lse[:, :, rows] = new


def new_result(q: torch.Tensor, dv: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero output (B, Hq, nq, Dv) and running log-sum-exp (B, Hq, nq) = -inf."""
    B, Hq, nq, _ = q.shape
    return (torch.zeros(B, Hq, nq, dv, dtype=dtype, device=q.device),
            torch.full((B, Hq, nq), float("-inf"), dtype=dtype, device=q.device))


def final_lse(lse: torch.Tensor) -> torch.Tensor:
    """Running lse -> the block functions' convention (+inf where no key was allowed)."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def forward_rect(kern: Kernel, rect: Rect, q, k, v, out, lse) -> None:
    """Merge rectangle ``rect`` (q: this rank's queries, k/v: the origin's shard) into out/lse."""
    r, c = rect.q.rows, rect.k.rows
    o, s = block_forward(q[:, :, r].to(kern.dtype), k[:, :, c].to(kern.dtype), v[:, :, c].to(kern.dtype),
                         mask=rect.mask, bias=rect.bias, scale=kern.scale, softcap=kern.softcap,
                         options=kern.options)
    merge(out, lse, r, o, s)


def backward_rect(kern: Kernel, rect: Rect, q, k, v, out, lse, dout, dq, dk, dv, bias_acc) -> None:
    """Add the rectangle's gradients: dq rows (B, Hq, nq, D), the origin's dk (B, Hk, nk, D) /
    dv (B, Hk, nk, Dv) keys, and bias gradients (``bias_acc``, aligned with the global spec's
    tensors). out / lse are this rank's final results (lse in the +inf convention)."""
    r, c = rect.q.rows, rect.k.rows
    *_, gb = block_backward(q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r], lse[:, :, r], dout[:, :, r],
                            mask=rect.mask, bias=rect.bias, scale=kern.scale, softcap=kern.softcap,
                            options=kern.options, into=(dq[:, :, r], dk[:, :, c], dv[:, :, c]))  # added in place
    add_bias_grads(bias_acc, gb, rect.slots)
