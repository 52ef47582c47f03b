"""Sparse patterns from the literature, as mask specs (see ``attnkit.masks`` for conventions).

Legend: i = query position (key coordinates), j = key position, bs = block size.

- dilated(window, dilation): Longformer's dilated sliding window.
- strided(stride), fixed(block, summary): Child et al. 2019, "Generating Long Sequences with
  Sparse Transformers", section 4.2 (the two factorised patterns).
- block_sparse(layout, block_size): any block layout (the paper's and DeepSpeed's form).
- global_tokens(indices): Longformer's global attention (Beltagy et al. 2020).
- bigbird(...): Zaheer et al. 2020, window + global + random blocks.

Queries before key 0 (positions < 0, when Nq > Nk) are in no layout row or BigBird block (they
attend nothing) and are not global tokens (they still attend global keys).
"""

from __future__ import annotations

import torch

from .._hash import hash_coords
from .._validate import shape_str
from .base import (
    Mask,
    _check_keys,
    _check_rows,
    _classify,
    check_tile_args,
    evaluate_tiles,
)


def _bool(name: str, fn: str, val) -> bool:
    if not isinstance(val, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {val!r}")
    return val


def _pos_int(name: str, fn: str, val, minimum: int = 1) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {val!r}")
    return val


class Dilated(Mask):
    """Offsets i - j that are multiples of ``dilation``, ``window`` of them per side.

    causal=True: j in {i, i - d, ..., i - (window - 1) d}. causal=False: also the mirror
    offsets ahead of i (2 * window - 1 keys). Cost per query: O(window) useful keys.
    """

    translation_invariant = True

    def __init__(self, window: int, dilation: int, causal: bool):
        self.width = _pos_int("window", "dilated", window)
        self.dilation = _pos_int("dilation", "dilated", dilation)
        self.causal = _bool("causal", "dilated", causal)

    @property
    def is_causal(self) -> bool:
        return self.causal

    @property
    def window(self) -> int:
        return (self.width - 1) * self.dilation

    def allows(self, b, h, q, k, *, num_keys=None):
        d = q - k
        span = (self.width - 1) * self.dilation
        ok = (torch.remainder(d, self.dilation) == 0) & (d <= span)
        return ok & (d >= 0) if self.causal else ok & (d >= -span)

    def data_tensors(self):
        return ()

    def __repr__(self):
        return f"dilated({self.width}, {self.dilation}, causal={self.causal})"


def dilated(window: int, dilation: int, *, causal: bool = True) -> Mask:
    return Dilated(window, dilation, causal)


class Strided(Mask):
    """Child et al. strided component: j <= i and (i - j) mod stride == 0.

    The paper's full "strided" head pair is ``sliding_window(stride - 1) | strided(stride)``.
    """

    translation_invariant = True
    is_causal = True

    def __init__(self, stride: int):
        self.stride = _pos_int("stride", "strided", stride)

    def allows(self, b, h, q, k, *, num_keys=None):
        d = q - k
        return (d >= 0) & (torch.remainder(d, self.stride) == 0)

    def data_tensors(self):
        return ()

    def __repr__(self):
        return f"strided({self.stride})"


def strided(stride: int) -> Mask:
    return Strided(stride)


class Fixed(Mask):
    """Child et al. fixed pattern: same block of length ``block``, or a summary key (the last
    ``summary`` positions of every block); with causal=True only j <= i."""

    def __init__(self, block: int, summary: int, causal: bool):
        self.block = _pos_int("block", "fixed", block)
        self.summary = _pos_int("summary", "fixed", summary)
        if summary > block:
            raise ValueError(f"fixed: summary ({summary}) must be <= block ({block})")
        self.causal = _bool("causal", "fixed", causal)

    @property
    def is_causal(self) -> bool:
        return self.causal

    def allows(self, b, h, q, k, *, num_keys=None):
        same = torch.div(q, self.block, rounding_mode="floor") == torch.div(k, self.block, rounding_mode="floor")
        summary = torch.remainder(k, self.block) >= self.block - self.summary
        ok = same | summary
        return ok & (k <= q) if self.causal else ok

    def data_tensors(self):
        return ()

    def __repr__(self):
        return f"fixed({self.block}, {self.summary}, causal={self.causal})"


def fixed(block: int, summary: int, *, causal: bool = True) -> Mask:
    return Fixed(block, summary, causal)


class BlockSparse(Mask):
    """layout[h?, i // bs, j // bs] says whether query block i // bs may attend key block j // bs.

    layout: bool (Tq, Tk) shared by heads or (H, Tq, Tk) per head, in key coordinates (row r
    covers key-coordinate positions r*bs .. r*bs + bs - 1).
    """

    def __init__(self, layout: torch.Tensor, block_size: int):
        if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() not in (2, 3):
            got = f"{layout.dtype} {shape_str(layout)}" if isinstance(layout, torch.Tensor) else type(layout).__name__
            raise ValueError(f"block_sparse: layout must be a bool tensor (Tq, Tk) or (H, Tq, Tk), got {got}")
        self.layout = layout if layout.dim() == 3 else layout.unsqueeze(0)
        self.block_size = _pos_int("block_size", "block_sparse", block_size)

    @property
    def device(self):
        return self.layout.device

    @property
    def num_heads(self) -> int | None:
        return self.layout.shape[0] if self.layout.shape[0] > 1 else None

    def check(self, nq, nk, *, batch=1, heads=1):
        if self.layout.shape[0] not in (1, heads):
            raise ValueError(
                f"block_sparse: layout {shape_str(self.layout)} has {self.layout.shape[0]} heads, expected 1 "
                f"(shared) or Hq={heads}"
            )
        self._check(nq, nk)

    def _size_hint(self):
        n = min(self.layout.shape[1], self.layout.shape[2]) * self.block_size
        return n, n

    def _check(self, nq_pos: int, nk: int):
        need = -(-nk // self.block_size)
        if self.layout.shape[1] < need or self.layout.shape[2] < need:
            raise ValueError(
                f"block_sparse: layout {shape_str(self.layout)} covers {self.layout.shape[1]}x{self.layout.shape[2]} "
                f"blocks of {self.block_size}, but Nk={nk} needs {need}x{need}"
            )

    def allows(self, b, h, q, k, *, num_keys=None):
        if num_keys is not None:
            self._check(num_keys, num_keys)
        lay = self.layout.to(k.device)
        hi = h if lay.shape[0] > 1 else torch.zeros_like(h)
        qb = torch.div(q.clamp_min(0), self.block_size, rounding_mode="floor")
        return lay[hi, qb, torch.div(k, self.block_size, rounding_mode="floor")] & (q >= 0)

    def data_tensors(self):
        return (self.layout,)

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        bs = self.block_size
        check_tile_args(nq, nk, block_q, block_k)
        self.check(nq, nk, batch=batch, heads=heads)
        if nq > nk or (nk - nq) % bs or block_q % bs or block_k % bs:
            return evaluate_tiles(self, nq, nk, block_q, block_k, batch=batch, heads=heads, device=device)
        lay = self.layout.to(device or self.device)
        off = (nk - nq) // bs
        nqb, nkb = -(-nq // bs), -(-nk // bs)
        lay = lay[:, off:off + nqb, :nkb].float()  # (H', nqb, nkb)
        fq, fk = block_q // bs, block_k // bs
        tq, tk = -(-nqb // fq), -(-nkb // fk)
        # Pad with "neutral" blocks so that pooling over incomplete tiles is exact:
        # pooling max for "any", min for "all" over padded values that do not change the result.
        pad = (0, tk * fk - nkb, 0, tq * fq - nqb)
        anyv = torch.nn.functional.pad(lay, pad, value=0.0).view(-1, tq, fq, tk, fk).amax(dim=(2, 4))
        allv = torch.nn.functional.pad(lay, pad, value=1.0).view(-1, tq, fq, tk, fk).amin(dim=(2, 4))
        return _classify(allv > 0.5, anyv < 0.5).view(1, -1, tq, tk)

    def __repr__(self):
        return f"block_sparse(layout{tuple(self.layout.shape)}, {self.block_size})"


def block_sparse(layout: torch.Tensor, block_size: int) -> Mask:
    return BlockSparse(layout, block_size)


class GlobalTokens(Mask):
    """Longformer global attention: global positions attend everything and are attended by all.

    indices: 1-D int tensor of global positions (shared by the batch), or a bool (B, Nk) tensor
    marking global positions per sequence. Combine with a window: ``sliding_window(w, w) | g``.
    """

    def __init__(self, indices: torch.Tensor):
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"global_tokens: indices must be a tensor, got {type(indices).__name__}")
        if indices.dtype == torch.bool:
            if indices.dim() != 2:
                raise ValueError(f"global_tokens: a bool tensor must be (B, Nk), got {shape_str(indices)}")
            self.flags, self.indices = indices, None
        elif indices.dim() == 1 and not indices.is_floating_point():
            if (indices < 0).any():
                raise ValueError(f"global_tokens: indices must be >= 0, got {indices.tolist()}")
            self.flags, self.indices = None, indices.to(torch.int64)
        else:
            raise ValueError(f"global_tokens: indices must be 1-D integer or bool (B, Nk), got {indices.dtype} {shape_str(indices)}")

    @property
    def device(self):
        return (self.flags if self.flags is not None else self.indices).device

    @property
    def batch_size(self) -> int | None:
        return None if self.flags is None else self.flags.shape[0]

    def check(self, nq, nk, *, batch=1, heads=1):
        if self.flags is not None:
            _check_rows("global_tokens", "flags", self.flags.shape[0], batch)
            _check_keys("global_tokens", "flags", self.flags.shape[1], nk)
        elif self.indices.numel() and int(self.indices.max()) >= nk:
            raise ValueError(f"global_tokens: indices must be < Nk={nk}, got {self.indices.tolist()}")

    def _size_hint(self):
        return None if self.flags is None else (self.flags.shape[1], self.flags.shape[1])

    def _is_global(self, b, pos, nk):
        """Whether position ``pos`` is global; positions < 0 (queries before key 0) are not."""
        inside = pos >= 0
        pos = pos.clamp_min(0)
        if self.flags is not None:
            if nk is not None:
                _check_keys("global_tokens", "flags", self.flags.shape[1], nk)
            return self.flags.to(pos.device)[b, pos] & inside
        # Branch-free (traceable elementwise): compare with every index, O(|pos| * len(indices)).
        return (pos.unsqueeze(-1) == self.indices.to(pos.device)).any(-1) & inside

    def allows(self, b, h, q, k, *, num_keys=None):
        return self._is_global(b, q, num_keys) | self._is_global(b, k, num_keys)

    def data_tensors(self):
        return (self.flags if self.flags is not None else self.indices,)

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        check_tile_args(nq, nk, block_q, block_k)
        self.check(nq, nk, batch=batch, heads=heads)
        device = device or self.device
        pos = torch.arange(nk, device=device)
        b = torch.arange(batch if self.flags is not None else 1, device=device).view(-1, 1)
        g = self._is_global(b, pos.view(1, -1), nk)  # (B', Nk)
        gq = self._is_global(b, (torch.arange(nq, device=device) + (nk - nq)).view(1, -1), nk)  # (B', Nq)
        tq, tk = -(-nq // block_q), -(-nk // block_k)
        def pool(x, blk, t, fill, op):  # (B', N) -> (B', t)
            x = torch.nn.functional.pad(x.float(), (0, t * blk - x.shape[1]), value=fill)
            return getattr(x.view(x.shape[0], t, blk), op)(dim=-1) > 0.5
        q_any, q_all = pool(gq, block_q, tq, 0.0, "amax"), pool(gq, block_q, tq, 1.0, "amin")
        k_any, k_all = pool(g, block_k, tk, 0.0, "amax"), pool(g, block_k, tk, 1.0, "amin")
        full = q_all.unsqueeze(-1) | k_all.unsqueeze(1)
        empty = ~q_any.unsqueeze(-1) & ~k_any.unsqueeze(1)
        return _classify(full.unsqueeze(1), empty.unsqueeze(1))

    def __repr__(self):
        if self.indices is not None and self.indices.numel() <= 8:
            return f"global_tokens({self.indices.tolist()})"
        return "global_tokens(tensor)"


def global_tokens(indices: torch.Tensor) -> Mask:
    return GlobalTokens(indices)


class BigBird(Mask):
    """BigBird block pattern (Zaheer et al. 2020, ITC variant) at block granularity.

    Query block qb attends key block kb when
    - window: |qb - kb| <= window_blocks // 2 (window_blocks=3: the block and both neighbours);
    - global: qb or kb is among the first ``global_blocks`` blocks;
    - random: kb is one of ``random_blocks`` blocks drawn for (head, qb) by a counter-based hash
      of ``seed`` over all key blocks (so each head gets its own random blocks, reproducibly,
      without storing a layout). Needs ``num_keys`` to know the block count.
    """

    def __init__(self, block_size, window_blocks, global_blocks, random_blocks, seed):
        self.block_size = _pos_int("block_size", "bigbird", block_size)
        self.window_blocks = _pos_int("window_blocks", "bigbird", window_blocks)
        if window_blocks % 2 == 0:
            raise ValueError(f"bigbird: window_blocks must be odd (the block and the same number of neighbours "
                             f"on each side), got {window_blocks}")
        self.global_blocks = _pos_int("global_blocks", "bigbird", global_blocks, 0)
        self.random_blocks = _pos_int("random_blocks", "bigbird", random_blocks, 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"bigbird: seed must be an int, got {seed!r}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"bigbird: seed must be an int in [0, 2**64), got {seed!r}")
        self.seed = seed

    def allows(self, b, h, q, k, *, num_keys=None):
        if num_keys is None and self.random_blocks:
            raise ValueError("bigbird: random blocks are drawn over all key blocks; pass num_keys=Nk to allows()")
        bs = self.block_size
        qb, kb = torch.div(q, bs, rounding_mode="floor"), torch.div(k, bs, rounding_mode="floor")
        ok = (qb - kb).abs() <= self.window_blocks // 2
        ok = ok | (qb < self.global_blocks) | (kb < self.global_blocks)
        if self.random_blocks:
            nkb = -(-num_keys // bs)
            for r in range(self.random_blocks):
                ok = ok | (hash_coords(self.seed, h, qb, r) % nkb == kb)
        return ok & (q >= 0)  # a query before key 0 is in no block

    def data_tensors(self):
        return ()

    def layout(self, nk: int, *, heads: int = 1, device=None) -> torch.Tensor:
        """The pattern at block granularity: bool (H', nkb, nkb), nkb = ceil(Nk / block_size), rows
        in key coordinates; H' = heads with random blocks (drawn per head), else 1."""
        nkb = -(-nk // self.block_size)
        pos = torch.arange(nkb, device=device) * self.block_size
        h = torch.arange(heads if self.random_blocks else 1, device=device).view(-1, 1, 1)
        b = torch.zeros(1, 1, 1, dtype=torch.int64, device=device)
        return torch.broadcast_to(self.allows(b, h, pos.view(1, -1, 1), pos.view(1, 1, -1), num_keys=nk),
                                  (h.shape[0], nkb, nkb))

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        """Closed form: the block layout (O((Nk / block_size)^2) work, not O(Nq * Nk)) pooled to
        tiles like ``block_sparse``'s (which falls back to evaluating pairs when tiles do not
        align with blocks)."""
        lay = self.layout(nk, heads=heads, device=device or self.device)
        return BlockSparse(lay, self.block_size).tiles(nq, nk, block_q, block_k, batch=batch, heads=heads,
                                                       device=device)

    def __repr__(self):
        return (f"bigbird(block_size={self.block_size}, window_blocks={self.window_blocks}, "
                f"global_blocks={self.global_blocks}, random_blocks={self.random_blocks}, seed={self.seed})")


def bigbird(block_size: int = 64, window_blocks: int = 3, global_blocks: int = 1,
            random_blocks: int = 3, seed: int = 0) -> Mask:
    return BigBird(block_size, window_blocks, global_blocks, random_blocks, seed)


__all__ = ["dilated", "strided", "fixed", "block_sparse", "global_tokens", "bigbird",
           "Dilated", "Strided", "Fixed", "BlockSparse", "GlobalTokens", "BigBird"]
