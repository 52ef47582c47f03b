"""Helpers shared by the positional schemes that compute their own attention (Shaw, Transformer-XL).

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, C query chunk, D head dim.

Query row i sits at key position i + (Nk - Nq) (bottom-right alignment, as everywhere in attnkit).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .._validate import check_broadcastable, check_qkv, check_scale  # noqa: F401  (re-exported)
from ..masks import EMPTY, FULL, PARTIAL, Mask


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half and bfloat16 inputs are computed in float32 (statistics and sums)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hk, N, D) -> (B, Hk * groups, N, D): query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be an int > 0, got {chunk_size!r}")
    return chunk_size


KEY_BLOCK = 64  # key granularity of the per-chunk key span


def masked_softmax(s: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys with ``blocked`` (bool, broadcastable to s) pairs excluded.

    One fused softmax; rows with every key blocked give zeros and zero gradient (never NaN).
    """
    if blocked is None:
        return torch.softmax(s, dim=-1)
    s = s.masked_fill(blocked, float("-inf"))
    empty = blocked.all(dim=-1, keepdim=True)  # (..., C, 1), as small as the mask
    if bool(empty.any()):
        return torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.softmax(s, dim=-1)


class ChunkedMask:
    """Per query chunk: the span of keys the mask can allow, and the blocked pairs inside it.

    ``mask`` is None, an ``attnkit.masks`` spec (evaluated on index tensors for the chunk's rows
    and key span only, so memory stays O(C * Nk)), or a bool tensor broadcastable to
    (B, Hq, Nq, Nk) with True = may attend.
    """

    def __init__(self, mask, *, batch: int, heads: int, nq: int, nk: int, chunk: int, device):
        self.batch, self.heads, self.nq, self.nk, self.chunk, self.device = batch, heads, nq, nk, chunk, device
        self.spec = self.tensor = None
        self.status = None  # (Tq, Tk) int8 tile map reduced over batch and heads, for specs
        if mask is None:
            return
        if isinstance(mask, Mask):
            mask.check(nq, nk, batch=batch, heads=heads)  # data (lengths, ids, layouts) must fit the input
            self.spec = mask
            t = mask.tiles(nq, nk, chunk, KEY_BLOCK, batch=batch, heads=heads, device=device)  # (B', H', Tq, Tk)
            lo, hi = t.amin(dim=(0, 1)), t.amax(dim=(0, 1))
            self.status = torch.where(lo == FULL, FULL, torch.where(hi == EMPTY, EMPTY, PARTIAL)).cpu()
            return
        if isinstance(mask, torch.Tensor):
            if mask.dtype != torch.bool:
                raise TypeError(
                    f"mask must be a bool tensor (True = may attend) or an attnkit.masks spec, got dtype {mask.dtype}"
                )
            check_broadcastable("mask", mask, (batch, heads, nq, nk), "(B, Hq, Nq, Nk)")
            if mask.device != device:
                raise ValueError(f"mask is on {mask.device} but q is on {device}")
            t = mask
            while t.dim() < 4:
                t = t.unsqueeze(0)  # (B', H', Nq', Nk')
            self.tensor = t
            return
        raise TypeError(f"mask must be None, a bool tensor or an attnkit.masks spec, got {type(mask).__name__}")

    def span(self, lo: int, hi: int) -> tuple[int, int, torch.Tensor | None]:
        """(k0, k1, blocked) for query rows [lo, hi): keys outside [k0, k1) are blocked for every
        row; ``blocked`` is a bool tensor broadcastable to (B, Hq, hi - lo, k1 - k0), or None.
        k0 == k1 means the whole chunk is masked."""
        nk = self.nk
        if self.spec is not None:
            row = self.status[lo // self.chunk]  # (Tk,)
            nz = torch.nonzero(row != EMPTY).flatten()
            if nz.numel() == 0:
                return 0, 0, None
            t0, t1 = int(nz[0]), int(nz[-1]) + 1
            k0, k1 = t0 * KEY_BLOCK, min(nk, t1 * KEY_BLOCK)
            if bool((row[t0:t1] == FULL).all()):
                return k0, k1, None
            b = torch.arange(self.batch, device=self.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            h = torch.arange(self.heads, device=self.device).view(1, -1, 1, 1)  # (1, Hq, 1, 1)
            q = (torch.arange(lo, hi, device=self.device) + (nk - self.nq)).view(1, 1, -1, 1)  # (1, 1, C, 1)
            k = torch.arange(k0, k1, device=self.device).view(1, 1, 1, -1)  # (1, 1, 1, Lk)
            allowed = self.spec.allows(b, h, q, k, num_keys=nk)
            if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
                raise TypeError(f"mask spec {self.spec!r} returned {getattr(allowed, 'dtype', type(allowed))}, expected bool")
            return k0, k1, ~allowed
        if self.tensor is not None:
            t = self.tensor
            rows = t if t.shape[2] == 1 else t[:, :, lo:hi]  # (B', H', C', Nk')
            if t.shape[3] == 1:
                return (0, nk, ~rows) if bool(rows.any()) else (0, 0, None)
            cols = torch.nonzero(rows.any(dim=(0, 1, 2))).flatten()
            if cols.numel() == 0:
                return 0, 0, None
            k0, k1 = int(cols[0]), int(cols[-1]) + 1
            return k0, k1, ~rows[..., k0:k1]
        return 0, nk, None


def run_chunks(chunk_fn: Callable, masks: ChunkedMask, *, shape: tuple[int, int, int, int], dtype, device,
               grad: bool, checkpoint: bool) -> torch.Tensor:
    """Concatenate ``chunk_fn(lo, hi, k0, k1, blocked) -> (B, Hq, C, Dv)`` over query chunks.

    Chunks whose rows are all masked give zeros without work (with ``grad``, through a single
    blocked key so every input still gets its zero gradient). With ``checkpoint`` each chunk is
    recomputed in backward (torch.utils.checkpoint, non-reentrant), so training memory stays
    O(B * Hq * C * Nk) instead of keeping every chunk's weights.
    """
    B, Hq, Nq, Dv = shape
    outs = []
    for lo in range(0, Nq, masks.chunk):
        hi = min(lo + masks.chunk, Nq)
        k0, k1, blocked = masks.span(lo, hi)
        if k1 <= k0:
            if not grad:
                outs.append(torch.zeros(B, Hq, hi - lo, Dv, dtype=dtype, device=device))
                continue
            # Keep the graph (zero gradients for every input, like the reference): one blocked key.
            k0, k1, blocked = 0, 1, torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        if checkpoint:
            outs.append(_checkpoint(chunk_fn, lo, hi, k0, k1, blocked, use_reentrant=False))
        else:
            outs.append(chunk_fn(lo, hi, k0, k1, blocked))
    if not outs:
        return torch.zeros(B, Hq, 0, Dv, dtype=dtype, device=device)
    return torch.cat(outs, dim=2)  # (B, Hq, Nq, Dv)


def check_param(name: str, t: torch.Tensor, shape: tuple[int, ...], legend: str, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {legend}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {legend} = {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but q is on {like.device}")
