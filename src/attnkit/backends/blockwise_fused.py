"""Fused tile body of the blockwise backend: torch's CPU flash-attention kernel on rectangles.

Legend: B batch, Hq query heads, Hk key/value heads (G = Hq // Hk), Nq queries, Nk keys, D head
dim (= Dv here), R rows of a rectangle, L its keys, bw rows of one window block, nb blocks.

The blockwise planner decides *which* (query, key) rectangles hold allowed pairs; this module
runs each rectangle through ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the kernel
behind ``F.scaled_dot_product_attention`` on CPU, which returns the log-sum-exp) and its
backward (which takes an external output and log-sum-exp, FlashAttention-2 style), and merges
the rectangles of a query row by log-sum-exp. The kernel does the matmuls, the softmax and the
masking per cache-sized block in C++: no Python per tile, no score tensor in memory.

Work items:
- ``Rect(r0, r1, k0, k1, causal, masked)``: query rows r0..r1-1 against keys k0..k1-1. ``causal``
  uses the kernel's top-left causal flag (a square on the mask's diagonal: no mask tensor);
  ``masked`` evaluates the mask spec on the rectangle as a float 0 / -inf tensor. Bias specs
  are evaluated on the rectangle and added to that tensor. ``strip``: the tensor is a view of the
  call's ``Strip`` (translation-invariant biases). ``linear``: every pair allowed and the biases
  linear in the offset (causal ALiBi): a (1, Hq, 1, L) key row, the log-sum-exp shifted per query.
- ``Windows(t0, t1, bw, lo, hi)``: a band mask (keys k - q in [lo, hi]) on regular query blocks
  t0..t1-1 of bw rows: block t reads the L = bw + hi - lo keys from t * bw + (Nk - Nq) + lo, an
  overlapping strided view of K and V (no copy), all blocks in one kernel call with one cached
  (G*bw, L) pattern. The computed keys per query are L instead of the 1.5 * 128-ish of 128-key
  tiles; rows at the sequence ends are ``Rect`` items.

Used when the call runs on CPU with no softcap, no dropout and equal q / v head dims, in the
compute dtype (float32 for half inputs); the backward also needs no gradient for bias tensors.
Everything else runs the PyTorch tile math of ``blockwise_tiles``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..masks import EMPTY, FULL, Band, Document

NEG_INF = float("-inf")
_OPS = torch.ops.aten
_FWD = getattr(_OPS, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(_OPS, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
KERNEL_DTYPES = (torch.float32, torch.float64)


def kernel_reasons(q, v, softcap, dropout_p) -> list[str]:
    """Why the fused kernel cannot run a call (empty: it can)."""
    reasons = []
    if _FWD is None or _BWD is None:
        reasons.append("this torch has no CPU flash-attention kernel")
    if q.device.type != "cpu":
        reasons.append(f"the fused tile body is CPU only (q on {q.device})")
    if softcap is not None:
        reasons.append("softcap")
    if dropout_p > 0:
        reasons.append("dropout")
    if q.shape[-1] != v.shape[-1]:
        reasons.append(f"q head dim {q.shape[-1]} != v head dim {v.shape[-1]}")
    return reasons


@dataclass(frozen=True)
class Rect:
    r0: int
    r1: int
    k0: int
    k1: int
    causal: bool = False  # top-left causal on the rectangle (kernel flag)
    masked: tuple = ()  # key ranges (a, b) where the mask spec must be evaluated (its PARTIAL tiles)
    all_partial: bool = False  # no FULL tile: a row may have no allowed key here
    strip: bool = False  # the mask is a view of the call's Strip (bias + band pattern)
    linear: bool = False  # every allowed pair, biases linear in the offset: a key row (see _linear_mask)


@dataclass(frozen=True)
class Strip:
    """Translation-invariant biases (``Bias.relative``) under a band mask (or none): one tensor
    S (1, Hq, rows, width) with S[h, r, u] = bias(h, d) (-inf outside the band), d = u - r - u0,
    is evaluated once per pass; the mask of a strip Rect of <= rows rows starting at query
    position q0 over keys k0.. is the view S[:, :, :R, k0 - q0 + u0:][..., :L]: no per-item work."""

    rows: int
    u0: int
    width: int


@dataclass(frozen=True)
class Docs:
    """n documents of equal geometry in one kernel call: document i reads query rows
    r0 + i*step .. + R - 1 and keys k0 + i*step .. + L - 1 (strided views of Q/K/V/out, the
    documents along the kernel's batch dim, B*H along its heads: no copy); a query at local row
    a sees local keys c' <= a + c (``_causal_like(R, L, c)``: one causal square or full
    rectangle, or a full and a causal one)."""

    r0: int
    k0: int
    step: int
    n: int
    R: int
    L: int
    c: int


@dataclass(frozen=True)
class Windows:
    t0: int
    t1: int
    bw: int
    lo: int
    hi: int


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def plan_items(g, st: torch.Tensor | None, *, mask_elements: int, window_rows: int) -> tuple:
    """Work items for geometry ``g`` (``blockwise_tiles.Geometry``).

    st: (Tq, Tk) tile status at (g.bq, g.bk) without key-padding marks (None: not needed).
    Plain band masks without bias get closed forms (causal-like: two rectangles; finite bands:
    windows); everything else follows the tile map, one rectangle per run of equal status.
    """
    Nq, Nk, off = g.Nq, g.Nk, g.Nk - g.Nq
    m = g.mask
    if g.bias_parts and all(p.linear_in_offset for p in g.bias_parts) and type(m) is Band and m.lo is None \
            and m.hi is not None:
        items = _causal_like_linear(g, m.hi, mask_elements)
        if items is not None:
            return items
    if g.bias_parts and all(p.translation_invariant for p in g.bias_parts) and (m is None or type(m) is Band):
        items = _strip_items(g, m, mask_elements)
        if items is not None:
            return items
    if g.bias_parts and type(m) is Band and m.lo is None and m.hi is not None:
        items = _causal_like_banded(g, off + m.hi, mask_elements)
        if items is not None:
            return items
    if not g.bias_parts:
        if m is None:
            return (Rect(0, Nq, 0, Nk),)
        if type(m) is Band:
            if m.lo is not None and m.hi is not None and m.lo > m.hi:
                return ()
            if m.lo is None and m.hi is not None:
                return _causal_like(Nq, Nk, off + m.hi)
            if m.lo is not None and m.hi is not None and m.hi - m.lo + 1 <= Nk // 2:
                return _windows(g, m.lo, m.hi, window_rows)
        items = _document_items(g)
        if items is not None:
            return items
    return _from_tiles(g, st, mask_elements)


def _document_ranges(g):
    """(key ranges (a, b) of the documents, band hi or None) when the mask is a ``Document`` (one
    ids row for the whole batch, each id one contiguous run) ``&`` bands without a lower end
    (causal and the like); else None."""
    parts = g.mask.conjuncts()
    docs = [p for p in parts if type(p) is Document]
    bands = [p for p in parts if type(p) is Band]
    if len(docs) != 1 or len(docs) + len(bands) != len(parts) or any(b.lo is not None for b in bands):
        return None
    ids = docs[0].ids
    if ids.shape[1] != g.Nk or (ids.shape[0] > 1 and not bool((ids == ids[:1]).all())):
        return None
    vals, counts = torch.unique_consecutive(ids[0], return_counts=True)
    if len(torch.unique(vals)) != len(vals):
        return None  # an id in two runs: its pieces see each other
    ends = torch.cumsum(counts, 0).tolist()
    his = [b.hi for b in bands if b.hi is not None]
    return list(zip([0] + ends[:-1], ends)), (min(his) if his else None)


def _document_items(g):
    """One causal (or full) square per document, documents of equal geometry batched into one
    ``Docs`` call per arithmetic run of starts: the work is sum(doc_len^2) / 2, not 128-tiles.
    None when the mask is not such a document mask, or the documents are so many and so varied
    that there would be more calls than query tiles (the tile plan is cheaper then)."""
    found = _document_ranges(g)
    if found is None:
        return None
    ranges, hi = found
    off = g.Nk - g.Nq
    groups = {}
    for a, b in ranges:
        pa = max(a, off)  # first query position in this document
        if pa >= b:
            continue
        R, L = b - pa, b - a
        c = L - 1 if hi is None else min(L - 1, pa - a + hi)
        groups.setdefault((R, L, c, pa - off - a), []).append(a)
    items = []
    for (R, L, c, dr), starts in groups.items():
        i = 0
        while i < len(starts):
            step = starts[i + 1] - starts[i] if i + 1 < len(starts) else 0
            n = 1
            while i + n < len(starts) and starts[i + n] - starts[i + n - 1] == step:
                n += 1
            items.append(Docs(starts[i] + dr, starts[i], step if n > 1 else 0, n, R, L, c))
            i += n
    return tuple(items) if len(items) <= max(16, g.Tq) else None


def _strip_items(g, band, mask_elements: int):
    """One strip Rect per block of query rows (its whole band of keys), or None when the strip
    would exceed ``mask_elements`` even with 16-row blocks."""
    Nq, Nk, off = g.Nq, g.Nk, g.Nk - g.Nq
    lo = None if band is None else band.lo
    hi = None if band is None else band.hi
    if lo is not None and hi is not None and lo > hi:
        return ()
    rows = g.bq
    while rows >= 16:
        spans = []
        for r0 in range(0, Nq, rows):
            r1 = min(Nq, r0 + rows)
            k0 = 0 if lo is None else max(0, r0 + off + lo)
            k1 = Nk if hi is None else min(Nk, r1 - 1 + off + hi + 1)
            if k1 > k0:
                spans.append((r0, r1, k0, k1))
        if not spans:
            return ()
        u0 = max(r0 + off - k0 for r0, _, k0, _ in spans)
        width = u0 + max(k1 - (r0 + off) for r0, _, _, k1 in spans)
        if g.Hq * rows * width <= mask_elements:
            return (Strip(rows, u0, width),) + tuple(Rect(*sp, strip=True) for sp in spans)
        rows //= 2
    return None


def _bias_extent(g) -> int:
    """B' * H' of the bias parts' values (1 where a part ignores batch / head), by one probe."""
    z = torch.zeros(1, 1, 1, 1, dtype=torch.int64)
    b, h = torch.arange(g.B).view(-1, 1, 1, 1), torch.arange(g.Hq).view(1, -1, 1, 1)
    n = 1
    for part in g.bias_parts:
        shape = _as4d(part(b, h, z + (g.Nk - 1), z)).shape
        n = max(n, shape[0] * shape[1])
    return n


def _causal_like_banded(g, c: int, mask_elements: int, rows: int | None = None):
    """Causal-like band (row i attends keys j <= i + c) with a bias: bands of rows, each a full
    rectangle and a top-left causal one (the kernel's causal flag together with the bias tensor),
    as tall as the bias tensor's budget allows (None below 16 rows), or ``rows`` tall."""
    Nq, Nk = g.Nq, g.Nk
    if rows is None:
        ext, rows = _bias_extent(g), BACKWARD_ROWS
        while rows > 16 and ext * rows * Nk > mask_elements:
            rows //= 2
        if ext * rows * Nk > mask_elements:
            return None
    items = []
    for r0 in range(0, Nq, rows):
        r1 = min(Nq, r0 + rows)
        if r1 - 1 + c < 0:
            continue  # no row of this band has a key
        if r0 + c >= Nk:
            items.append(Rect(r0, r1, 0, Nk))
            continue
        if r0 + c > 0:
            items.append(Rect(r0, r1, 0, r0 + c))
        rr0 = max(r0, -c)
        items.append(Rect(rr0, r1, max(0, r0 + c), min(Nk, r1 + c), causal=True))
    return tuple(items)


def _causal_like_linear(g, hi: int, mask_elements: int):
    """Causal-like band (keys k - q <= hi) with biases linear in the offset (causal ALiBi): the
    items of ``_causal_like_banded`` in BACKWARD_ROWS-row bands, fit for the backward as they are.
    Full rectangles get a (1, Hq, 1, L) key row (``linear``); every causal square reads the same
    top-left corner of one Strip (its offsets are those of the first band's square)."""
    rows, u0 = BACKWARD_ROWS, max(0, -hi)
    while rows > 16 and g.Hq * rows * (rows + hi + u0) > mask_elements:
        rows //= 2
    if g.Hq * rows * (rows + hi + u0) > mask_elements:
        return None
    items = _causal_like_banded(g, (g.Nk - g.Nq) + hi, mask_elements, rows=rows)
    if not items:
        return ()
    return (Strip(rows, u0, rows + hi + u0),) + tuple(
        replace(it, strip=True) if it.causal else replace(it, linear=True) for it in items)


def _causal_like(Nq: int, Nk: int, c: int) -> tuple:
    """Row i attends keys j <= i + c: a full rectangle and a top-left causal one."""
    if c >= Nk - 1:
        return (Rect(0, Nq, 0, Nk),)
    if c >= 0:
        return ((Rect(0, Nq, 0, c),) if c > 0 else ()) + (Rect(0, Nq, c, Nk, causal=True),)
    return (Rect(-c, Nq, 0, Nk, causal=True),) if -c < Nq else ()


def _windows(g, lo: int, hi: int, window_rows: int, bw: int | None = None) -> tuple:
    Nq, Nk, off = g.Nq, g.Nk, g.Nk - g.Nq
    w = hi - lo + 1
    if bw is None:
        bw = 1
        while bw * 2 <= max(1, w // 8) and bw * 2 <= window_rows:
            bw *= 2
    # block t is regular when its rows are real and all its keys [t*bw+off+lo, t*bw+bw-1+off+hi] exist
    t_lo = -(-max(0, -(off + lo)) // bw)
    t_hi = min(Nq // bw, (Nk - bw - off - hi) // bw + 1) if Nk - bw - off - hi >= 0 else 0
    items = []
    if t_hi > t_lo:
        items.append(Windows(t_lo, t_hi, bw, lo, hi))
        edges = ((0, t_lo * bw), (t_hi * bw, Nq))
    else:
        edges = ((0, Nq),)
    for a, b in edges:
        for r0 in range(a, b, max(bw, 128)):
            r1 = min(b, r0 + max(bw, 128))
            k0, k1 = max(0, r0 + off + lo), min(Nk, r1 - 1 + off + hi + 1)
            if k1 > k0:
                items.append(Rect(r0, r1, k0, k1, masked=((k0, k1),), all_partial=True))
    return tuple(items)


def _from_tiles(g, st: torch.Tensor, mask_elements: int) -> tuple:
    """Per query block, each contiguous span of non-empty tiles is one rectangle; the mask is
    evaluated on its PARTIAL tiles only (and a bias on the whole span); a span is split only
    where its mask tensor would exceed ``mask_elements``. Identical spans of consecutive blocks
    become one taller rectangle. One kernel call per span and no merge in the common case."""
    bq, bk, Nq, Nk = g.bq, g.bk, g.Nq, g.Nk
    heads = g.B * g.Hq if g.bias_parts else 1
    max_keys = max(bk, (mask_elements // max(1, heads * bq)) // bk * bk)
    items, open_ = [], {}
    for t, row in enumerate(st.tolist()):
        runs, j, Tk = [], 0, len(row)
        while j < Tk:
            if row[j] == EMPTY:
                j += 1
                continue
            j0, parts, full = j, [], False
            while j < Tk and row[j] != EMPTY and (j - j0 + 1) * bk <= max_keys:
                if row[j] == FULL:
                    full = True
                elif parts and parts[-1][1] == j * bk:
                    parts[-1] = (parts[-1][0], min(Nk, (j + 1) * bk))
                else:
                    parts.append((j * bk, min(Nk, (j + 1) * bk)))
                j += 1
            runs.append((j0 * bk, min(Nk, j * bk), tuple(parts), not full))
        r = t * bq
        for key in [key for key in open_ if key not in runs]:
            items.append(Rect(open_.pop(key), r, key[0], key[1], masked=key[2], all_partial=key[3]))
        for key in runs:
            r0 = open_.get(key)
            tensor = key[2] or g.bias_parts
            if r0 is not None and tensor and (r + bq - r0) * (key[1] - key[0]) * heads > mask_elements:
                items.append(Rect(r0, r, key[0], key[1], masked=key[2], all_partial=key[3]))
                r0 = None
            if r0 is None:
                open_[key] = r
    for key, r0 in open_.items():
        items.append(Rect(r0, Nq, key[0], key[1], masked=key[2], all_partial=key[3]))
    return tuple(items)


# ---------------------------------------------------------------------------------------------
# Masks of an item
# ---------------------------------------------------------------------------------------------


def _rect_mask(g, it: Rect, device):
    """(float additive mask broadcastable to (B, Hq, R, L) or None, rows-with-a-key bool or None).

    The bias parts are evaluated on the whole rectangle, the mask spec only on ``it.masked``
    ranges (-inf where it blocks); rows are checked for an allowed key only where they can lack
    one (no FULL tile, or a bias tensor holding -inf)."""
    mask = g.mask if it.masked else None
    if mask is None and not g.bias_parts:
        return None, None
    b = torch.arange(g.B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(g.Hq, device=device).view(1, -1, 1, 1)
    q = (torch.arange(it.r0, it.r1, device=device) + (g.Nk - g.Nq)).view(1, 1, -1, 1)
    R, L = it.r1 - it.r0, it.k1 - it.k0
    blocked = []
    if mask is not None:
        for a, c in it.masked:
            k = torch.arange(a, c, device=device).view(1, 1, 1, -1)
            blocked.append((a - it.k0, c - it.k0, ~_as4d(mask.allows(b, h, q, k, num_keys=g.Nk))))
    add, owned = None, False
    k = torch.arange(it.k0, it.k1, device=device).view(1, 1, 1, -1)
    for part in g.bias_parts:
        val = _as4d(part(b, h, q, k).detach().to(g.dtype))
        if add is None:  # a fresh result of the spec's arithmetic may be written into below
            add = val
            owned = val._base is None and all(val.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                                              for t in part.tensors())
        else:
            add, owned = add + val, True
    shape = [1, 1, R, L]
    for x in ([add] if add is not None else []) + [m for _, _, m in blocked]:
        shape[0], shape[1] = max(shape[0], x.shape[0]), max(shape[1], x.shape[1])
    if add is None:
        add = torch.zeros(shape, dtype=g.dtype, device=device)
    elif blocked and (list(add.shape) != shape or not owned):
        add = add.expand(shape).clone()
    for a, c, m in blocked:
        add[:, :, :, a:c].masked_fill_(m, NEG_INF)
    check = it.all_partial or any(p.dense_tensor is not None for p in g.bias_parts)  # a tensor may hold -inf
    return add, ((add != NEG_INF).any(dim=-1) if check else None)


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _as4d(x: torch.Tensor) -> torch.Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


def _window_pattern(g, it: Windows, device) -> torch.Tensor:
    """(1, 1, G*bw, L) float 0 / -inf: local row a, local key c allowed iff 0 <= c - a <= hi - lo."""
    L = it.bw + it.hi - it.lo
    a = torch.arange(it.bw, device=device).repeat(g.G).view(-1, 1)
    c = torch.arange(L, device=device).view(1, -1)
    d = c - a
    blocked = (d < 0) | (d > it.hi - it.lo)
    return torch.zeros(blocked.shape, dtype=g.dtype, device=device).masked_fill_(blocked, NEG_INF).view(1, 1, -1, L)


def _window_views(g, it: Windows, kc, vc, t0: int, t1: int):
    """Overlapping (B*Hk, nb, L, D) views of contiguous K/V for window blocks t0..t1-1."""
    L, nb = it.bw + it.hi - it.lo, t1 - t0
    start = t0 * it.bw + (g.Nk - g.Nq) + it.lo
    views = []
    for x in (kc, vc):
        X = x.shape[-1]
        views.append(x.as_strided((g.B * g.Hk, nb, L, X), (g.Nk * X, it.bw * X, X, 1),
                                  x.storage_offset() + start * X))
    return views


def _block_rows(x: torch.Tensor, g, bw: int, t0: int, t1: int) -> torch.Tensor:
    """Rows of blocks t0..t1-1 of x (B, Hq, Nq, X) as (B*Hk, nb, G*bw, X) (the G heads of a kv
    head stacked along rows). A view when G == 1."""
    nb, X = t1 - t0, x.shape[-1]
    part = x[:, :, t0 * bw:t1 * bw]  # (B, Hq, nb*bw, X)
    if g.G == 1:
        return part.reshape(g.B * g.Hk, nb, bw, X)
    part = part.reshape(g.B, g.Hk, g.G, nb, bw, X).permute(0, 1, 3, 2, 4, 5)  # (B, Hk, nb, G, bw, X)
    return part.reshape(g.B * g.Hk, nb, g.G * bw, X)


def _unblock_rows(y: torch.Tensor, g, bw: int) -> torch.Tensor:
    """Inverse of _block_rows: (B*Hk, nb, G*bw, X) -> (B, Hq, nb*bw, X)."""
    nb, X = y.shape[1], y.shape[-1]
    y = y.reshape(g.B, g.Hk, nb, g.G, bw, X).permute(0, 1, 3, 2, 4, 5)  # (B, Hk, G, nb, bw, X)
    return y.reshape(g.B, g.Hq, nb * bw, X)


# ---------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------


def _merge(out, lse, seen, r0, r1, o, s):
    """Fold a partial result (o (B, Hq, R, D), s (B, Hq, R)) into rows r0..r1-1 of out / lse
    (uninitialised where ``seen`` is False: the first result of a row is copied)."""
    prev = seen[r0:r1]
    if not prev.any():
        out[:, :, r0:r1] = o
        lse[:, :, r0:r1] = s
        seen[r0:r1] = True
        return
    if not prev.all():
        fresh = (~prev).nonzero().squeeze(1) + r0
        out[:, :, fresh] = 0
        lse[:, :, fresh] = NEG_INF
    seen[r0:r1] = True
    _fold(out[:, :, r0:r1], lse[:, :, r0:r1], o, s)


def _fold(o0, s0, o, s):
    """o0 / s0 (views of out / lse) <- the log-sum-exp merge of (o0, s0) and (o, s), in place."""
    m = torch.maximum(s0, s)
    m = torch.where(m == NEG_INF, torch.zeros_like(m), m)
    a, b = torch.exp(s0 - m), torch.exp(s - m)
    tot = a + b
    safe = torch.where(tot == 0, torch.ones_like(tot), tot)
    o0.mul_((a / safe).unsqueeze(-1)).add_(o * (b / safe).unsqueeze(-1))
    s0.copy_(m + torch.log(tot))


def _strip_tensor(g, sp: Strip, device) -> torch.Tensor:
    """(1, Hq, rows, width): the biases at offset d = u - r - u0, -inf where the band blocks d."""
    d = torch.arange(sp.width, device=device).view(1, -1) - torch.arange(sp.rows, device=device).view(-1, 1) - sp.u0
    h = torch.arange(g.Hq, device=device).view(-1, 1, 1)
    val = None
    for part in g.bias_parts:
        x = part.relative(h, d.unsqueeze(0)).detach().to(g.dtype)
        val = x if val is None else val + x
    val = val.expand(g.Hq, sp.rows, sp.width).contiguous()
    m = g.mask
    if m is not None:
        blocked = torch.zeros_like(d, dtype=torch.bool)
        if m.lo is not None:
            blocked |= d < m.lo
        if m.hi is not None:
            blocked |= d > m.hi
        val.masked_fill_(blocked, NEG_INF)
    return val.unsqueeze(0)


def _strip_mask(g, sp: Strip, S: torch.Tensor, it: Rect):
    """The Rect's mask view of S and its rows-with-a-key (None when every row has one)."""
    q0 = it.r0 + g.Nk - g.Nq
    u = it.k0 - q0 + sp.u0
    view = S[:, :, :it.r1 - it.r0, u:u + it.k1 - it.k0]
    m = g.mask
    if m is None:
        return view, None
    p = torch.arange(it.r0, it.r1, device=S.device) + (g.Nk - g.Nq)  # row positions
    first = p + m.lo if m.lo is not None else torch.zeros_like(p)
    last = p + m.hi if m.hi is not None else torch.full_like(p, g.Nk - 1)
    ok = last.clamp(max=min(g.Nk, it.k1) - 1) >= first.clamp(min=it.k0)
    return view, (None if bool(ok.all()) else ok.view(1, 1, -1))


def _linear_mask(g, it: Rect, device):
    """(key row (1, Hq, 1, L), row shift (1, Hq, R)) of a ``linear`` Rect: with q0 its first query
    position, bias(h, q, k) = relative(h, k - q0) - relative(h, q - q0); the kernel adds the key
    row, so its log-sum-exp is the true one plus the row shift. Both are small near q0, where
    this rectangle's weights matter (it holds keys left of its rows), so nothing large cancels."""
    q0 = it.r0 + g.Nk - g.Nq
    h = torch.arange(g.Hq, device=device).view(-1, 1)
    row = shift = None
    for part in g.bias_parts:
        x = part.relative(h, torch.arange(it.k0 - q0, it.k1 - q0, device=device).view(1, -1)).detach().to(g.dtype)
        y = part.relative(h, torch.arange(it.r1 - it.r0, device=device).view(1, -1)).detach().to(g.dtype)
        row, shift = (x, y) if row is None else (row + x, shift + y)
    return row.view(1, g.Hq, 1, -1), shift.view(1, g.Hq, -1)


def forward(g, items, q, k, v):
    """out (B, Hq, Nq, D) and lse (B, Hq, Nq) in g.dtype (+inf on rows with no allowed key)."""
    qc, kc, vc = (_dense_last(x.to(g.dtype)) for x in (q, k, v))
    sp = items[0] if items and isinstance(items[0], Strip) else None
    S = _strip_tensor(g, sp, q.device) if sp is not None else None
    if len(items) == 1 and isinstance(items[0], Rect) and (items[0].r0, items[0].r1) == (0, g.Nq):
        return _whole(g, items[0], qc, kc, vc)
    # Uninitialised: each row's first result is copied in, rows no item reaches are zeroed at the end.
    out = torch.empty(g.B, g.Hq, g.Nq, vc.shape[-1], dtype=g.dtype, device=q.device)  # (B, Hq, Nq, D)
    lse = torch.empty((g.B, g.Hq, g.Nq), dtype=g.dtype, device=q.device)
    seen = torch.zeros(g.Nq, dtype=torch.bool)
    kcc = vcc = dense = None
    for it in items:
        if isinstance(it, Strip):
            continue
        if isinstance(it, Docs):
            dense = dense or tuple(x.contiguous() for x in (qc, kc, vc))
            _docs_forward(g, it, *dense, out, lse, seen)
            continue
        if isinstance(it, Windows):
            if kcc is None:
                kcc, vcc = kc.contiguous(), vc.contiguous()
            kv, vv = _window_views(g, it, kcc, vcc, it.t0, it.t1)
            o, s = _FWD(_block_rows(qc, g, it.bw, it.t0, it.t1), kv, vv, 0.0, False,
                        attn_mask=_window_pattern(g, it, q.device), scale=g.scale)
            o = _unblock_rows(o, g, it.bw)  # (B, Hq, nb*bw, D)
            s = _unblock_rows(s.unsqueeze(-1), g, it.bw).squeeze(-1)  # (B, Hq, nb*bw)
            _merge(out, lse, seen, it.t0 * it.bw, it.t1 * it.bw, o, s)
            continue
        if it.linear:
            (add, shift), ok = _linear_mask(g, it, q.device), None
        else:
            add, ok = _strip_mask(g, sp, S, it) if it.strip else _rect_mask(g, it, q.device)
        o, s = _FWD(qc[:, :, it.r0:it.r1], kc[:, :, it.k0:it.k1], vc[:, :, it.k0:it.k1], 0.0,
                    it.causal, attn_mask=add, scale=g.scale)
        if it.linear:
            s = s - shift  # (B, Hq, R): the log-sum-exp of the true scores
        if ok is not None:
            s = s.masked_fill(~ok, NEG_INF)
        _merge(out, lse, seen, it.r0, it.r1, o, s)
    if not bool(seen.all()):
        out[:, :, ~seen] = 0
        lse[:, :, ~seen] = NEG_INF
    lse.masked_fill_(lse == NEG_INF, float("inf"))
    return out, lse


def _whole(g, it: Rect, qc, kc, vc):
    """A plan of one rectangle over every query row: the kernel's output is the result (no copy)."""
    add, ok = _rect_mask(g, it, qc.device)
    o, s = _FWD(qc, kc[:, :, it.k0:it.k1], vc[:, :, it.k0:it.k1], 0.0, it.causal, attn_mask=add, scale=g.scale)
    if ok is not None:
        s = s.masked_fill(~ok, NEG_INF)
    return o, s.masked_fill(s == NEG_INF, float("inf"))


BACKWARD_ROWS = 1024  # the kernel's backward needs >= 768 query rows per call for its 256-row blocks
BACKWARD_WINDOW_ROWS = 128  # window blocks of the backward (32-row ones run its GEMMs at a fraction of the rate)


def backward_items(g, items, mask_elements: int) -> tuple:
    """Items for the backward. The kernel's backward runs short (128-row) rectangles at about half
    its rate on tall ones, so bias plans under a band mask (or none), whose per-block spans are
    contiguous, are regrouped into bands of BACKWARD_ROWS rows, their keys cut into chunks whose
    mask / bias tensor fits ``mask_elements``. Other plans are kept."""
    win = next((it for it in items if isinstance(it, Windows)), None)
    if win is not None and win.bw < BACKWARD_WINDOW_ROWS:  # taller blocks: more keys, far better rate
        return _windows(g, win.lo, win.hi, 0, bw=min(BACKWARD_WINDOW_ROWS, max(win.bw, g.bq)))
    if not g.bias_parts or not (g.mask is None or type(g.mask) is Band):
        return items
    rects = [it for it in items if isinstance(it, Rect)]
    if any(it.linear for it in rects) or all(it.r1 - it.r0 >= min(BACKWARD_ROWS, g.Nq) or it.r1 == g.Nq
                                             for it in rects):
        return items  # already tall (linear plans: as tall as their Strip allows)
    out = []
    for r0 in range(0, g.Nq, BACKWARD_ROWS):
        r1 = min(g.Nq, r0 + BACKWARD_ROWS)
        spans = [(it.k0, it.k1) for it in rects if it.r0 < r1 and it.r1 > r0]
        if not spans:
            continue
        k0, k1 = min(a for a, _ in spans), max(b for _, b in spans)
        step = max(128, mask_elements // (g.B * g.Hq * (r1 - r0)) // 128 * 128)
        for a in range(k0, k1, step):
            b = min(k1, a + step)
            out.append(Rect(r0, r1, a, b, masked=((a, b),) if g.mask is not None else (), all_partial=True))
    return tuple(out)


def backward(g, items, q, k, v, out, lse, dout, *, item_elements: int, mask_elements: int = 1 << 24, into=None):
    """(dq, dk, dv) in g.dtype given the whole attention's out (B, Hq, Nq, D), lse (B, Hq, Nq).
    into: None, or (dq, dk, dv) tensors of those shapes in g.dtype that the gradients are added
    to in place (and returned): no gradient-sized buffers of this call's own."""
    items = backward_items(g, items, mask_elements)
    qc, kc, vc, oc, dc = (_dense_last(x.to(g.dtype)) for x in (q, k, v, out, dout))
    lse = lse.to(g.dtype)
    whole = len(items) == 1 and isinstance(items[0], Rect) and (items[0].r0, items[0].r1, items[0].k0, items[0].k1) == (0, g.Nq, 0, g.Nk)
    if whole and into is None:
        # one rectangle over everything (dense, causal): the kernel's gradients are the result
        add = _rect_mask(g, items[0], q.device)[0]
        return _BWD(dc, qc, kc, vc, oc, lse, 0.0, items[0].causal, attn_mask=add, scale=g.scale)
    if into is not None:
        dq, dk, dv = into
    else:
        dq, dk, dv = (torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (qc, kc, vc))
    docs_into = None  # contiguous accumulators for Docs items (their strided views need them)
    sp = items[0] if items and isinstance(items[0], Strip) else None
    S = _strip_tensor(g, sp, q.device) if sp is not None else None
    kcc = vcc = dense = None
    for it in items:
        if isinstance(it, Strip):
            continue
        if isinstance(it, Docs):
            dense = dense or tuple(x.contiguous() for x in (qc, kc, vc, oc, lse, dc))
            docs_into = docs_into or tuple(t if t.is_contiguous() else torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                                           for t in (dq, dk, dv))
            _docs_backward(g, it, *dense, *docs_into)
            continue
        if isinstance(it, Windows):
            if kcc is None:
                kcc, vcc = kc.contiguous(), vc.contiguous()
            _windows_backward(g, it, qc, kcc, vcc, oc, lse, dc, dq, dk, dv, item_elements)
            continue
        r, c = slice(it.r0, it.r1), slice(it.k0, it.k1)
        s = lse[:, :, r]
        if it.linear:
            add, shift = _linear_mask(g, it, q.device)
            s = s + shift  # the log-sum-exp in the frame of the kernel's scores (key row added)
        else:
            add = _strip_mask(g, sp, S, it)[0] if it.strip else _rect_mask(g, it, q.device)[0]
        gq, gk, gv = _BWD(dc[:, :, r], qc[:, :, r], kc[:, :, c], vc[:, :, c], oc[:, :, r], s, 0.0,
                          it.causal, attn_mask=add, scale=g.scale)
        dq[:, :, r] += gq
        dk[:, :, c] += gk
        dv[:, :, c] += gv
    for acc, got in zip((dq, dk, dv), docs_into or ()):
        if got is not acc:
            acc += got
    return dq, dk, dv


def _windows_backward(g, it: Windows, qc, kcc, vcc, oc, lse, dc, dq, dk, dv, budget):
    """Window blocks in chunks of at most ``budget`` elements of per-block dK (the windows overlap:
    L / bw times K's size); each chunk's window gradients are folded back with one index_add_."""
    L, bw = it.bw + it.hi - it.lo, it.bw
    pattern = _window_pattern(g, it, qc.device)
    chunk = max(1, budget // (g.B * g.Hk * L * kcc.shape[-1]))
    start = (g.Nk - g.Nq) + it.lo
    for c0 in range(it.t0, it.t1, chunk):
        c1 = min(it.t1, c0 + chunk)
        kv, vv = _window_views(g, it, kcc, vcc, c0, c1)
        dob, qb, ob, sb = (_block_rows(x, g, bw, c0, c1) for x in (dc, qc, oc, lse.unsqueeze(-1)))
        gq, gk, gv = _BWD(dob, qb, kv, vv, ob, sb.squeeze(-1), 0.0, False, attn_mask=pattern, scale=g.scale)
        rows = _block_rows(dq, g, bw, c0, c1)  # a view of dq when G == 1: add in place, no copy
        if rows.untyped_storage().data_ptr() == dq.untyped_storage().data_ptr():
            rows.add_(gq)
        else:
            dq[:, :, c0 * bw:c1 * bw] += _unblock_rows(gq, g, bw)
        keys = ((torch.arange(c0, c1, device=qc.device) * bw + start).view(-1, 1)
                + torch.arange(L, device=qc.device)).view(-1)  # (nb*L,) key of each window row
        for dst, src in ((dk, gk), (dv, gv)):  # (B*Hk, nb, L, X) -> rows of (B, Hk, Nk, X)
            dst.view(g.B * g.Hk, g.Nk, -1).index_add_(1, keys, src.reshape(g.B * g.Hk, -1, src.shape[-1]))


def _doc_view(x: torch.Tensor, it: Docs, start: int, size: int) -> torch.Tensor:
    """Documents of ``it`` in x (B, H, N, X) or (B, H, N), contiguous: rows start + i*step ..
    + size - 1 of document i, as (n, B*H, size, X) or (n, B*H, size). A view."""
    if not x.is_contiguous():
        raise RuntimeError("_doc_view needs a contiguous tensor")
    B, H, N = x.shape[:3]
    tail = x.shape[3:]
    X = tail[0] if tail else 1
    shape = (it.n, B * H, size) + tail
    stride = (it.step * X, N * X, X) + ((1,) if tail else ())
    return x.as_strided(shape, stride, x.storage_offset() + start * X)


def _doc_rects(it: Docs) -> tuple:
    """Local (rows, keys) rectangles of one document (row a sees keys <= a + c). One causal call
    per document beats rows cut into bands (full rectangle + causal square each): same work
    within the kernel's 512-key blocks, and 2-3x the calls, each a thread barrier that a loaded
    machine stretches (measured on a loaded machine: banded 1.5-7x slower at N=16384)."""
    return _causal_like(it.R, it.L, it.c)


def _docs_forward(g, it: Docs, q, k, v, out, lse, seen):
    """Run the documents of ``it`` and write their rows of out (B, Hq, Nq, D) / lse (B, Hq, Nq),
    marking them in ``seen`` (Nq,). All tensors contiguous."""
    done = set()  # local first rows written (a full and a causal rectangle may share rows)
    for lr in _doc_rects(it):
        R, L = lr.r1 - lr.r0, lr.k1 - lr.k0
        o, s = _FWD(_doc_view(q, it, it.r0 + lr.r0, R), _doc_view(k, it, it.k0 + lr.k0, L),
                    _doc_view(v, it, it.k0 + lr.k0, L), 0.0, lr.causal, scale=g.scale)  # (n, B*Hq, R, D)
        ov, sv = _doc_view(out, it, it.r0 + lr.r0, R), _doc_view(lse, it, it.r0 + lr.r0, R)
        if lr.r0 not in done:  # the first rectangle of these rows
            done.add(lr.r0)
            ov.copy_(o)
            sv.copy_(s)
            seen.as_strided((it.n, R), (it.step, 1), it.r0 + lr.r0).fill_(True)
        else:
            _fold(ov, sv, o, s)


def _docs_backward(g, it: Docs, q, k, v, o, s, do, dq, dk, dv):
    """Gradients of the documents of ``it``, added in place into dq / dk / dv. All tensors
    contiguous."""
    for lr in _doc_rects(it):
        R, L, r, c = lr.r1 - lr.r0, lr.k1 - lr.k0, it.r0 + lr.r0, it.k0 + lr.k0
        gq, gk, gv = _BWD(_doc_view(do, it, r, R), _doc_view(q, it, r, R), _doc_view(k, it, c, L),
                          _doc_view(v, it, c, L), _doc_view(o, it, r, R), _doc_view(s, it, r, R), 0.0,
                          lr.causal, scale=g.scale)
        _doc_view(dq, it, r, R).add_(gq)
        _doc_view(dk, it, c, L).add_(gk)
        _doc_view(dv, it, c, L).add_(gv)
