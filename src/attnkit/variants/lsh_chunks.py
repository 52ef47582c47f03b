"""The chunked attention of Reformer LSH on the sorted order (the kernel behind ``lsh_attention``).

Legend: G flattened (batch, head) pairs, R hash rounds, N positions, c chunk length, C = ceil(N / c)
chunks per round, Np = C c slots per round, RC = R C chunks laid end to end, W = 2 c keys per
window (c when RC == 1: no look-back), E the head dim (q, k and v share it; the caller pads).

``plan(buckets, valid, c, causal)`` (no autograd) sorts every round once and builds what the rest
reuses: the row of each sorted slot, the slot of each (round, position), and the additive mask of
each chunk's window (-inf = blocked). ``attend(q, k, v, plan, scale)`` is an autograd Function:

- forward: one gather of q, k and v into sorted slots (k and v with the last chunk copied in
  front, so that the window of chunk j, chunk j-1 then chunk j, is a strided view of one buffer:
  no look-back copy); one fused attention call over the (G, RC) chunks (torch's CPU
  flash-attention kernel, which keeps no score matrix; a matmul version elsewhere); the rounds
  combined by their log-sum-exp. Saves the sorted slots, the combined output and log-sum-exp.
- backward: the same kernel's backward on the saved slots with the combined output and
  log-sum-exp of each position (the rounds together are one softmax over the union of their
  windows, so dS = P (dO.v - dO.out) with P = exp(s - LSE)); window gradients folded back onto
  slots and summed over rounds by one gather each. Nothing is re-sorted or re-hashed.

Masks: without causal or padding (and with N % c == 0, c >= 2, C >= 2), every window has the same
mask, -inf on the own diagonal (a query never attends to itself: it always has other keys), passed
as one broadcast (c, W) tensor; only the first chunk of each round, whose look-back holds the
previous round, can meet its own position twice and is recomputed with its exact mask. Otherwise
the mask is built per chunk: causal (key position >= query position blocked), padding, empty slots,
and the self rule (a query that no round offers any other allowed key attends to itself only).
A slot row with no allowed key at all gets a finite mask row, weight zero in the combination and
zero gradient. Cost: O(R N c E) time, O(R N E) memory saved for backward (plus the per-chunk mask,
O(R N c), when it is not the broadcast one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
NEG_INF = float("-inf")


@dataclass(frozen=True)
class Plan:
    """Sorted order of every round and the masks of the chunk windows, for G (batch, head) pairs."""

    G: int
    R: int
    N: int
    c: int
    C: int
    rows: torch.Tensor                 # (G * R * Np,) row of (G * N) rows that each slot holds (0 for empty slots)
    win_rows: torch.Tensor | None      # (G * (c + R * Np),) rows of the key/value buffer (last chunk first); None if RC == 1
    slot_of: torch.Tensor              # (G, R * N) slot (of R * Np) of round r, position p
    slot_pos: torch.Tensor             # (G, R * Np) index r N + p of each slot's (round, position) (p clamped)
    slot_real: torch.Tensor | None     # (G, R * Np) bool, False for the empty slots that pad a round; None if none
    mask: torch.Tensor                 # (1, 1, c, W) broadcast or (G, RC, c, W) additive
    edge_mask: torch.Tensor | None     # (G, R, c, W): exact mask of the first chunk of each round (broadcast case)
    empty: torch.Tensor | None         # (G, R * Np) bool: slot rows with no allowed key (weight 0)

    @property
    def RC(self) -> int:
        return self.R * self.C

    @property
    def W(self) -> int:
        return 2 * self.c if self.RC > 1 else self.c


@torch.no_grad()
def plan(buckets: torch.Tensor, valid: torch.Tensor | None, c: int, causal: bool, dtype: torch.dtype) -> Plan:
    """buckets (G, R, N) int, valid (G, N) bool (True = real key) or None -> Plan."""
    G, R, N = buckets.shape
    dev = buckets.device
    C = -(-N // c)
    Np, RC = C * c, R * C
    W = 2 * c if RC > 1 else c
    perm = torch.sort(buckets, dim=-1, stable=True).indices             # (G, R, N): by (bucket, position)
    ar = torch.arange(N, device=dev)
    inv = torch.empty_like(perm).scatter_(2, perm, ar.expand(G, R, N))  # slot of position p in round r
    slot_of = (inv + (torch.arange(R, device=dev) * Np).view(1, R, 1)).view(G, R * N)
    if Np > N:
        perm = torch.cat([perm, perm.new_full((G, R, Np - N), N)], dim=-1)  # (G, R, Np), N = empty slot
    spos = perm.view(G, R * Np)
    base = (torch.arange(G, device=dev) * N).view(G, 1)
    real = spos.clamp(max=N - 1)
    rows = (real + base).reshape(-1)
    win_rows = None if RC == 1 else (torch.cat([real[:, -c:], real], dim=1) + base).reshape(-1)
    slot_pos = (real.view(G, R, Np) + (torch.arange(R, device=dev) * N).view(1, R, 1)).view(G, R * Np)
    slot_real = (spos < N) if Np > N else None
    fast = not causal and valid is None and Np == N and c >= 2 and C >= 2
    if fast:
        mask = torch.zeros(c, W, dtype=dtype, device=dev)
        mask.diagonal(offset=W - c).fill_(NEG_INF)                         # self, in the own chunk
        edge = None
        if R > 1:  # first chunk of each round: its look-back is the previous round's last chunk
            sp = spos.view(G, RC, c)
            first = torch.arange(R, device=dev) * C
            qp = sp[:, first]                                              # (G, R, c)
            kp = torch.cat([sp[:, (first - 1) % RC], qp], dim=-1)          # (G, R, W)
            edge = torch.zeros(G, R, c, W, dtype=dtype, device=dev).masked_fill_(
                kp.unsqueeze(-2) == qp.unsqueeze(-1), NEG_INF)             # c >= 2: every row keeps c - 1 keys
        return Plan(G, R, N, c, C, rows, win_rows, slot_of, slot_pos, slot_real, mask.view(1, 1, c, W), edge, None)
    sp = spos.view(G, RC, c)
    valid_e = torch.ones(G, N + 1, dtype=torch.bool, device=dev) if valid is None else \
        torch.cat([valid, valid.new_ones(G, 1)], dim=1)
    valid_e[:, N] = False                                                  # empty slots are never keys
    kok_slot = valid_e.gather(1, spos).view(G, RC, c)                      # (G, RC, c)
    lb = (lambda t: torch.cat([t.roll(1, dims=1), t], dim=-1)) if RC > 1 else (lambda t: t)
    kp, kok = lb(sp), lb(kok_slot)                                         # (G, RC, W)
    qp = sp.unsqueeze(-1)                                                  # (G, RC, c, 1)
    if causal:
        kp_eff = torch.where(kok, kp, N + 1)                               # blocked keys come after every query
        blocked = kp_eff.unsqueeze(-2) >= qp                               # (G, RC, c, W)
        has_other = kp_eff.amin(dim=-1, keepdim=True) < sp                 # (G, RC, c)
    else:
        blocked = (kp.unsqueeze(-2) == qp) | ~kok.unsqueeze(-2)
        has_other = ~blocked.all(dim=-1)
    # OR over a position's rounds as a uint8 amax: CUDA has no scatter_reduce for bool
    any_other = torch.zeros(G, N + 1, dtype=torch.uint8, device=dev)
    any_other.scatter_reduce_(1, spos, has_other.view(G, -1).to(torch.uint8), reduce="amax")
    self_needed = kok_slot & ~any_other.gather(1, spos).view(G, RC, c).bool()
    empty = ~has_other & ~self_needed | (sp == N)                         # (G, RC, c)
    mask = torch.where(blocked, torch.tensor(NEG_INF, dtype=dtype, device=dev),
                       torch.tensor(0.0, dtype=dtype, device=dev))                # (G, RC, c, W)
    if bool(self_needed.any()):
        mask.diagonal(offset=W - c, dim1=-2, dim2=-1).masked_fill_(self_needed, 0.0)
    has_empty = bool(empty.any())
    if has_empty:
        mask.masked_fill_(empty.unsqueeze(-1), 0.0)                        # finite row; its weight is set to 0
    return Plan(G, R, N, c, C, rows, win_rows, slot_of, slot_pos, slot_real, mask, None,
                empty.view(G, R * Np) if has_empty else None)


# ------------------------------------------------------------------------------- chunk attention


def _views(buf: torch.Tensor, p: Plan, E: int):
    """Slot buffer (G, [c +] R Np, 3E) of [q | k | v] rows -> q (G, RC, c, E) and the key and value
    windows (G, RC, W, E): strided views (window j = rows j c .. j c + W of the buffer), no copies."""
    G, RC, c, W = p.G, p.RC, p.c, p.W
    s0, row = buf.stride(0), buf.stride(1)
    lead = 0 if RC == 1 else c
    q = buf.as_strided((G, RC, c, E), (s0, c * row, row, 1), buf.storage_offset() + lead * row)
    k, v = (buf.as_strided((G, RC, W, E), (s0, c * row, row, 1), buf.storage_offset() + off) for off in (E, 2 * E))
    return q, k, v


def _scatter(x: torch.Tensor, dest: torch.Tensor, G: int, N: int) -> torch.Tensor:
    """Sum rows of x (G, K, L, E), in any dense layout, into positions: dest (G, K, L) is the row of
    (G N) each one adds to -> (G, N, E). One pass over x in its storage order, no (G, K, L, E) copy."""
    E = x.shape[-1]
    order = sorted(range(3), key=lambda d: -x.stride(d))
    if x.stride(3) != 1 or not x.permute(*order, 3).is_contiguous():
        x, order = x.contiguous(), [0, 1, 2]
    rows = x.permute(*order, 3).reshape(-1, E)                            # a view, storage order
    return x.new_zeros(G * N, E).index_add_(0, dest.permute(*order).reshape(-1), rows).view(G, N, E)


def _use_flash(x: torch.Tensor) -> bool:
    return _FLASH is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _fwd(q, k, v, mask, scale, flash):
    """q (G, K, c, E), k, v (G, K, W, E), mask broadcastable to (G, K, c, W) -> o (G, K, c, E), lse (G, K, c)."""
    if flash:
        o, lse = _FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return o, lse
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(mask)      # (G, K, c, W)
    lse = torch.logsumexp(s, dim=-1)                                       # rows always have a finite entry
    return torch.matmul(s.sub_(lse.unsqueeze(-1)).exp_(), v), lse


def _bwd(do, q, k, v, o, lse, mask, scale, flash):
    """Gradients of the chunk attention given the output o and log-sum-exp lse it is normalised by."""
    if flash:
        return _FLASH_BWD(do, q, k, v, o, lse, 0.0, False, attn_mask=mask, scale=scale)
    p = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(mask).sub_(lse.unsqueeze(-1)).exp_()  # (G, K, c, W)
    dv = torch.matmul(p.transpose(-1, -2), do)                             # (G, K, W, E)
    ds = torch.matmul(do, v.transpose(-1, -2)).sub_((do * o).sum(-1, keepdim=True)).mul_(p).mul_(scale)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


class _Attend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: Plan, scale: float):
        G, RC, c, C, N = p.G, p.RC, p.c, p.C, p.N
        E = q.shape[-1]
        flash = _use_flash(q)
        qkv = torch.cat([q, k, v], dim=-1).view(G * N, 3 * E)             # (G N, 3E)
        buf = qkv.index_select(0, p.rows if p.win_rows is None else p.win_rows).view(G, -1, 3 * E)
        qs, kw, vw = _views(buf, p, E)                                     # one gather for all three
        o, lse = _fwd(qs, kw, vw, p.mask, scale, flash)                    # (G, RC, c, E), (G, RC, c)
        if p.edge_mask is not None:
            oe, le = _fwd(qs[:, ::C], kw[:, ::C], vw[:, ::C], p.edge_mask, scale, flash)
            o[:, ::C], lse[:, ::C] = oe, le
        lse = lse.reshape(G, RC * c)
        if p.empty is not None:
            lse = lse.masked_fill(p.empty, NEG_INF)
        lse_r = lse.gather(1, p.slot_of).view(G, p.R, N)                   # (G, R, N) per round, by position
        top = lse_r.amax(dim=1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.exp(lse_r - top)                                          # (G, R, N)
        den = w.sum(dim=1, keepdim=True)
        w = w / torch.where(den > 0, den, torch.ones_like(den))
        big = torch.where(den > 0, torch.log(den) + top, torch.full_like(den, float("inf")))  # (G, 1, N)
        w_slot = w.view(G, p.R * N).gather(1, p.slot_pos)                   # (G, R Np) weight of each slot
        if p.slot_real is not None:
            w_slot = w_slot * p.slot_real
        out = _scatter(o.mul_(w_slot.view(G, RC, c, 1)), p.rows.view(G, RC, c), G, N)  # (G, N, E)
        ctx.save_for_backward(buf, out, big.view(G, N))
        ctx.plan, ctx.scale, ctx.flash = p, scale, flash
        return out

    @staticmethod
    def backward(ctx, dout):
        buf, out, big = ctx.saved_tensors
        p, scale, flash = ctx.plan, ctx.scale, ctx.flash
        G, RC, c, C, N, E = p.G, p.RC, p.c, p.C, p.N, out.shape[-1]
        qs, kw, vw = _views(buf, p, E)
        # dO in the kernel's preferred layout (G, c, RC, E) (else it copies it); O and LSE per slot
        rows_t = p.rows.view(G, RC, c).transpose(1, 2).reshape(-1)
        do_s = dout.reshape(G * N, E).index_select(0, rows_t).view(G, c, RC, E).transpose(1, 2)  # (G, RC, c, E)
        o_s = out.reshape(G * N, E).index_select(0, p.rows).view(G, RC, c, E)
        lse_s = big.reshape(G * N).index_select(0, p.rows).view(G, RC, c)
        if p.empty is not None:  # rows with no allowed key: no gradient (P = exp(s - inf) = 0)
            empty = p.empty.view(G, RC, c)
            lse_s = lse_s.masked_fill(empty, float("inf"))
            do_s.masked_fill_(empty.unsqueeze(-1), 0.0)
        if p.edge_mask is not None:
            do_e = do_s[:, ::C].clone()
            do_s[:, ::C] = 0.0  # the broadcast mask is wrong for these chunks: they are done below
        dq, dkw, dvw = _bwd(do_s, qs, kw, vw, o_s, lse_s, p.mask, scale, flash)
        if p.edge_mask is not None:
            eq, ek, ev = _bwd(do_e, qs[:, ::C], kw[:, ::C], vw[:, ::C], o_s[:, ::C], lse_s[:, ::C], p.edge_mask,
                              scale, flash)
            dq[:, ::C] += eq
            dkw[:, ::C] += ek
            dvw[:, ::C] += ev
        dest = p.rows.view(G, RC, c)                                        # position row of each slot
        dq = _scatter(dq, dest, G, N)                                        # (G, N, E)
        if RC > 1:  # a slot's key is in its own window (second half) and in the next chunk's look-back
            dest = torch.cat([dest.roll(1, dims=1), dest], dim=-1)         # (G, RC, W)
        dk, dv = _scatter(dkw, dest, G, N), _scatter(dvw, dest, G, N)
        return dq, dk, dv, None, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Plan, scale: float) -> torch.Tensor:
    """q, k, v (G, N, E) in the original order (k already normalised) -> out (G, N, E), one softmax per
    position over the union of its rounds' windows."""
    return _Attend.apply(q, k, v, p, scale)
