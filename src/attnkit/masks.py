"""Mask specs: which (query, key) pairs may attend, as composable data.

Legend: B batch, H query heads, Nq queries, Nk keys, Tq / Tk tiles along queries / keys.

Conventions
- True = may attend.
- Positions are in *key coordinates*: query row i of Nq sits at position i + (Nk - Nq), so the
  last query lines up with the last key (bottom-right alignment). This is what a KV cache needs:
  a single decoding query is at position Nk - 1. When Nq == Nk it is the usual row index.
- ``allows(b, h, q, k)`` takes broadcastable int64 index tensors and returns a bool tensor of
  their broadcast shape; it never loops in Python. Specs that ignore b or h return a result
  without that dimension, which is how callers learn a mask does not depend on batch or head.
- ``tiles(...)`` returns an int8 map with EMPTY / PARTIAL / FULL per (block_q, block_k) tile.
  It may say PARTIAL for a tile that is in fact empty or full (kernels then do a little more
  work), but never EMPTY for a tile with an allowed pair nor FULL for one with a blocked pair.
- ``check(nq, nk, batch=, heads=)`` raises a ValueError naming the spec and the mismatch when
  data the spec carries (lengths, ids, layouts, flags) does not fit the input's sizes;
  ``attnkit.attention`` calls it once before any backend runs.
- ``allows`` is branch-free (no ``.item()``, no data-dependent Python control flow) so it can be
  traced elementwise (flex's vmap). Specs that look up per-position data by the *query*
  position (document ids, block layouts, global flags) define a query before key 0 (possible
  when Nq > Nk) as belonging to no document / layout row / global set.

Structured specs live here; data-carrying ones (padding, documents, tensors, functions) in
``attnkit.data_masks``, the sparse ones from the literature (dilated, strided, fixed,
block-sparse, global tokens, BigBird) are in ``attnkit.sparse_masks`` and re-exported below.
"""

from __future__ import annotations

import torch

from ._validate import shape_str

EMPTY, PARTIAL, FULL = 0, 1, 2


def _index_grid(batch: int, heads: int, nq: int, nk: int, device) -> tuple[torch.Tensor, ...]:
    """Index tensors b (B,1,1,1), h (1,H,1,1), q (1,1,Nq,1) in key coordinates, k (1,1,1,Nk)."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = (torch.arange(nq, device=device) + (nk - nq)).view(1, 1, -1, 1)
    k = torch.arange(nk, device=device).view(1, 1, 1, -1)
    return b, h, q, k


def gather_dense(t: torch.Tensor, nq: int, nk: int, b, h, q, k) -> torch.Tensor:
    """Read a dense (B|1, H|1, Nq|1, Nk|1) tensor at index tensors (b, h, q, k), q in key
    coordinates (shifted back to the tensor's query rows); size-1 dims broadcast."""
    bi = b if t.shape[0] > 1 else torch.zeros_like(b)
    hi = h if t.shape[1] > 1 else torch.zeros_like(h)
    qi = q - (nk - nq) if t.shape[2] > 1 else torch.zeros_like(q)
    ki = k if t.shape[3] > 1 else torch.zeros_like(k)
    return t[bi, hi, qi, ki]


class Mask:
    """Base class of mask specs. Subclasses implement ``allows``; may override ``tiles``."""

    def allows(self, b, h, q, k, *, num_keys: int | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement allows()")

    def check(self, nq: int, nk: int, *, batch: int = 1, heads: int = 1) -> None:
        """Raise a ValueError if this spec cannot describe a (batch, heads, Nq, Nk) input."""

    def _size_hint(self) -> tuple[int, int] | None:
        """(Nq, Nk) the spec's data is for (None = any size), used by ``picture``."""
        return None

    # -- composition ------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return And(_as_mask(self), _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(_as_mask(self), _as_mask(other))

    # -- dense form -------------------------------------------------------------------------
    def to_dense(self, nq: int, nk: int | None = None, *, batch: int = 1, heads: int = 1,
                 device=None) -> torch.Tensor:
        """Bool tensor of shape (batch, heads, Nq, Nk) (dims the mask ignores are broadcast)."""
        nk = nq if nk is None else nk
        b, h, q, k = _index_grid(batch, heads, nq, nk, device or self.device)
        out = self.allows(b, h, q, k, num_keys=nk)
        return torch.broadcast_to(out, (batch, heads, nq, nk))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # -- tiles ------------------------------------------------------------------------------
    def tiles(self, nq: int, nk: int, block_q: int, block_k: int, *, batch: int = 1,
              heads: int = 1, device=None) -> torch.Tensor:
        """int8 (B', H', Tq, Tk) with EMPTY/PARTIAL/FULL; B' in {1, batch}, H' in {1, heads}."""
        return evaluate_tiles(self, nq, nk, block_q, block_k, batch=batch, heads=heads, device=device)

    # -- pictures ---------------------------------------------------------------------------
    def picture(self, nq: int | None = None, nk: int | None = None, *, batch: int = 0, head: int = 0) -> str:
        """ASCII picture: one row per query, '#' = may attend, '.' = blocked.

        Default size: the length the spec's data is for (padding, document ids), else 16.
        """
        if nq is None:
            nq, nk_hint = self._size_hint() or (16, 16)
            nk = nk_hint if nk is None else nk
        dense = self.to_dense(nq, nk, batch=batch + 1, heads=head + 1)[batch, head]
        return "\n".join("".join("#" if x else "." for x in row.tolist()) for row in dense)

    def __str__(self) -> str:
        return f"{self!r}\n{self.picture()}"


def evaluate_tiles(mask: Mask, nq: int, nk: int, block_q: int, block_k: int, *, batch: int = 1,
                   heads: int = 1, device=None) -> torch.Tensor:
    """Exact tile map by evaluating ``allows`` one row of tiles at a time.

    Memory O(B * H * block_q * Nk); time O(Nq * Nk) cheap integer work. Specs with a closed
    form override ``tiles`` instead.
    """
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q and block_k must be > 0, got {block_q}, {block_k}")
    device = device or mask.device
    tq, tk = -(-nq // block_q), -(-nk // block_k)
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    k = torch.arange(tk * block_k, device=device).view(1, 1, 1, -1)
    k_valid = k < nk
    rows = []
    for t in range(tq):
        q_rows = torch.arange(t * block_q, min((t + 1) * block_q, nq), device=device)
        q = (q_rows + (nk - nq)).view(1, 1, -1, 1)
        allowed = mask.allows(b, h, q, k.clamp_max(nk - 1), num_keys=nk)
        allowed = torch.broadcast_to(allowed, torch.broadcast_shapes(allowed.shape, (1, 1, q.shape[2], k.shape[3])))
        # (B', H', bq, Tk*bk) -> (B', H', bq, Tk, bk)
        grid = allowed.reshape(*allowed.shape[:2], allowed.shape[2], tk, block_k)
        valid = k_valid.view(tk, block_k)
        any_ = (grid & valid).any(dim=-1).any(dim=2)  # (B', H', Tk)
        all_ = (grid | ~valid).all(dim=-1).all(dim=2)
        rows.append(torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8))
    return torch.stack(rows, dim=2)  # (B', H', Tq, Tk)


def _tile_bounds(nq: int, nk: int, block_q: int, block_k: int, device=None):
    """First/last query position (key coordinates) and first/last key of each tile.

    Returns q0, q1 of shape (Tq, 1) and k0, k1 of shape (1, Tk), all inclusive.
    """
    tq, tk = -(-nq // block_q), -(-nk // block_k)
    q0 = torch.arange(tq, device=device) * block_q
    q1 = torch.clamp(q0 + block_q - 1, max=nq - 1)
    k0 = torch.arange(tk, device=device) * block_k
    k1 = torch.clamp(k0 + block_k - 1, max=nk - 1)
    off = nk - nq
    return (q0 + off).view(-1, 1), (q1 + off).view(-1, 1), k0.view(1, -1), k1.view(1, -1)


def _classify(full: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    out = torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)
    while out.dim() < 4:
        out = out.unsqueeze(0)
    return out


def _check_rows(fn: str, what: str, rows: int, batch: int, shared_ok: bool = False) -> None:
    if rows != batch and not (shared_ok and rows == 1):
        hint = " (or 1 row, shared by the batch)" if shared_ok else ""
        raise ValueError(f"{fn}: {what} has {rows} rows, expected batch size B={batch}{hint}")


def _check_keys(fn: str, what: str, n: int, nk: int) -> None:
    if n != nk:
        raise ValueError(f"{fn}: {what} covers {n} keys/positions but the input has Nk={nk}")


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------


def _as_mask(m) -> Mask:
    if not isinstance(m, Mask):
        raise TypeError(f"masks compose only with other mask specs, got {type(m).__name__}")
    return m


class _Composite(Mask):
    """Two specs combined elementwise; ``parts`` holds them. Subclasses set the ops."""

    symbol = "?"
    _op = staticmethod(torch.logical_and)

    def __init__(self, a: Mask, b: Mask):
        self.parts = (a, b)

    def allows(self, b, h, q, k, *, num_keys=None):
        return self._op(*(p.allows(b, h, q, k, num_keys=num_keys) for p in self.parts))

    def check(self, nq, nk, *, batch=1, heads=1):
        for p in self.parts:
            p.check(nq, nk, batch=batch, heads=heads)

    @property
    def device(self):
        return self.parts[0].device

    def _size_hint(self):
        return self.parts[0]._size_hint() or self.parts[1]._size_hint()

    def __repr__(self):
        return f"({self.parts[0]!r} {self.symbol} {self.parts[1]!r})"


class And(_Composite):
    symbol = "&"
    _op = staticmethod(torch.logical_and)

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        x, y = (p.tiles(nq, nk, block_q, block_k, batch=batch, heads=heads, device=device) for p in self.parts)
        return torch.minimum(x, y)  # EMPTY if either is empty; FULL only if both are full


class Or(_Composite):
    symbol = "|"
    _op = staticmethod(torch.logical_or)

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        x, y = (p.tiles(nq, nk, block_q, block_k, batch=batch, heads=heads, device=device) for p in self.parts)
        return torch.maximum(x, y)  # FULL if either is full; EMPTY only if both are empty


# ---------------------------------------------------------------------------------------------
# Positional bands: causal, sliding window, prefix LM
# ---------------------------------------------------------------------------------------------


class Band(Mask):
    """Keys at offset k - q in [lo, hi] (either end may be None = unbounded)."""

    def __init__(self, lo: int | None, hi: int | None, name: str):
        self.lo, self.hi, self.name = lo, hi, name

    def allows(self, b, h, q, k, *, num_keys=None):
        d = k - q
        out = torch.ones_like(d, dtype=torch.bool)
        if self.lo is not None:
            out = out & (d >= self.lo)
        if self.hi is not None:
            out = out & (d <= self.hi)
        return out

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        q0, q1, k0, k1 = _tile_bounds(nq, nk, block_q, block_k, device)
        dmin, dmax = k0 - q1, k1 - q0
        full = torch.ones_like(dmin, dtype=torch.bool)
        empty = torch.zeros_like(dmin, dtype=torch.bool)
        if self.lo is not None:
            full &= dmin >= self.lo
            empty |= dmax < self.lo
        if self.hi is not None:
            full &= dmax <= self.hi
            empty |= dmin > self.hi
        return _classify(full, empty)

    def __repr__(self):
        return self.name


def causal() -> Mask:
    """Query at position i attends keys j <= i (bottom-right aligned when Nq != Nk)."""
    return Band(None, 0, "causal()")


def sliding_window(left: int, right: int = 0) -> Mask:
    """Keys j with i - left <= j <= i + right. right=0 is a causal sliding window.

    Mistral-style window W (including the query itself) is ``sliding_window(W - 1)``.
    """
    for name, val in (("left", left), ("right", right)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"sliding_window: {name} must be an int >= 0, got {val!r}")
    return Band(-left, right, f"sliding_window({left}, {right})")


class PrefixLM(Mask):
    """Bidirectional over the first ``prefix_len`` keys, causal after (T5/UniLM prefix LM)."""

    def __init__(self, prefix_len):
        if isinstance(prefix_len, torch.Tensor):
            if prefix_len.dim() != 1 or prefix_len.dtype in (torch.bool,) or prefix_len.is_floating_point():
                raise ValueError(f"prefix_lm: prefix_len tensor must be 1-D integer (B,), got {prefix_len.dtype} {shape_str(prefix_len)}")
            if (prefix_len < 0).any():
                raise ValueError(f"prefix_lm: prefix_len must be >= 0, got {prefix_len.tolist()}")
            self.prefix = prefix_len.to(torch.int64)
        elif isinstance(prefix_len, int) and not isinstance(prefix_len, bool) and prefix_len >= 0:
            self.prefix = prefix_len
        else:
            raise ValueError(f"prefix_lm: prefix_len must be an int >= 0 or a (B,) int tensor, got {prefix_len!r}")

    def _prefix(self, b):
        if isinstance(self.prefix, int):
            return self.prefix
        return self.prefix.to(b.device)[b]

    def allows(self, b, h, q, k, *, num_keys=None):
        return (k <= q) | (k < self._prefix(b))

    @property
    def device(self):
        return self.prefix.device if isinstance(self.prefix, torch.Tensor) else torch.device("cpu")

    def check(self, nq, nk, *, batch=1, heads=1):
        if isinstance(self.prefix, torch.Tensor) and self.prefix.shape[0] != batch:
            raise ValueError(f"prefix_lm: prefix_len has {self.prefix.shape[0]} entries, expected batch size B={batch}")

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        self.check(nq, nk, batch=batch, heads=heads)
        q0, q1, k0, k1 = _tile_bounds(nq, nk, block_q, block_k, device)
        if isinstance(self.prefix, int):
            p = self.prefix
        else:
            p = self.prefix.to(q0.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        full = (k1 <= q0) | (k1 < p)
        empty = (k0 > q1) & (k0 >= p)
        return _classify(full, empty)

    def __repr__(self):
        p = self.prefix if isinstance(self.prefix, int) else f"tensor{tuple(self.prefix.shape)}"
        return f"prefix_lm({p})"


def prefix_lm(prefix_len) -> Mask:
    return PrefixLM(prefix_len)


from .data_masks import (  # noqa: E402  (they subclass Mask, defined above)
    Document,
    FunctionMask,
    KeyPadding,
    KeyValid,
    TensorMask,
    document,
    from_function,
    key_padding,
    key_padding_from_bool,
)
from .sparse_masks import (  # noqa: E402
    bigbird,
    block_sparse,
    dilated,
    fixed,
    global_tokens,
    strided,
)

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "causal", "sliding_window", "prefix_lm", "key_padding",
    "key_padding_from_bool", "document", "from_function", "dilated", "strided", "fixed",
    "block_sparse", "global_tokens", "bigbird", "evaluate_tiles",
    "Band", "PrefixLM", "And", "Or", "KeyPadding", "KeyValid", "Document", "TensorMask", "FunctionMask",
]
