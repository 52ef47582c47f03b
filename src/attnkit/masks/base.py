"""Mask specs: which (query, key) pairs may attend, as composable data. The protocol.

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
- Structure: a spec answers, about itself, the questions kernels, caches and variants ask
  (``is_causal``, ``window``, ``translation_invariant``, ``key_only``, ``conjuncts()``,
  ``batch_size``), so no consumer needs to know the spec's class.

The package: ``base`` (this protocol, composition, tile evaluation), ``bands`` (causal, sliding
windows, prefix LM), ``data`` (padding, documents, tensors, functions), ``sparse`` (patterns
from the literature), ``tiles`` (the one tile planner every tiled kernel uses).
"""

from __future__ import annotations

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


def index_grid(batch: int, heads: int, nq: int, nk: int, device) -> tuple[torch.Tensor, ...]:
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
    """Base class of mask specs. Subclasses implement ``allows``; may override ``tiles``.

    Structural properties (override where the answer is True / known; the defaults are the
    safe answers for a spec that says nothing about itself):
    - ``is_causal``: never lets query position i see a key j > i.
    - ``window``: how many keys before the query's own position it may reach (None: unbounded).
    - ``translation_invariant``: ``allows`` depends only on k - q (so it survives re-indexing,
      e.g. in a sliding-window ring buffer, and one tile pattern serves every diagonal).
    - ``key_only``: ``allows`` depends only on (b, h, k), not on the query (key padding).
    - ``batch_size`` / ``num_heads``: the batch / head count its data is for (None: any).
    - ``data_tensors()``: the tensors ``allows`` reads (lengths, ids, layouts), so a consumer
      that caches something derived from the spec (flex's block masks) can tell when they were
      edited in place; None when the spec cannot list them (a function, a user subclass), and
      then nothing derived from it may be cached.
    """

    is_causal: bool = False
    window: int | None = None
    translation_invariant: bool = False
    key_only: bool = False
    batch_size: int | None = None
    num_heads: int | None = None
    dense_tensor: torch.Tensor | None = None  # the tensor of a wrapped bool tensor (TensorMask)

    def allows(self, b, h, q, k, *, num_keys: int | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement allows()")

    def check(self, nq: int, nk: int, *, batch: int = 1, heads: int = 1) -> None:
        """Raise a ValueError if this spec cannot describe a (batch, heads, Nq, Nk) input."""

    def conjuncts(self) -> tuple[Mask, ...]:
        """The specs whose ``&`` this is (itself for anything but ``&``)."""
        return (self,)

    def data_tensors(self) -> tuple[torch.Tensor, ...] | None:
        """The tensors ``allows`` reads; () for a spec defined by its constructor's numbers alone;
        None (the default, for specs that do not say) when unknown."""
        return None

    def _size_hint(self) -> tuple[int, int] | None:
        """(Nq, Nk) the spec's data is for (None = any size), used by ``picture``."""
        return None

    # -- composition ------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return And(_as_mask(self), _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(_as_mask(self), _as_mask(other))

    # -- dense form -------------------------------------------------------------------------
    def to_dense(self, nq: int, nk: int | None = None, *, batch: int | None = None, heads: int | None = None,
                 device=None) -> torch.Tensor:
        """Bool tensor of shape (batch, heads, Nq, Nk).

        batch / heads default to the sizes the spec's data is for (``batch_size`` /
        ``num_heads``, else 1), so a data spec is never silently cut to its first row.
        """
        nq, nk = _check_sizes("to_dense", nq, nq if nk is None else nk)
        batch = (self.batch_size or 1) if batch is None else batch
        heads = (self.num_heads or 1) if heads is None else heads
        self.check(nq, nk, batch=batch, heads=heads)
        b, h, q, k = index_grid(batch, heads, nq, nk, device or self.device)
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
        nbatch = max(batch + 1, self.batch_size or 1)
        nheads = max(head + 1, self.num_heads or 1)
        dense = self.to_dense(nq, nk, batch=nbatch, heads=nheads)[batch, head]
        return "\n".join("".join("#" if x else "." for x in row.tolist()) for row in dense)

    def __str__(self) -> str:
        return f"{self!r}\n{self.picture()}"


def _check_sizes(fn: str, nq, nk) -> tuple[int, int]:
    for name, n in (("nq", nq), ("nk", nk)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{fn}: {name} must be an int >= 0, got {n!r}")
    return nq, nk


def evaluate_tiles(mask: Mask, nq: int, nk: int, block_q: int, block_k: int, *, batch: int = 1,
                   heads: int = 1, device=None) -> torch.Tensor:
    """Exact tile map by evaluating ``allows`` one row of tiles at a time.

    Memory O(B * H * block_q * Nk); time O(Nq * Nk) cheap integer work. Specs with a closed
    form override ``tiles`` instead.
    """
    check_tile_args(nq, nk, block_q, block_k)
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


def check_tile_args(nq, nk, block_q, block_k) -> None:
    """Sizes >= 0 and tile sizes >= 1, as ints (a clear error instead of a ZeroDivisionError)."""
    _check_sizes("tiles", nq, nk)
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tiles: {name} must be an int >= 1, got {n!r}")


def _tile_bounds(nq: int, nk: int, block_q: int, block_k: int, device=None):
    """First/last query position (key coordinates) and first/last key of each tile.

    Returns q0, q1 of shape (Tq, 1) and k0, k1 of shape (1, Tk), all inclusive.
    """
    check_tile_args(nq, nk, block_q, block_k)
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

    def data_tensors(self):
        parts = [p.data_tensors() for p in self.parts]
        return None if any(d is None for d in parts) else tuple(t for d in parts for t in d)

    @property
    def device(self):
        return self.parts[0].device

    def _size_hint(self):
        return self.parts[0]._size_hint() or self.parts[1]._size_hint()

    @property
    def translation_invariant(self) -> bool:
        return all(p.translation_invariant for p in self.parts)

    @property
    def key_only(self) -> bool:
        return all(p.key_only for p in self.parts)

    @property
    def batch_size(self) -> int | None:
        return max((p.batch_size or 0) for p in self.parts) or None

    @property
    def num_heads(self) -> int | None:
        return max((p.num_heads or 0) for p in self.parts) or None

    def __repr__(self):
        return f"({self.parts[0]!r} {self.symbol} {self.parts[1]!r})"


class And(_Composite):
    symbol = "&"
    _op = staticmethod(torch.logical_and)

    @property
    def is_causal(self) -> bool:
        return any(p.is_causal for p in self.parts)

    @property
    def window(self) -> int | None:
        ws = [p.window for p in self.parts if p.window is not None]
        return min(ws) if ws else None

    def conjuncts(self) -> tuple[Mask, ...]:
        return tuple(c for p in self.parts for c in p.conjuncts())

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        x, y = (p.tiles(nq, nk, block_q, block_k, batch=batch, heads=heads, device=device) for p in self.parts)
        return torch.minimum(x, y)  # EMPTY if either is empty; FULL only if both are full


class Or(_Composite):
    symbol = "|"
    _op = staticmethod(torch.logical_or)

    @property
    def is_causal(self) -> bool:
        return all(p.is_causal for p in self.parts)

    @property
    def window(self) -> int | None:
        ws = [p.window for p in self.parts]
        return None if any(w is None for w in ws) else max(ws)

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        x, y = (p.tiles(nq, nk, block_q, block_k, batch=batch, heads=heads, device=device) for p in self.parts)
        return torch.maximum(x, y)  # FULL if either is full; EMPTY only if both are empty


