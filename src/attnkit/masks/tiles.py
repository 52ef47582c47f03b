"""``TileMap``: the one tile planner. Which (block_q, block_k) tiles of a call hold work.

Legend: B batch, H query heads, Nq queries, Nk keys, bq / bk tile sizes, Tq = ceil(Nq / bq),
Tk = ceil(Nk / bk). Query positions are in key coordinates (see ``masks.base``).

Every tiled kernel (the blockwise backend, additive attention, the Shaw / Transformer-XL chunks)
asks the mask's ``tiles()`` once, reduces it over batch and heads, skips EMPTY tiles, runs FULL
tiles without evaluating the mask, and evaluates ``allows`` only on PARTIAL ones.
"""

from __future__ import annotations

import torch

from .base import EMPTY, FULL, PARTIAL, Mask, check_tile_args


class TileMap:
    """Tile status of a (batch, heads, Nq, Nk) call under ``mask`` (None: every tile FULL).

    ``status`` (Tq, Tk) int8: EMPTY when the tile is empty for every batch row and head, FULL
    when full for all of them, else PARTIAL. ``pad_keys=True`` marks a last, incomplete key
    tile PARTIAL (for kernels that pad K/V to whole tiles: the padding keys must be masked).
    """

    def __init__(self, mask: Mask | None, *, batch: int, heads: int, nq: int, nk: int, block_q: int,
                 block_k: int, device=None, pad_keys: bool = False):
        check_tile_args(nq, nk, block_q, block_k)
        self.mask, self.batch, self.heads, self.nq, self.nk = mask, batch, heads, nq, nk
        self.bq, self.bk, self.device = block_q, block_k, device
        self.tq, self.tk = -(-nq // block_q), -(-nk // block_k)
        if mask is None:
            st = torch.full((self.tq, self.tk), FULL, dtype=torch.int8, device=device)
        else:
            tm = mask.tiles(nq, nk, block_q, block_k, batch=batch, heads=heads, device=device).to(device)
            if tm.dim() != 4 or tuple(tm.shape[2:]) != (self.tq, self.tk):
                raise ValueError(f"{mask!r}.tiles() returned shape {tuple(tm.shape)}, "
                                 f"expected (B', H', {self.tq}, {self.tk})")
            lo, hi = tm.amin(dim=(0, 1)), tm.amax(dim=(0, 1))
            st = torch.where(lo == FULL, FULL, torch.where(hi == EMPTY, EMPTY, PARTIAL)).to(torch.int8)
        if pad_keys and nk % block_k and self.tk:
            last = st[:, -1]
            st[:, -1] = torch.where(last == FULL, torch.full_like(last, PARTIAL), last)
        self.status = st
        self._rows: list[list[int]] | None = None

    def rows(self) -> list[list[int]]:
        """status as nested Python lists (computed once)."""
        if self._rows is None:
            self._rows = self.status.tolist()
        return self._rows

    def nonempty(self):
        """(i, j) of every non-EMPTY tile, row by row."""
        for i, row in enumerate(self.rows()):
            for j, s in enumerate(row):
                if s != EMPTY:
                    yield i, j

    def span(self, i: int) -> tuple[int, int, bool]:
        """Key range [k0, k1) covering the non-EMPTY tiles of query block i, and whether every
        tile in it is FULL (no mask evaluation needed). k0 == k1 when the block has no key."""
        row = self.rows()[i]
        nz = [j for j, s in enumerate(row) if s != EMPTY]
        if not nz:
            return 0, 0, True
        j0, j1 = nz[0], nz[-1] + 1
        return j0 * self.bk, min(self.nk, j1 * self.bk), all(s == FULL for s in row[j0:j1])

    def allowed(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
        """Bool (B', H', q1 - q0, k1 - k0) for query rows [q0, q1) and keys [k0, k1); None without a mask."""
        if self.mask is None:
            return None
        b = torch.arange(self.batch, device=self.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        h = torch.arange(self.heads, device=self.device).view(1, -1, 1, 1)  # (1, H, 1, 1)
        q = (torch.arange(q0, q1, device=self.device) + (self.nk - self.nq)).view(1, 1, -1, 1)  # (1, 1, C, 1)
        k = torch.arange(k0, k1, device=self.device).view(1, 1, 1, -1)  # (1, 1, 1, L)
        out = self.mask.allows(b, h, q, k, num_keys=self.nk)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(f"mask spec {self.mask!r} returned {getattr(out, 'dtype', type(out))}, expected bool")
        return out

    def tile_allowed(self, i: int, j: int) -> torch.Tensor | None:
        """``allowed`` for tile (i, j); None when it is FULL (or there is no mask)."""
        if self.mask is None or self.rows()[i][j] == FULL:
            return None
        return self.allowed(i * self.bq, min(self.nq, (i + 1) * self.bq), j * self.bk, min(self.nk, (j + 1) * self.bk))


__all__ = ["TileMap"]
