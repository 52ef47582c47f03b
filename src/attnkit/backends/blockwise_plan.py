"""Plans of the fused blockwise engine: which (query rows, keys) items the kernel runs.

Legend: B batch, Hq query heads, Hk key/value heads (G = Hq // Hk), Nq queries, Nk keys, R rows of
a rectangle, L its keys, bw rows of one window block, Tq x Tk tiles of the tile map.

``plan_items`` turns a call's geometry (``g``) and its tile map (``st``, or a closed form for
causal, band, document and bias masks) into work items; ``backward_items`` regroups them for the
kernel's backward. ``blockwise_fused`` runs the items.

Work items:
- ``Rect(r0, r1, k0, k1, causal, masked)``: query rows r0..r1-1 against keys k0..k1-1. ``causal``
  uses the kernel's top-left causal flag (a square on the mask's diagonal: no mask tensor);
  ``masked`` evaluates the mask spec on the rectangle as a float 0 / -inf tensor. Bias specs
  are evaluated on the rectangle and added to that tensor. ``strip``: the tensor is a view of the
  call's ``Strip`` (translation-invariant biases). ``linear``: every pair allowed and the biases
  linear in the offset (causal ALiBi): a (1, Hq, 1, L) key row, the log-sum-exp shifted per query.
- ``Docs``: one causal / full square per document, equal documents in one call (strided views).
- ``Windows(t0, t1, bw, lo, hi)``: a band mask (keys k - q in [lo, hi]) on regular query blocks
  t0..t1-1 of bw rows: block t reads the L = bw + hi - lo keys from t * bw + (Nk - Nq) + lo, an
  overlapping strided view of K and V (no copy), all blocks in one kernel call with one cached
  (G*bw, L) pattern. The computed keys per query are L instead of the 1.5 * 128-ish of 128-key
  tiles; rows at the sequence ends are ``Rect`` items.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..masks import EMPTY, FULL, Band, Document


def _as4d(x: torch.Tensor) -> torch.Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


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
