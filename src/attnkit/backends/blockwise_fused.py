"""Fused tile body of the blockwise backend: torch's CPU flash-attention kernel on rectangles.

Legend: B batch, Hq query heads, Hk key/value heads (G = Hq // Hk), Nq queries, Nk keys, D head
dim (= Dv here), R rows of a rectangle, L its keys, bw rows of one window block, nb blocks.

The blockwise planner decides *which* (query, key) rectangles hold allowed pairs; this module
runs each rectangle through ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the kernel
behind ``F.scaled_dot_product_attention`` on CPU, which returns the log-sum-exp) and its
backward (which takes an external output and log-sum-exp, FlashAttention-2 style), and merges
the rectangles of a query row by log-sum-exp. The kernel does the matmuls, the softmax and the
masking per cache-sized block in C++: no Python per tile, no score tensor in memory.

The items (``Rect``, ``Docs``, ``Windows``) and their plans are in ``blockwise_plan``.

Used when the call runs on CPU with no softcap, no dropout and equal q / v head dims, in the
compute dtype (float32 for half inputs); the backward also needs no gradient for bias tensors.
Everything else runs the PyTorch tile math of ``blockwise_tiles``.
"""

from __future__ import annotations

import torch

from .blockwise_plan import Docs, Rect, Strip, Windows, _as4d, _causal_like, backward_items

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


EVAL_ELEMENTS = 1 << 20  # values per call of a bias / mask spec: its temporaries stay in cache, not in DRAM


def _rect_mask(g, it: Rect, device, ws: list):
    """(float additive mask broadcastable to (B, Hq, R, L) or None, rows-with-a-key bool or None).

    The bias parts are evaluated on the whole rectangle, the mask spec only on ``it.masked``
    ranges (-inf where it blocks); rows are checked for an allowed key only where they can lack
    one (no FULL tile, or a bias tensor holding -inf). The specs run on a few rows at a time
    (``EVAL_ELEMENTS`` values), written into the pass's workspace ``ws`` (reused by every item):
    their int64 / float temporaries stay in cache, and no fresh rectangle-sized tensor is
    page-faulted in per item (the bench's causal bias spec at N=16384: 0.9 -> 0.3 s per pass,
    docs/performance.md)."""
    mask = g.mask if it.masked else None
    if mask is None and not g.bias_parts:
        return None, None
    b = torch.arange(g.B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(g.Hq, device=device).view(1, -1, 1, 1)
    q = (torch.arange(it.r0, it.r1, device=device) + (g.Nk - g.Nq)).view(1, 1, -1, 1)
    k = torch.arange(it.k0, it.k1, device=device).view(1, 1, 1, -1)
    R, L = it.r1 - it.r0, it.k1 - it.k0
    check = it.all_partial or any(p.dense_tensor is not None for p in g.bias_parts)  # a tensor may hold -inf
    if mask is None and len(g.bias_parts) == 1 and g.bias_parts[0].dense_tensor is not None:
        add = _as4d(g.bias_parts[0](b, h, q, k).detach().to(g.dtype))  # a view of the tensor: no copy
        return add, (add != NEG_INF).any(dim=-1)
    probe = _rows_shape(g, it, mask, b, h, q[:, :, :1], k[..., :1])  # (B', H', 1, 1): the extents
    add = _workspace(ws, probe[0] * probe[1] * R * L, g.dtype, device).view(probe[0], probe[1], R, L)
    step = max(1, EVAL_ELEMENTS // (probe[0] * probe[1] * L))
    for a in range(0, R, step):
        _fill_rows(g, it, mask, b, h, q[:, :, a:a + step], k, add[:, :, a:a + step])
    return add, ((add != NEG_INF).any(dim=-1) if check else None)


def _parts(g, it: Rect, mask, b, h, q, k):
    """The bias parts' values and (local key range, blocked bool) of the mask's ranges at query
    positions q (1, 1, rows, 1) and keys k (1, 1, 1, L) (all the rectangle's, or its first)."""
    vals = [_as4d(part(b, h, q, k).detach()) for part in g.bias_parts]
    blocked = []
    if mask is not None:
        for a, c in it.masked:
            kk = torch.arange(a, c, device=q.device).view(1, 1, 1, -1)[..., :k.shape[-1]]
            blocked.append((a - it.k0, c - it.k0, ~_as4d(mask.allows(b, h, q, kk, num_keys=g.Nk))))
    return vals, blocked


def _rows_shape(g, it: Rect, mask, b, h, q, k) -> torch.Size:
    """The broadcast extents (B', H', 1, 1) of the biases and the mask at one (query, key) pair."""
    vals, blocked = _parts(g, it, mask, b, h, q, k)
    return torch.broadcast_shapes((1, 1, 1, 1), *(x.shape for x in vals), *(m.shape for _, _, m in blocked))


def _fill_rows(g, it: Rect, mask, b, h, q, k, out: torch.Tensor) -> None:
    """out (B', H', rows, L) <- the sum of the bias parts at q, k, -inf where ``mask`` blocks."""
    vals, blocked = _parts(g, it, mask, b, h, q, k)
    if not vals:
        out.zero_()
    for i, val in enumerate(vals):
        out.copy_(val) if i == 0 else out.add_(val)
    for a, c, m in blocked:
        out[:, :, :, a:c].masked_fill_(m, NEG_INF)


def _workspace(ws: list, n: int, dtype, device) -> torch.Tensor:
    """The first n elements of the pass's flat buffer ``ws[0]``, grown at least 2x when short (a
    causal plan's rectangles grow band by band: a few allocations, not one per item)."""
    if not ws or ws[0].numel() < n:
        ws[:] = [torch.empty(max(n, 2 * ws[0].numel() if ws else 0), dtype=dtype, device=device)]
    return ws[0][:n]


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


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
    ws = []  # the mask buffer, reused by every item
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
            add, ok = _strip_mask(g, sp, S, it) if it.strip else _rect_mask(g, it, q.device, ws)
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
    add, ok = _rect_mask(g, it, qc.device, [])
    o, s = _FWD(qc, kc[:, :, it.k0:it.k1], vc[:, :, it.k0:it.k1], 0.0, it.causal, attn_mask=add, scale=g.scale)
    if ok is not None:
        s = s.masked_fill(~ok, NEG_INF)
    return o, s.masked_fill(s == NEG_INF, float("inf"))


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
        add = _rect_mask(g, items[0], q.device, [])[0]
        return _BWD(dc, qc, kc, vc, oc, lse, 0.0, items[0].causal, attn_mask=add, scale=g.scale)
    if into is not None:
        dq, dk, dv = into
    else:
        dq, dk, dv = (torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (qc, kc, vc))
    docs_into = None  # contiguous accumulators for Docs items (their strided views need them)
    sp = items[0] if items and isinstance(items[0], Strip) else None
    S = _strip_tensor(g, sp, q.device) if sp is not None else None
    kcc = vcc = dense = None
    ws = []  # the mask buffer, reused by every item
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
            add = _strip_mask(g, sp, S, it)[0] if it.strip else _rect_mask(g, it, q.device, ws)[0]
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
