"""Translation-invariant biases in the blockwise tile math: values read from one strip, gradients
summed per offset.

Legend: Hq query heads (Hk key/value heads, G = Hq // Hk), bq rows of a query block, bk keys of
a key tile, L keys of a work item, C query blocks of a group, W columns of a sheared tile.

A bias that depends only on the head and the offset r = k - q (``Bias.translation_invariant``:
T5 buckets, ALiBi, ...) takes one value per (head, offset). A tile whose keys are one contiguous
run starting d = k0 - q0 after its first query holds bias(h, d + j - i) at row i, key j: the
same numbers for every tile with the same d. ``BiasStrip`` evaluates the bias once per call, on
every offset, into S[h, i, u] = bias(h, u + base - i) (bq rows, Nq + Nk columns); such a tile
is then the view S[:, :, d - base : d - base + L], with no per-pair index arithmetic or table
gather. (A strided view of the 1-D offsets alone would need a negative row stride, which torch
has no room for, hence the bq rows.) ``OffsetGrad`` is the way back: dL/d(bias at offset r) is
the sum of dS along the tile's diagonals, one sum per offset, turned into the spec's tensor
gradients by one autograd call on ``relative``.

``g`` is the call's ``blockwise_tiles.Geometry`` and ``keys`` a ``RangeKeys`` / ``GatherKeys``
item (this module imports neither: ``blockwise_tiles`` imports it).
"""

from __future__ import annotations

import torch

STRIP_BUDGET = 4  # a BiasStrip may hold this many times ``mask_elements`` values, else tiles evaluate the bias


def tile_offset(g, keys, t0: int) -> int | None:
    """k0 - q0 (key coordinates) when every query block of the item reads one contiguous run of
    keys at the same offset from its first query, else None."""
    if hasattr(keys, "idx"):  # GatherKeys: set when its blocks are regular (see GatherKeys.offset)
        return keys.offset
    return keys.k0 - (t0 * g.bq + g.Nk - g.Nq)  # RangeKeys: one query block


class BiasStrip:
    """The call's translation-invariant bias parts, summed, as S (Hq, bq, width) in g.dtype."""

    def __init__(self, g, parts, device):
        bq, Hq = g.bq, g.Hq
        self.base = -((g.Tq - 1) * bq + (g.Nk - g.Nq))  # the smallest k0 - q0 of any tile
        width = g.Tk * g.bk + (g.Tq - 1) * bq  # offsets of keys 0 .. Tk*bk - 1 from every block
        r = torch.arange(width + bq - 1, device=device) + (self.base - (bq - 1))  # (width + bq - 1,)
        h = torch.arange(Hq, device=device).view(-1, 1)
        w = None
        for part in parts:
            x = part.relative(h, r.view(1, -1)).detach().to(g.dtype)
            w = x if w is None else w + x
        w = w.expand(Hq, r.numel()).contiguous()  # (Hq, width + bq - 1): w[h, t] = bias(h, t + base - (bq - 1))
        t = w.as_strided((Hq, bq, width), (w.stride(0), 1, 1))  # t[h, i, u] = w[h, i + u]
        self.S = t.flip(1)  # (Hq, bq, width): S[h, i, u] = w[h, u + bq - 1 - i] = bias(h, u + base - i)
        self.g = g

    @staticmethod
    def make(g, mask_elements: int, device) -> BiasStrip | None:
        """The strip of g's translation-invariant parts, or None (no such part, or over budget)."""
        parts = [p for p in g.bias_parts if p.translation_invariant]
        if not parts or g.Hq * g.bq * (g.Tk * g.bk + (g.Tq - 1) * g.bq) > STRIP_BUDGET * mask_elements:
            return None
        return BiasStrip(g, parts, device)

    def tile(self, keys, t0: int, L: int) -> torch.Tensor | None:
        """(1, Hk, 1, G, bq, L): the item's bias values (the same for each of its query blocks), a
        view of S, or None when its key runs are not at one offset."""
        d = tile_offset(self.g, keys, t0)
        if d is None:
            return None
        g = self.g
        u = d - self.base
        return self.S[:, :, u:u + L].view(1, g.Hk, 1, g.G, g.bq, L)


class OffsetGrad:
    """Gradient of a translation-invariant bias per (query head, offset r = k - q).

    A tile of dS is sheared so that its diagonals become columns (a strided copy into a
    (bq, bq + L - 1) zero buffer) and summed over rows, then added at the tile's offset. Items at
    one offset (``tile_offset``) shear their whole key run at once, after summing their query
    blocks; others shear each (bq, bk) tile. ``finish(part)`` turns the sums into the spec's
    tensor gradients by one autograd call on ``part.relative`` over all offsets (no per-pair
    scatter)."""

    def __init__(self, g, dtype, device):
        self.g = g
        # offsets k - q of (padded) rows and keys: -(Tq*bq - 1 + off) .. Tk*bk - 1 - off, off = Nk - Nq
        self.shift = g.Tq * g.bq + (g.Nk - g.Nq)  # index of offset 0
        self.acc = torch.zeros(g.Hq, g.Tq * g.bq + g.Tk * g.bk, dtype=dtype, device=device)

    def add(self, ds6: torch.Tensor, keys, t0: int) -> None:
        """ds6 (B, Hk, C, G, bq, L): dL/d(score) of one item."""
        g = self.g
        B, Hk, C, G, bq, L = ds6.shape
        x = ds6[0] if B == 1 else ds6.sum(dim=0)  # (Hk, C, G, bq, L)
        d = tile_offset(g, keys, t0)
        dev = ds6.device
        if d is not None:  # one run of keys at one offset: shear the whole run
            x = (x[:, 0] if C == 1 else x.sum(dim=1)).reshape(g.Hq, 1, bq, L)  # (Hq, 1, bq, L)
            sums = _diagonal_sums(x)  # (Hq, 1, L + bq - 1)
            start = torch.tensor([[d - (bq - 1) + self.shift]], device=dev)  # (1, 1)
        else:  # gathered key tiles (GatherKeys): shear each (bq, bk) tile
            bk = g.bk
            M = L // bk
            x = x.view(Hk, C, G, bq, M, bk).permute(0, 2, 1, 4, 3, 5).reshape(g.Hq, C * M, bq, bk)
            sums = _diagonal_sums(x)  # (Hq, C*M, bk + bq - 1): column u is offset (kbase - qbase) + u - (bq - 1)
            kbase = keys.idx * bk  # (C, M)
            qbase = ((t0 + torch.arange(C, device=dev)) * g.bq + (g.Nk - g.Nq)).view(C, 1)
            start = (kbase - qbase - (bq - 1) + self.shift).reshape(1, -1)  # (1, C*M)
        index = (start.view(-1, 1) + torch.arange(sums.shape[-1], device=dev)).view(-1)
        self.acc.index_add_(1, index, sums.reshape(g.Hq, -1))

    def finish(self, part) -> list:
        """Gradients of part.tensors() (None where unused)."""
        ts = part.tensors()
        wanted = [t for t in ts if t.requires_grad]
        r = torch.arange(self.acc.shape[1], device=self.acc.device) - self.shift
        with torch.enable_grad():
            val = part.relative(torch.arange(self.g.Hq, device=r.device).view(-1, 1), r.view(1, -1))
            got = iter(torch.autograd.grad(val, wanted, self.acc.to(val.dtype), allow_unused=True))
        return [next(got) if t.requires_grad else None for t in ts]


def _diagonal_sums(x: torch.Tensor) -> torch.Tensor:
    """x (..., bq, L) -> (..., L + bq - 1): column u sums x[..., r, c] over r with c + bq - 1 - r = u."""
    *lead, bq, L = x.shape
    W = L + bq - 1
    z = torch.zeros(*lead, bq, W, dtype=x.dtype, device=x.device)
    # z[..., r, c + bq - 1 - r] = x[..., r, c]: row stride W - 1 shears diagonals into columns
    torch.as_strided(z, x.shape, (*z.stride()[:-2], W - 1, 1), bq - 1).copy_(x)
    return z.sum(dim=-2)
