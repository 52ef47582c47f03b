"""Helpers shared by the positional schemes that compute their own attention (Shaw, Transformer-XL).

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, C query chunk, D head dim.

Query row i sits at key position i + (Nk - Nq) (bottom-right alignment, as everywhere in attnkit).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .._numerics import compute_dtype, expand_kv, safe_softmax  # noqa: F401  (re-exported for shaw, xl)
from .._validate import check_qkv, check_scale  # noqa: F401  (re-exported)
from ..masks import TileMap, as_mask


def check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be an int > 0, got {chunk_size!r}")
    return chunk_size


KEY_BLOCK = 64  # key granularity of the per-chunk key span


def masked_softmax(s: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys with ``blocked`` pairs excluded; all-blocked rows give zeros (never NaN).
    One fused softmax when no row is empty."""
    if blocked is None:
        return torch.softmax(s, dim=-1)
    empty = blocked.all(dim=-1, keepdim=True)  # (..., C, 1), as small as the mask
    if bool(empty.any()):
        return safe_softmax(s, blocked)
    return torch.softmax(s.masked_fill(blocked, float("-inf")), dim=-1)


class ChunkedMask:
    """Per query chunk: the span of keys the mask can allow, and the blocked pairs inside it.

    ``mask`` is None, an ``attnkit.masks`` spec or a bool tensor broadcastable to
    (B, Hq, Nq, Nk) with True = may attend (``masks.as_mask``). The tile planner
    (``masks.TileMap``, tiles of (chunk, KEY_BLOCK)) gives each chunk's key span; the mask is
    evaluated only on that span of a chunk with partial tiles, so memory stays O(C * Nk).
    """

    def __init__(self, mask, *, batch: int, heads: int, nq: int, nk: int, chunk: int, device):
        spec = as_mask(mask, batch=batch, heads=heads, nq=nq, nk=nk, device=device)
        self.chunk, self.nk = chunk, nk
        self.tiles = TileMap(spec, batch=batch, heads=heads, nq=nq, nk=nk, block_q=chunk, block_k=KEY_BLOCK,
                             device=device)

    def span(self, lo: int, hi: int) -> tuple[int, int, torch.Tensor | None]:
        """(k0, k1, blocked) for query rows [lo, hi): keys outside [k0, k1) are blocked for every
        row; ``blocked`` is a bool tensor broadcastable to (B, Hq, hi - lo, k1 - k0), or None.
        k0 == k1 means the whole chunk is masked."""
        k0, k1, full = self.tiles.span(lo // self.chunk)
        if k1 <= k0 or full:
            return k0, k1, None
        return k0, k1, ~self.tiles.allowed(lo, hi, k0, k1)


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
