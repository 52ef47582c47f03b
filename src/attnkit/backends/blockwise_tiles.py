"""Tile math of the blockwise backend: scores, online-softmax update and per-tile backward.

Legend: B batch, Hq query heads, Hk key/value heads, G = Hq // Hk (query heads per kv head),
Tq query blocks of bq rows, C query blocks handled together, L keys in one work item, D head
dim, Dv value dim. Query head h = hk * G + g (grouped-query attention reads kv head hk).

Layouts (``blockwise.py`` builds them; no O(N * D) copy beyond padding K/V to whole tiles):
- queries of a group of C query blocks, qt: (B, Hk, C, G*bq, D), already multiplied by the
  scale; the G query heads that share a kv head are stacked along the row axis, so one matmul
  against that kv head's keys serves all of them and K/V are never repeated per query head.
- keys/values kp, vp: (B, Hk, Tk*bk, D|Dv), zero-padded to whole tiles; the stream schedule
  also keeps kT = kp transposed (B, Hk, D, Tk*bk), a faster matmul operand on CPU.
- a group's output / dq: like qt; its log-sum-exp / Delta: (B, Hk, C, G*bq).

A work item is (t0, t1, keys): query blocks t0..t1-1 (C = t1 - t0) against either a contiguous
key range (``RangeKeys``, C == 1, a view of kp) or key tiles gathered per query block
(``GatherKeys``, idx (C, M) -> L = M * bk keys per block). Scores of an item:
s (B, Hk, C, G*bq, L), viewed as (B, Hk, C, G, bq, L) to add bias / apply mask with index
tensors b (B,1,1,1,1,1), h (1,Hk,1,G,1,1), q (1,1,C,1,bq,1), k (1,1,C|1,1,1,L), q in key
coordinates. Peak memory of an item: a few score-sized tensors, bounded by the planner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._hash import dropout_keep
from .._numerics import NEG_INF, OnlineSoftmax
from ..biases import Bias, TensorBias
from .blockwise_relative import OffsetGrad

# Shift-free softmax: when |score| <= SHIFT_FREE_BOUND is guaranteed (Cauchy-Schwarz bound on
# scale * |q| * |k|, or the softcap), p = exp(s) needs no running max: it neither overflows
# (sums stay below Nk * e^30) nor underflows into subnormals (p >= e^-30), and the softmax is
# shift-invariant, so the result equals the max-shifted one to rounding. It saves the max,
# subtract and rescale passes over every score tile, and masks are applied after exp by
# zeroing (exp of -inf and of large negatives hits a slow path on x86 CPUs).
SHIFT_FREE_BOUND = {torch.float32: 30.0, torch.float64: 300.0}


@dataclass(frozen=True)
class RangeKeys:
    """Keys k0 .. k1-1 (padded coordinates), one query block (C == 1)."""

    k0: int
    k1: int
    masked: bool  # evaluate the mask (some tile in the range is PARTIAL, or pads keys)


@dataclass(frozen=True)
class GatherKeys:
    """Per query block, M key tiles idx (C, M); slot_ok (C, M) False for padding slots.

    offset: when every block of the group reads M consecutive whole tiles of real keys, is a
    whole block of real queries, and its first key minus its first query (key coordinates) is
    the same number d for all C blocks, that d; else None (see ``band_blocked``).
    """

    idx: torch.Tensor
    slot_ok: torch.Tensor
    masked: bool
    offset: int | None = None


@dataclass(frozen=True)
class Geometry:
    """Everything a tile needs besides tensors."""

    B: int
    Hq: int
    Hk: int
    G: int
    Nq: int
    Nk: int
    bq: int
    bk: int
    Tq: int
    Tk: int
    scale: float
    softcap: float | None
    mask: object  # attnkit.masks.Mask | None
    bias_parts: tuple  # tuple[Bias, ...], SumBias flattened
    dropout_p: float
    dropout_seed: int | None
    dtype: torch.dtype  # compute dtype (float32 for half inputs)


def flatten_bias(bias: Bias | None) -> tuple:
    return () if bias is None else bias.terms()


# ---------------------------------------------------------------------------------------------
# Positions and keys of an item
# ---------------------------------------------------------------------------------------------


def positions(g: Geometry, t0: int, t1: int, kpos: torch.Tensor, device):
    """Index tensors (b, h, q, k), 6-D, broadcasting to (B, Hk, C, G, bq, L)."""
    C = t1 - t0
    rows = torch.arange(t0 * g.bq, t1 * g.bq, device=device).clamp_max(g.Nq - 1) + (g.Nk - g.Nq)
    b = torch.arange(g.B, device=device).view(-1, 1, 1, 1, 1, 1)
    h = torch.arange(g.Hq, device=device).view(1, g.Hk, 1, g.G, 1, 1)
    q = rows.view(1, 1, C, 1, g.bq, 1)
    k = kpos.view(1, 1, kpos.shape[0], 1, 1, kpos.shape[1])
    return b, h, q, k


class Workspace:
    """Reusable scratch buffers of one call, so that the per-item score / gather tensors are not
    allocated (and page-faulted in) again for every work item. ``take`` returns a contiguous
    view of the first numel elements of a named flat buffer; a name's previous view is dead."""

    def __init__(self, dtype: torch.dtype, device):
        self.dtype, self.device, self.bufs = dtype, device, {}

    def take(self, name: str, shape) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(n, dtype=self.dtype, device=self.device)
        return buf[:n].view(shape)


def item_keys(g: Geometry, kp: torch.Tensor, vp: torch.Tensor, keys, kT: torch.Tensor | None = None,
              ws: Workspace | None = None):
    """(ktT (B,Hk,C|1,D,L), vt (B,Hk,C|1,L,Dv), kpos (C|1, L) clamped, kvalid (C|1, L) or None).

    kT: optional (B, Hk, D, Tk*bk) contiguous copy of kp transposed; a contiguous (D, L) operand
    makes the q.k^T matmul about 1.3x faster on CPU than a transposed view. ws: gathered K/V go
    into its buffers "k" and "v" (valid until the next call with the same ws).
    """
    ktT, vt = item_kv(g, kp, vp, keys, kT, ws)
    return (ktT, vt, *item_pos(g, keys, kp.device))


def item_pos(g: Geometry, keys, device):
    """(kpos (C|1, L) key positions clamped to Nk - 1, kvalid (C|1, L) bool or None)."""
    if isinstance(keys, RangeKeys):
        raw = torch.arange(keys.k0, keys.k1, device=device).view(1, -1)
        kvalid = raw < g.Nk if keys.k1 > g.Nk else None
        return raw.clamp_max(g.Nk - 1), kvalid
    C, M = keys.idx.shape
    raw = (keys.idx.unsqueeze(-1) * g.bk + torch.arange(g.bk, device=device)).view(C, M * g.bk)
    kvalid = (raw < g.Nk) & keys.slot_ok.repeat_interleave(g.bk, dim=1)
    return raw.clamp_max(g.Nk - 1), kvalid


def item_kv(g: Geometry, kp: torch.Tensor, vp: torch.Tensor, keys, kT: torch.Tensor | None = None,
            ws: Workspace | None = None):
    """(ktT (B,Hk,C|1,D,L), vt (B,Hk,C|1,L,Dv)): views of kp / kT, or gathered tiles."""
    B, Hk = kp.shape[:2]
    if isinstance(keys, RangeKeys):
        if kT is not None:
            ktT = kT[:, :, :, keys.k0:keys.k1].unsqueeze(2)  # (B, Hk, 1, D, L), a view
        else:
            ktT = kp[:, :, keys.k0:keys.k1].unsqueeze(2).transpose(-1, -2)
        vt = vp[:, :, keys.k0:keys.k1].unsqueeze(2)  # (B, Hk, 1, L, Dv)
        return ktT, vt
    C, M = keys.idx.shape
    flat = keys.idx.reshape(-1)
    if ws is not None:
        kt = torch.index_select(kp.view(B, Hk, g.Tk, g.bk, -1), 2, flat,
                                out=ws.take("k", (B, Hk, C * M, g.bk, kp.shape[-1])))
        vt = torch.index_select(vp.view(B, Hk, g.Tk, g.bk, -1), 2, flat,
                                out=ws.take("v", (B, Hk, C * M, g.bk, vp.shape[-1])))
        kt, vt = kt.view(B, Hk, C, M * g.bk, -1), vt.view(B, Hk, C, M * g.bk, -1)
    else:
        kt = kp.view(B, Hk, g.Tk, g.bk, -1).index_select(2, flat).view(B, Hk, C, M * g.bk, -1)
        vt = vp.view(B, Hk, g.Tk, g.bk, -1).index_select(2, flat).view(B, Hk, C, M * g.bk, -1)
    return kt.transpose(-1, -2), vt


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def _tensor_bias_index(tb: TensorBias, b, h, q, k):
    """Index tuple of TensorBias.__call__ (kept equal to it), for gradient scatter."""
    t = tb.tensor
    bi = b if t.shape[0] > 1 else torch.zeros_like(b)
    hi = h if t.shape[1] > 1 else torch.zeros_like(h)
    qi = q - (tb.nk - tb.nq) if t.shape[2] > 1 else torch.zeros_like(q)
    ki = k if t.shape[3] > 1 else torch.zeros_like(k)
    return bi, hi, qi, ki


def scores(g: Geometry, qt, ktT, pos, kvalid, masked: bool, *, bias_grad: bool = False, strip=None, keys=None,
           t0: int = 0):
    """s (B, Hk, C, G*bq, L) = softcap(scale q.k) + bias, -inf where blocked.

    Returns (s, tanh_or_None, bias_values) where bias_values are the per-part tile evaluations
    built with autograd enabled when ``bias_grad`` (for the backward's bias gradients; None for
    the translation-invariant parts when ``strip``, the call's ``BiasStrip``, holds the item's
    values: they are read from it, and their gradients come from dS alone).
    """
    s = torch.matmul(qt, ktT)  # (B, Hk, C, G*bq, L)
    th = None
    if g.softcap is not None:
        th = torch.tanh(s.div_(g.softcap))
        s = th * g.softcap
    B, Hk, C, R, L = s.shape
    sv = s.view(B, Hk, C, g.G, g.bq, L)  # (B, Hk, C, G, bq, L)
    tile = strip.tile(keys, t0, L) if strip is not None else None  # (1, Hk, 1, G, bq, L) or None
    if tile is not None:
        sv.add_(tile)
    values = []
    for part in g.bias_parts:
        if tile is not None and part.translation_invariant:
            values.append(None)
            continue
        wants = (bias_grad and any(t.requires_grad for t in part.tensors()) and part.dense_tensor is None
                 and not part.translation_invariant)
        with torch.set_grad_enabled(wants):
            val = part(*pos)
        values.append(val)
        sv.add_(val.detach().to(s.dtype))
    if masked:
        allowed = kvalid.view(1, 1, kvalid.shape[0], 1, 1, L) if kvalid is not None else None
        if g.mask is not None:
            m = g.mask.allows(*pos, num_keys=g.Nk)
            allowed = m if allowed is None else (m & allowed)
        if allowed is not None:
            sv.masked_fill_(~allowed, NEG_INF)
    return s, th, values


def keep_scale(g: Geometry, pos, shape) -> torch.Tensor:
    """Dropout multiplier keep / (1 - p) of shape (B, Hk, C, G*bq, L), in the compute dtype."""
    keep = dropout_keep(g.dropout_seed, g.dropout_p, *pos)
    keep = torch.broadcast_to(keep, (shape[0], shape[1], shape[2], g.G, g.bq, shape[4]))
    return (keep.to(g.dtype) / (1.0 - g.dropout_p)).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Forward: online softmax over the items of one query-block group
# ---------------------------------------------------------------------------------------------


def forward_group(g: Geometry, qt, kp, vp, t0, t1, items, Dv, kT=None, *, shift_free=False, band_cache=None,
                  ws: Workspace | None = None, strip=None):
    """Output (B, Hk, C, G*bq, Dv) and log-sum-exp (B, Hk, C, G*bq) for query blocks t0..t1-1.

    Rows with no allowed key get output 0 and lse = +inf (so backward's exp(s - lse) = 0).
    shift_free: the caller guarantees |score| <= SHIFT_FREE_BOUND (no bias parts), so
    p = exp(s) is used directly (see SHIFT_FREE_BOUND). band_cache: a dict when the mask is
    translation-invariant (``translation_invariant``), reused across groups of one call.
    ws: scratch buffers reused across groups (shift-free path). strip: the call's ``BiasStrip`` or None.
    """
    if shift_free:
        l_, acc = _shift_free(g, qt, kp, vp, t0, t1, items, kT, band_cache, ws)
        empty = l_ == 0
        out = acc.div_(torch.where(empty, torch.ones_like(l_), l_).unsqueeze(-1))
        lse = torch.where(empty, torch.full_like(l_, float("inf")), torch.log(l_))
        return out, lse
    acc = OnlineSoftmax(tuple(qt.shape[:4]), Dv, dtype=g.dtype, device=qt.device)  # rows (B, Hk, C, G*bq)
    for keys in items:
        ktT, vt, kpos, kvalid = item_keys(g, kp, vp, keys, kT)
        pos = positions(g, t0, t1, kpos, qt.device)
        s, _, _ = scores(g, qt, ktT, pos, kvalid, keys.masked, strip=strip, keys=keys, t0=t0)  # (B, Hk, C, G*bq, L)
        dropout = (lambda p, pos=pos: p.mul_(keep_scale(g, pos, p.shape))) if g.dropout_p > 0 else None
        acc.update(s, vt, dropout)
    return acc.result()


def _shift_free(g: Geometry, qt, kp, vp, t0, t1, items, kT, band_cache, ws):
    """Sum l (B, Hk, C, G*bq) and unnormalised output acc (..., Dv) with p = exp(s), no max."""
    B, Hk, C, R, _ = qt.shape
    l_ = acc = None
    for keys in items:
        ktT, vt = item_kv(g, kp, vp, keys, kT, ws)
        L = ktT.shape[-1]
        s = ws.take("s", (B, Hk, C, R, L)) if ws is not None else None
        s = torch.matmul(qt, ktT, out=s)  # (B, Hk, C, G*bq, L)
        if g.softcap is not None:
            s.div_(g.softcap).tanh_().mul_(g.softcap)
        p = s.exp_()
        pos = None
        if keys.masked:
            blocked, pos = _blocked(g, t0, t1, keys, L, band_cache, qt.device)
            if blocked is None:
                pass
            elif blocked.dtype == torch.bool:
                p.view(B, Hk, C, g.G, g.bq, L).masked_fill_(blocked, 0.0)  # (B, Hk, C, G, bq, L)
            else:  # a cached band pattern: 0/1 multiplier (bq * L,), one contiguous row per block
                p.view(-1, g.bq * L).mul_(blocked)  # (B * Hk * C * G, bq * L)
        ls = p.sum(dim=-1)
        if g.dropout_p > 0:
            pos = pos if pos is not None else positions(g, t0, t1, item_pos(g, keys, qt.device)[0], qt.device)
            p.mul_(keep_scale(g, pos, p.shape))
        if acc is None:
            acc = ws.take("acc", (B, Hk, C, R, vt.shape[-1])) if ws is not None else None
            acc = torch.matmul(p, vt, out=acc)  # (B, Hk, C, G*bq, Dv)
            l_ = ls
        else:  # acc += p @ v in the GEMM itself (beta = 1), no temporary
            acc.view(-1, R, acc.shape[-1]).baddbmm_(p.view(-1, R, L), vt.expand(B, Hk, C, L, -1).reshape(-1, L, acc.shape[-1]))
            l_.add_(ls)
    return l_, acc


def band_offset(g: Geometry, t0: int, t1: int, keys) -> int | None:
    """First key minus first query position (key coordinates) shared by the item's blocks, when
    the item is regular (whole blocks of real queries, only real keys), else None."""
    if t1 * g.bq > g.Nq:
        return None
    if isinstance(keys, RangeKeys):
        return keys.k0 - (t0 * g.bq + g.Nk - g.Nq) if keys.k1 <= g.Nk and t1 - t0 == 1 else None
    return keys.offset


def _blocked(g: Geometry, t0, t1, keys, L, band_cache, device):
    """(blocked, pos): bool broadcasting to (B, Hk, C, G, bq, L), True where the score must be
    dropped (mask says no, or a padding key); pos = positions() if they were built, else None.

    Translation-invariant masks on regular items reuse one pattern per offset, returned instead
    as a float 0/1 multiplier (bq * L,) (1 = keep) in the compute dtype."""
    d = band_offset(g, t0, t1, keys) if band_cache is not None else None
    if d is not None:
        hit = band_cache.get((d, L))
        if hit is None:
            q0 = t0 * g.bq + g.Nk - g.Nq
            b = torch.arange(g.B, device=device).view(-1, 1, 1, 1, 1, 1)
            h = torch.arange(g.Hq, device=device).view(1, g.Hk, 1, g.G, 1, 1)
            q = torch.arange(q0, q0 + g.bq, device=device).view(1, 1, 1, 1, g.bq, 1)
            k = torch.arange(q0 + d, q0 + d + L, device=device).view(1, 1, 1, 1, 1, L)
            allowed = g.mask.allows(b, h, q, k, num_keys=g.Nk)  # (1, 1, 1, 1, bq, L) for a band
            hit = band_cache[(d, L)] = torch.broadcast_to(allowed, (1, 1, 1, 1, g.bq, L)).to(g.dtype).reshape(g.bq * L)
        return hit, None
    kpos, kvalid = item_pos(g, keys, device)
    pos = positions(g, t0, t1, kpos, device)
    allowed = kvalid.view(1, 1, kvalid.shape[0], 1, 1, L) if kvalid is not None else None
    if g.mask is not None:
        m = g.mask.allows(*pos, num_keys=g.Nk)
        allowed = m if allowed is None else (m & allowed)
    return (None if allowed is None else ~allowed), pos


# ---------------------------------------------------------------------------------------------
# Backward (FlashAttention-2): recompute p from lse, accumulate dq per group, dk/dv globally
# ---------------------------------------------------------------------------------------------


def backward_group(g: Geometry, qt, kp, vp, dot, lse, delta, t0, t1, items, dkp, dvp, bias_grads, kT=None,
                   strip=None):
    """dq (B, Hk, C, G*bq, D) of the group; adds into dkp, dvp (B, Hk, Tk*bk, D|Dv) and into
    ``bias_grads`` (part index -> list of gradient tensors, aligned with part.tensors()).
    strip: the call's ``BiasStrip`` or None."""
    dq = torch.zeros_like(qt)
    want_bias = any(bias_grads.get(i) is not None for i in range(len(g.bias_parts)))
    for keys in items:
        ktT, vt, kpos, kvalid = item_keys(g, kp, vp, keys, kT)
        pos = positions(g, t0, t1, kpos, qt.device)
        s, th, values = scores(g, qt, ktT, pos, kvalid, keys.masked, bias_grad=want_bias, strip=strip, keys=keys,
                               t0=t0)
        p = s.sub_(lse.unsqueeze(-1)).exp_()  # (B, Hk, C, G*bq, L)
        dp = torch.matmul(dot, vt.transpose(-1, -2))  # (B, Hk, C, G*bq, L)
        if g.dropout_p > 0:
            ks = keep_scale(g, pos, p.shape)
            dv_t = torch.matmul((p * ks).transpose(-1, -2), dot)
            dp.mul_(ks)
        else:
            dv_t = torch.matmul(p.transpose(-1, -2), dot)  # (B, Hk, C, L, Dv)
        ds = dp.sub_(delta.unsqueeze(-1)).mul_(p)  # dL/d(score after softcap, incl. bias)
        if want_bias:
            _bias_backward(g, ds, pos, values, bias_grads, keys, t0)
        if th is not None:
            ds.mul_(1.0 - th * th)
        dq.add_(torch.matmul(ds, ktT.transpose(-1, -2)))
        dk_t = torch.matmul(ds.transpose(-1, -2), qt)  # (B, Hk, C, L, D)
        _scatter_kv(g, keys, dkp, dvp, dk_t, dv_t)
    return dq


def _scatter_kv(g: Geometry, keys, dkp, dvp, dk_t, dv_t):
    if isinstance(keys, RangeKeys):
        dkp[:, :, keys.k0:keys.k1].add_(dk_t[:, :, 0])
        dvp[:, :, keys.k0:keys.k1].add_(dv_t[:, :, 0])
        return
    B, Hk = dkp.shape[:2]
    flat = keys.idx.reshape(-1)
    n = flat.numel()
    dkp.view(B, Hk, g.Tk, g.bk, -1).index_add_(2, flat, dk_t.reshape(B, Hk, n, g.bk, -1))
    dvp.view(B, Hk, g.Tk, g.bk, -1).index_add_(2, flat, dv_t.reshape(B, Hk, n, g.bk, -1))


def _bias_backward(g: Geometry, ds, pos, values, bias_grads, keys, t0):
    B, Hk, C, R, L = ds.shape
    ds6 = ds.view(B, Hk, C, g.G, g.bq, L)  # (B, Hk, C, G, bq, L)
    for i, part in enumerate(g.bias_parts):
        grads = bias_grads.get(i)
        if grads is None:
            continue
        if part.dense_tensor is not None:
            idx = _tensor_bias_index(part, *pos)
            grads[0].index_put_(idx, ds6.to(grads[0].dtype), accumulate=True)
            continue
        if part.translation_invariant:  # dL/d(bias at offset r): sums of dS along diagonals
            acc = grads[-1] if isinstance(grads[-1], OffsetGrad) else None
            if acc is None:
                acc = OffsetGrad(g, ds.dtype, ds.device)
                grads.append(acc)
            acc.add(ds6, keys, t0)
            continue
        val = values[i]
        if not val.requires_grad:
            continue
        ts = [t for t in part.tensors() if t.requires_grad]
        got = torch.autograd.grad(val, ts, grad_outputs=ds6.sum_to_size(val.shape).to(val.dtype), allow_unused=True)
        j = 0
        for slot, t in enumerate(part.tensors()):
            if t.requires_grad:
                if got[j] is not None:
                    grads[slot].add_(got[j])
                j += 1
