"""Mask and bias specs evaluated at global positions: the query/key offsets of context parallelism.

Legend: B batch, H query heads, Nq / Nk global queries / keys, nq / nk rows / keys of one block,
Tq / Tk tiles of a block, dq / dk position offsets.

A block of a ring step is a rectangle of the global (Nq, Nk) score matrix (a ``Window``): local
query rows 0..nq-1 are global rows q0..q0+nq-1, local keys 0..nk-1 are global keys k0..k0+nk-1.
A kernel evaluates specs at local positions, in local key coordinates (query row i at
i + nk - nq, see ``attnkit.masks``). The shifted specs below answer at local (q, k) what the
wrapped spec answers at the global (q + dq, k + dk), with

    dq = q0 + (Nk - Nq) - (nk - nq),    dk = k0,

so the global bottom-right alignment is kept, and report their global data sizes to ``check``.
Nothing in a kernel changes: offsets are spec data.

``shift_mask`` rewrites in closed form where that is exact and cheap: a band (causal, sliding
window) becomes the band with both ends moved by dq - dk (so kernels keep their band fast
paths), ``&`` / ``|`` shift their parts, key padding shifts its lengths, per-key flags and dense
tensors are sliced. Any other spec is wrapped in ``ShiftedMask``, whose tile map is closed-form
for documents (sorted ids) and prefix LM, and otherwise evaluated from ``allows`` on the block
only (``attnkit.masks.evaluate_tiles``: O(nq * nk) integer work).

``shift_bias`` wraps bias specs in ``ShiftedBias`` (same learnable tensors, so gradients reach
them unchanged), maps sums part by part and slices dense bias tensors; it also returns, per
tensor of the global spec's ``tensors()``, the index of the block's piece (None = the whole
tensor), so block gradients are added back where they belong (``add_bias_grads``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masks as M
from ..biases import Bias, SumBias, TensorBias


@dataclass(frozen=True)
class Window:
    """A (nq, nk) rectangle of the global (Nq, Nk) score matrix starting at row q0, key k0."""

    q0: int
    nq: int
    k0: int
    nk: int
    Nq: int
    Nk: int

    @property
    def dq(self) -> int:
        return self.q0 + (self.Nk - self.Nq) - (self.nk - self.nq)

    @property
    def dk(self) -> int:
        return self.k0

    def __str__(self) -> str:
        return f"rows {self.q0}..{self.q0 + self.nq - 1} x keys {self.k0}..{self.k0 + self.nk - 1} of ({self.Nq}, {self.Nk})"


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


class _Shifted:
    """What a shifted mask and a shifted bias share: ``inner`` seen through ``window`` (a block of
    the global (Nq, Nk) problem), checked against the block's size and the global one."""

    def __init__(self, inner, window: Window):
        self.inner, self.window = inner, window

    def check(self, nq, nk, *, batch=1, heads=1):
        w = self.window
        if (nq, nk) != (w.nq, w.nk):
            raise ValueError(f"{self!r} describes a ({w.nq}, {w.nk}) block, got Nq={nq}, Nk={nk}")
        self.inner.check(w.Nq, w.Nk, batch=batch, heads=heads)

    @property
    def device(self):
        return self.inner.device

    def __repr__(self):
        return f"{self.inner!r} at [{self.window}]"


class ShiftedMask(_Shifted, M.Mask):
    """``inner`` evaluated at global positions: allows(q, k) = inner.allows(q + dq, k + dk)."""

    # A shift keeps k - q up to a constant and keeps which of (b, h, k) the spec reads.
    translation_invariant = property(lambda self: self.inner.translation_invariant)
    key_only = property(lambda self: self.inner.key_only)
    batch_size = property(lambda self: self.inner.batch_size)
    num_heads = property(lambda self: self.inner.num_heads)

    def allows(self, b, h, q, k, *, num_keys=None):
        w = self.window
        return self.inner.allows(b, h, q + w.dq, k + w.dk, num_keys=w.Nk)


    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        rule = _TILE_RULES.get(type(self.inner))
        out = rule(self.inner, self.window, nq, nk, block_q, block_k, device or self.device) if rule else None
        if out is None:
            out = M.evaluate_tiles(self, nq, nk, block_q, block_k, batch=batch, heads=heads, device=device)
        return out



def shift_mask(mask: M.Mask | None, window: Window) -> M.Mask | None:
    """The spec whose value at local (q, k) of ``window`` is ``mask``'s at the global position."""
    if mask is None:
        return None
    rule = _MASK_RULES.get(type(mask))
    return rule(mask, window) if rule else ShiftedMask(mask, window)


def _shift_band(m: M.Band, w: Window) -> M.Mask:
    # lo <= (k + dk) - (q + dq) <= hi  <=>  lo + dq - dk <= k - q <= hi + dq - dk
    d = w.dq - w.dk
    move = lambda x: None if x is None else x + d
    return M.Band(move(m.lo), move(m.hi), f"{m.name}.shift({d})" if d else m.name)


def _shift_parts(m, w: Window) -> M.Mask:
    return type(m)(*(shift_mask(p, w) for p in m.parts))


def _shift_key_padding(m: M.KeyPadding, w: Window) -> M.Mask:
    return M.KeyPadding((m.lengths - w.dk).clamp_min(0))  # k + dk < n  <=>  k < n - dk


def _shift_key_valid(m: M.KeyValid, w: Window) -> M.Mask:
    return M.KeyValid(m.valid[:, w.k0:w.k0 + w.nk])  # (B, nk)


def _shift_tensor_mask(m: M.TensorMask, w: Window) -> M.Mask:
    return M.TensorMask(m.tensor[_dense_index(m.tensor, w)], w.nq, w.nk)


_MASK_RULES = {
    M.Band: _shift_band,
    M.And: _shift_parts,
    M.Or: _shift_parts,
    M.KeyPadding: _shift_key_padding,
    M.KeyValid: _shift_key_valid,
    M.TensorMask: _shift_tensor_mask,
}


def _dense_index(t: torch.Tensor, w: Window) -> tuple:
    """Index of the window's piece of a dense (B|1, H|1, Nq|1, Nk|1) tensor (size-1 dims kept)."""
    rows = slice(w.q0, w.q0 + w.nq) if t.shape[2] > 1 else slice(None)
    cols = slice(w.k0, w.k0 + w.nk) if t.shape[3] > 1 else slice(None)
    return slice(None), slice(None), rows, cols


def _global_bounds(w: Window, nq: int, nk: int, block_q: int, block_k: int, device):
    """First/last global query position (key coordinates) (Tq, 1) and key (1, Tk) of each tile."""
    tq, tk = -(-nq // block_q), -(-nk // block_k)
    r0 = torch.arange(tq, device=device) * block_q
    c0 = torch.arange(tk, device=device) * block_k
    off = w.q0 + w.Nk - w.Nq
    q0, q1 = r0 + off, (r0 + block_q - 1).clamp_max(nq - 1) + off
    k0, k1 = c0 + w.k0, (c0 + block_k - 1).clamp_max(nk - 1) + w.k0
    return q0.view(-1, 1), q1.view(-1, 1), k0.view(1, -1), k1.view(1, -1)


def _classify(full: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    out = torch.where(full, M.FULL, torch.where(empty, M.EMPTY, M.PARTIAL)).to(torch.int8)
    while out.dim() < 4:
        out = out.unsqueeze(0)
    return out  # (B', H', Tq, Tk)


def _document_tiles(m: M.Document, w: Window, nq, nk, block_q, block_k, device):
    """Sorted ids (the packed case): a tile is full iff one document spans it, empty iff the query
    and key id ranges do not overlap. None (evaluate instead) for unsorted ids."""
    ids = m.ids.to(device)  # (B', Nk)
    q0, q1, k0, k1 = _global_bounds(w, nq, nk, block_q, block_k, device)
    if int(q0.min()) < 0 or not bool((ids[:, 1:] >= ids[:, :-1]).all()):
        return None
    lo_q, hi_q = ids[:, q0.view(-1)].unsqueeze(-1), ids[:, q1.view(-1)].unsqueeze(-1)  # (B', Tq, 1)
    lo_k, hi_k = ids[:, k0.view(-1)].unsqueeze(1), ids[:, k1.view(-1)].unsqueeze(1)  # (B', 1, Tk)
    full = (lo_q == hi_q) & (lo_k == hi_k) & (lo_q == lo_k)
    empty = (hi_q < lo_k) | (hi_k < lo_q)
    return _classify(full.unsqueeze(1), empty.unsqueeze(1))


def _prefix_lm_tiles(m: M.PrefixLM, w: Window, nq, nk, block_q, block_k, device):
    q0, q1, k0, k1 = _global_bounds(w, nq, nk, block_q, block_k, device)
    p = m.prefix if isinstance(m.prefix, int) else m.prefix.to(device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return _classify((k1 <= q0) | (k1 < p), (k0 > q1) & (k0 >= p))


_TILE_RULES = {M.Document: _document_tiles, M.PrefixLM: _prefix_lm_tiles}


def block_status(mask: M.Mask | None, nq: int, nk: int, *, batch: int = 1, heads: int = 1) -> int:
    """EMPTY, PARTIAL or FULL for the whole (nq, nk) block (over every batch row and head).

    Uses the spec's tile map with whole-width tiles; a generic spec is evaluated a few million
    pairs at a time.
    """
    if mask is None:
        return M.FULL
    rows = max(1, min(nq, (1 << 22) // max(1, nk)))
    t = mask.tiles(nq, nk, rows, nk, batch=batch, heads=heads)
    lo, hi = int(t.min()), int(t.max())
    return M.FULL if lo == M.FULL else M.EMPTY if hi == M.EMPTY else M.PARTIAL


# ---------------------------------------------------------------------------------------------
# Biases
# ---------------------------------------------------------------------------------------------


class ShiftedBias(_Shifted, Bias):
    """``inner`` evaluated at global positions; reads (and differentiates) the same tensors."""

    def __call__(self, b, h, q, k):
        return self.inner(b, h, q + self.window.dq, k + self.window.dk)

    def tensors(self):
        return self.inner.tensors()




def shift_bias(bias: Bias | None, window: Window) -> tuple[Bias | None, tuple]:
    """(shifted spec, slots): slots[i] is None or the index into ``bias.tensors()[i]`` of the
    tensor the shifted spec reads instead (a dense bias tensor's piece)."""
    if bias is None:
        return None, ()
    if type(bias) is SumBias:
        pairs = [shift_bias(p, window) for p in bias.parts]
        return SumBias(tuple(p for p, _ in pairs)), tuple(s for _, ss in pairs for s in ss)
    if type(bias) is TensorBias:
        idx = _dense_index(bias.tensor, window)
        with torch.enable_grad():  # the piece must carry the tensor's requires_grad into backward
            piece = bias.tensor[idx]
        return TensorBias(piece, window.nq, window.nk), (idx,)
    return ShiftedBias(bias, window), (None,) * len(bias.tensors())


def add_bias_grads(acc: list, grads: list, slots: tuple) -> None:
    """acc[i] (the global tensor's gradient, or None) += the block's grads[i] at slots[i]."""
    for a, g, s in zip(acc, grads, slots):
        if a is None or g is None:
            continue
        if s is None:
            a.add_(g.to(a.dtype))
        else:
            a[s] += g.to(a.dtype)
