"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), parallel and recurrent.

Legend: B batch, Hq query heads, Hk key/value heads (Hq % Hk == 0), Nq queries, Nk keys,
D head dim, Dv value dim, F feature dim of phi, C chunk length, T number of chunks.

    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i),  S_i = sum_{j allowed} phi(k_j) v_j^T  (F, Dv),
                                                z_i = sum_{j allowed} phi(k_j)        (F,)

Non-causal: S and z are the same for every query: O(N F Dv) time, O(N + F Dv) memory.
Causal (bottom-right: query i sits at key position i + Nk - Nq): the chunked parallel form,
quadratic inside a chunk of C positions and a carried (F, Dv) state and (F,) normaliser across
chunks: O(N C (F + Dv) + N F Dv) time, O(N (F + Dv) + (N / C) F Dv) memory (linear in N, also
under autograd). ``linear_attention_step`` is the recurrent form for decoding (one state update
per token); it gives the same numbers as the parallel form.

Masks: padded keys are excluded from both the numerator and the normaliser (their features
and values are zeroed). Only masks that factorise through the key sums can be honoured:
key padding, causal, and their intersection. Anything else (sliding windows, documents,
arbitrary bool masks with a query dimension) raises with the reason. A query with no allowed
key returns zeros and gets zero gradient. Half/bfloat16 inputs are computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from .._numerics import compute_dtype, expand_kv
from ..caches import RecurrentState
from .base import Variant, check_bool, pos_int, split_key_mask

_REASON = ("linear attention sums phi(k_j) v_j^T over keys once for all queries (or as a prefix sum "
           "when causal), so it can honour only masks that depend on the key alone (padding), causal, "
           "or both")


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, elementwise (B, H, N, D) -> (B, H, N, D). Katharopoulos et al. 2020."""
    return F.elu(x).add_(1.0)  # in place: elu's backward reads its input, not its output


FEATURE_MAPS = {"elu+1": elu_plus_one}


def feature_map_fn(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    """A feature map given by name (``"elu+1"``) or as a callable."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
        return FEATURE_MAPS[feature_map]
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a name ({sorted(FEATURE_MAPS)}) or a callable, "
                        f"got {type(feature_map).__name__}")
    return feature_map


# ---------------------------------------------------------------------------------------------
# State for decoding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearState:
    """Running sums after ``length`` keys: kv = sum phi(k_j) v_j^T (B, H, F, Dv), k_sum = sum phi(k_j) (B, H, F).

    H is the number of query heads (key/value heads are expanded for grouped-query attention).
    Sums are kept in the compute dtype (float32 for half/bfloat16 inputs).
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    length: int

    @staticmethod
    def zeros(batch: int, heads: int, feat_dim: int, value_dim: int, *, dtype=torch.float32, device=None):
        return LinearState(torch.zeros(batch, heads, feat_dim, value_dim, dtype=dtype, device=device),
                           torch.zeros(batch, heads, feat_dim, dtype=dtype, device=device), 0)

    def scaled(self, factor: torch.Tensor) -> LinearState:
        """The state times factor (B, H) (used by Performer to move its key stabiliser)."""
        return LinearState(self.kv * factor[..., None, None], self.k_sum * factor[..., None], self.length)


# ---------------------------------------------------------------------------------------------
# Core on features (shared with Performer)
# ---------------------------------------------------------------------------------------------


def _normalise(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    """num (..., Dv) / (den (...) + eps); rows with den == 0 (no allowed key) give 0 and zero grad."""
    ok = den > 0
    if bool(ok.all()):  # the common case: one division, no extra (N, Dv) temporaries
        return num / (den + eps).unsqueeze(-1)
    safe = torch.where(ok, den + eps, torch.ones_like(den))
    return torch.where(ok.unsqueeze(-1), num / safe.unsqueeze(-1), torch.zeros_like(num))


def _safe_reciprocal(den: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """1 / (den + eps) for den >= 0, and 0 where den + eps == 0 (a query with no allowed key: its
    numerator is 0 too, so its output is 0, and every gradient term of that row is multiplied by a
    zero feature). Two ops: the reciprocal and an in-place inf -> 0."""
    return (den + eps if eps else den).reciprocal().nan_to_num_(nan=0.0, posinf=0.0)


def _check_state(state: LinearState | None, phi_q: torch.Tensor, dv: int) -> None:
    if state is None:
        return
    B, H, _, Fd = phi_q.shape
    if tuple(state.kv.shape) != (B, H, Fd, dv) or tuple(state.k_sum.shape) != (B, H, Fd):
        raise ValueError(f"state has kv {V.shape_str(state.kv)} and k_sum {V.shape_str(state.k_sum)}; "
                         f"expected (B, Hq, F, Dv) = {(B, H, Fd, dv)} and (B, Hq, F) = {(B, H, Fd)}")


def _into(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of ``shape`` in the storage of ``buf`` when it is large enough (reusing a
    dead intermediate instead of faulting in fresh pages), else a new one."""
    n = math.prod(shape)
    if buf.is_contiguous() and buf.numel() >= n:
        return buf.view(-1)[:n].view(shape)
    return buf.new_empty(shape)


def _exclusive_prefix(x: torch.Tensor, first: torch.Tensor | None, reverse: bool = False) -> torch.Tensor:
    """x (BH, T, F, W) -> P (BH, T, F, W) with P[:, t] = first + sum of x[:, t'] over t' < t (t' > t if reverse).

    Two-level scan by matmuls with 0/1 triangular matrices: within blocks of b ~ sqrt(T) chunk
    states, then across the T / b block totals; a handful of ops whatever T (a Python loop over T
    costs an op per chunk, and torch.cumsum over a middle dim is several times a copy on CPU).
    """
    BH, T = x.shape[:2]
    shape = x.shape
    b = max(1, math.isqrt(T - 1) + 1) if T > 1 else 1
    nb = -(-T // b)
    xf = x.reshape(BH, T, -1)                                             # (BH, T, X)
    if nb * b > T:
        xf = F.pad(xf, (0, 0, 0, nb * b - T))                            # zero states add nothing
    xb = xf.view(BH, nb, b, -1)                                           # (BH, nb, b, X)
    tri_b = torch.ones(nb, nb, dtype=x.dtype, device=x.device)
    tri_b = tri_b.triu(1) if reverse else tri_b.tril(-1)                  # strict: exclusive
    off = torch.bmm(tri_b.expand(BH, nb, nb), xb.sum(dim=2))             # (BH, nb, X) sums of the other blocks
    if first is not None:
        off += first.reshape(BH, 1, -1)
    tri = torch.ones(b, b, dtype=x.dtype, device=x.device)
    tri = tri.triu(1) if reverse else tri.tril(-1)
    within = torch.baddbmm(off.view(BH * nb, 1, -1), tri.expand(BH * nb, b, b), xb.reshape(BH * nb, b, -1))
    out = within.view(BH, nb * b, -1)
    return (out[:, :T].contiguous() if nb * b > T else out).view(shape)


def _prefix_states(k: torch.Tensor, w: torch.Tensor, s0: torch.Tensor | None, bh: int) -> torch.Tensor:
    """k (bh T, C, F), w (bh T, C, W), s0 (bh, F, W) or None -> P (bh T, F, W), P_t = s0 + sum_{t' < t} K_t'^T W_t'.

    Each chunk's K^T W is written one slot later, then a cumsum in place over the T chunks of each row."""
    n, _, Fd = k.shape
    Dw, T = w.shape[-1], n // bh
    p = k.new_empty(n, Fd, Dw)                                            # (bh T, F, W)
    if n > 1:
        torch.bmm(k[:-1].transpose(1, 2), w[:-1], out=p[1:])
    p4 = p.view(bh, T, Fd, Dw)
    if s0 is None:
        p4[:, 0].zero_()  # also drops the previous row's last chunk written there
    else:
        p4[:, 0].copy_(s0)
    p4.view(bh, T, Fd * Dw).cumsum_(dim=1)
    return p


# backward temporaries per slice of heads: about this many elements per (slice, C, W) buffer
_BACKWARD_SLICE_ELEMENTS = 1 << 21


class _CausalLinear(torch.autograd.Function):
    """Causal linear attention on features, chunked, with a hand-written backward.

    pq, pk (B, H, L, F) >= 0, va = [v | 1] (B, H, L, Dv + 1) (rows of padded keys zero, ones column
    included), s0 (B, H, F, Dv + 1) the sums of earlier keys or None. Query i sees keys j <= i.
    Per chunk t of C positions (the tail padded with zero rows):
        S_t = K_t^T Va_t,  P_t = s0 + sum_{t' < t} S_t'  (``_prefix_states``),
        A_t = tril(Q_t K_t^T),  [num | den] = Q_t P_t + A_t Va_t   (numerator and normaliser together),
        out = num / (den + eps), 0 where den = 0.
    Returns out (B, H, L, Dv) and the final sums s0 + sum_t S_t (B, H, F, Dv + 1) (None unless want_final).
    Backward, with G = [dout / (den + eps) | -(dout . out) / (den + eps)], dA = tril(G Va^T) and
    R_t = dfinal + sum_{t' > t} Q_t'^T G_t' (reverse exclusive prefix, ``_exclusive_prefix``):
        dQ = G P^T + dA K,  dK = Va R^T + dA^T Q,  dVa = K R + A^T G,  ds0 = R_0 + Q_0^T G_0.
    Saves Q, K, Va, 1 / (den + eps) and out (no O(N C) or O(N F Dv / C) intermediates); the backward
    recomputes P and A and runs over slices of heads, so its temporaries stay a few MiB whatever N:
    memory O(N (F + Dv)), 4 batched matmuls forward, 10 backward (2 of them the recompute).
    """

    @staticmethod
    def forward(ctx, pq, pk, va, s0, chunk: int, eps: float, want_final: bool):
        B, H, L, Fd = pq.shape
        Dw = va.shape[-1]
        C = max(1, min(chunk, L))
        T = -(-L // C)
        pad = T * C - L
        if pad:  # zero keys add nothing; zero queries get den = 0 and are cut off
            pq, pk, va = (F.pad(t, (0, 0, 0, pad)) for t in (pq, pk, va))
        n = B * H * T
        q, k, w = pq.reshape(n, C, Fd), pk.reshape(n, C, Fd), va.reshape(n, C, Dw)  # (B H T, C, .)
        s0r = None if s0 is None else s0.reshape(B * H, Fd, Dw)
        p = _prefix_states(k, w, s0r, B * H)                              # (B H T, F, Dv + 1)
        final = None
        if want_final:
            p4 = p.view(B * H, T, Fd, Dw)
            kl, wl = k.view(B * H, T, C, Fd)[:, -1], w.view(B * H, T, C, Dw)[:, -1]
            final = torch.baddbmm(p4[:, -1], kl.transpose(1, 2), wl).view(B, H, Fd, Dw)
        nd = torch.bmm(q, p)                                                # (B H T, C, Dv + 1)
        a = torch.bmm(q, k.transpose(1, 2), out=_into(p, (n, C, C))).tril_()  # (B H T, C, C) in P's storage
        nd.baddbmm_(a, w)
        nd = nd.view(B, H, T * C, Dw)[:, :, :L]                             # (B, H, L, Dv + 1)
        inv = _safe_reciprocal(nd[..., -1], eps)                            # (B, H, L)
        out = nd[..., :-1].mul_(inv.unsqueeze(-1))                          # (B, H, L, Dv), in place (a view)
        if any(ctx.needs_input_grad[:4]):
            ctx.save_for_backward(q, k, w, inv, out, s0r)
        ctx.has_s0 = s0 is not None
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, w, inv, out, s0 = ctx.saved_tensors
        B, H, L, Dv = out.shape
        n, C, Fd = q.shape
        BH, Dw = B * H, Dv + 1
        T = n // BH
        dq, dk, dw = q.new_empty(n, C, Fd), q.new_empty(n, C, Fd), q.new_empty(n, C, Dw)
        ds0 = q.new_empty(BH, Fd, Dw) if ctx.has_s0 else None
        inv, out = inv.reshape(BH, L, 1), out.reshape(BH, L, Dv)
        dout = None if dout is None else dout.reshape(BH, L, Dv)
        dfinal = None if dfinal is None else dfinal.reshape(BH, Fd, Dw)
        step = max(1, _BACKWARD_SLICE_ELEMENTS // (T * C * max(Fd, Dw, C)))  # heads per slice
        for h0 in range(0, BH, step):
            h1 = min(BH, h0 + step)
            rows = slice(h0 * T, h1 * T)
            qs, ks, ws = q[rows], k[rows], w[rows]                          # (hs T, C, .)
            g = q.new_zeros(h1 - h0, T * C, Dw)                             # [dnum | dden], zero past L
            if dout is not None:
                torch.mul(dout[h0:h1], inv[h0:h1], out=g[:, :L, :Dv])
                g[:, :L, Dv] = (dout[h0:h1] * out[h0:h1]).sum(dim=-1).mul_(inv[h0:h1, :, 0]).neg_()
            g = g.view(-1, C, Dw)                                           # (hs T, C, Dv + 1)
            p = _prefix_states(ks, ws, None if s0 is None else s0[h0:h1], h1 - h0)
            da = torch.bmm(g, ws.transpose(1, 2)).tril_()                   # (hs T, C, C)
            torch.bmm(g, p.transpose(1, 2), out=dq[rows]).baddbmm_(da, ks)
            qg = torch.bmm(qs.transpose(1, 2), g, out=p).view(h1 - h0, T, Fd, Dw)  # P is dead: its storage
            r = _exclusive_prefix(qg, None if dfinal is None else dfinal[h0:h1], reverse=True)
            if ds0 is not None:
                torch.add(r[:, 0], qg[:, 0], out=ds0[h0:h1])
            r = r.view(-1, Fd, Dw)                                          # (hs T, F, Dv + 1)
            torch.bmm(ws, r.transpose(1, 2), out=dk[rows]).baddbmm_(da.transpose(1, 2), qs)
            a = torch.bmm(qs, ks.transpose(1, 2), out=da).tril_()           # A, in dA's storage
            torch.bmm(ks, r, out=dw[rows]).baddbmm_(a.transpose(1, 2), g)
        cut = lambda x: x.view(B, H, T * C, x.shape[-1])[:, :, :L]  # noqa: E731
        return cut(dq), cut(dk), cut(dw), None if ds0 is None else ds0.view(B, H, Fd, Dw), None, None, None


def linear_attention_features(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                              key_valid: torch.Tensor | None = None, chunk_size: int = 64, eps: float = 0.0,
                              state: LinearState | None = None, return_state: bool = False):
    """Linear attention on precomputed features (the core that elu+1 and Performer share).

    phi_q (B, Hq, Nq, F) >= 0, phi_k (B, Hk, Nk, F) >= 0, v (B, Hk, Nk, Dv); key_valid (B', H', Nk)
    bool with H' in {1, Hq}. ``state`` (from a previous call or ``LinearState.zeros``) holds keys
    that precede these; with a state, causal calls need Nq == Nk. Returns out (B, Hq, Nq, Dv) in
    the compute dtype, and the new state when ``return_state``. Cost: see the module docstring.
    """
    B, Hq, Nq, Fd = phi_q.shape
    Hk, Nk = phi_k.shape[1], phi_k.shape[2]
    Dv = v.shape[-1]
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be an int > 0, got {chunk_size!r}")
    if phi_k.shape[-1] != Fd:
        raise ValueError(f"phi(q) has {Fd} features but phi(k) has {phi_k.shape[-1]}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    _check_state(state, phi_q, Dv)
    if causal and state is not None and Nq != Nk:
        raise ValueError(f"causal linear attention with a state needs Nq == Nk (one query per new key), got {Nq} and {Nk}")
    pk = expand_kv(phi_k, Hq // Hk)                               # (B, Hq, Nk, F)
    ones = torch.ones((), dtype=v.dtype, device=v.device).expand(*v.shape[:-1], 1)
    va = expand_kv(torch.cat([v, ones], dim=-1), Hq // Hk)          # (B, Hq, Nk, Dv + 1): [v | 1]
    if key_valid is not None:
        valid = key_valid.unsqueeze(-1)                               # (B', H', Nk, 1)
        pk = torch.where(valid, pk, torch.zeros((), dtype=pk.dtype, device=pk.device))
        va = torch.where(valid, va, torch.zeros((), dtype=va.dtype, device=va.device))
    if state is None:
        s0 = None
        length0 = 0
    else:  # [kv | k_sum]
        s0 = torch.cat([state.kv.to(phi_q.dtype), state.k_sum.to(phi_q.dtype).unsqueeze(-1)], dim=-1)
        length0 = state.length
    if not causal:
        s = torch.matmul(pk.transpose(-1, -2), va)                    # (B, Hq, F, Dv + 1): [kv | z]
        if s0 is not None:
            s = s + s0
        nd = torch.matmul(phi_q, s)                                   # (B, Hq, Nq, Dv + 1): [num | den]
        out = _normalise(nd[..., :Dv], nd[..., Dv], eps)
    else:
        off = Nk - Nq
        if off > 0:  # keys before the first query: every query sees them
            pre = torch.matmul(pk[:, :, :off].transpose(-1, -2), va[:, :, :off])    # (B, Hq, F, Dv + 1)
            s0 = pre if s0 is None else s0 + pre
        lead = max(0, -off)  # queries before the first key see nothing (bottom-right alignment)
        out, s = _CausalLinear.apply(phi_q[:, :, lead:], pk[:, :, max(off, 0):], va[:, :, max(off, 0):], s0,
                                     chunk_size, float(eps), return_state)  # (B, Hq, Nq - lead, Dv)
        if lead:
            out = torch.cat([out.new_zeros(B, Hq, lead, Dv), out], dim=2)  # (B, Hq, Nq, Dv)
    if return_state:
        return out, LinearState(s[..., :Dv], s[..., Dv], length0 + Nk)
    return out


def linear_step_features(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, state: LinearState, *,
                         eps: float = 0.0) -> tuple[torch.Tensor, LinearState]:
    """Recurrent form, one token at a time: phi_q (B, Hq, T, F), phi_k (B, Hk, T, F), v (B, Hk, T, Dv).

    For t in 0..T-1: S += phi(k_t) v_t^T, z += phi(k_t), out_t = phi(q_t) S / (phi(q_t) z).
    Cost O(F Dv) time and memory per token.
    """
    B, Hq, T, Fd = phi_q.shape
    if phi_k.shape[2] != T or v.shape[2] != T:
        raise ValueError(f"step needs as many keys as queries, got Nq={T}, Nk={phi_k.shape[2]}")
    _check_state(state, phi_q, v.shape[-1])
    pk = expand_kv(phi_k, Hq // phi_k.shape[1])                  # (B, Hq, T, F)
    vv = expand_kv(v, Hq // v.shape[1])                          # (B, Hq, T, Dv)
    kv, z = state.kv.to(phi_q.dtype), state.k_sum.to(phi_q.dtype)
    outs = []
    for t in range(T):
        kv = kv + pk[:, :, t, :, None] * vv[:, :, t, None, :]         # (B, Hq, F, Dv)
        z = z + pk[:, :, t]                                           # (B, Hq, F)
        q_t = phi_q[:, :, t]                                          # (B, Hq, F)
        num = torch.einsum("bhf,bhfe->bhe", q_t, kv)                  # (B, Hq, Dv)
        den = (q_t * z).sum(dim=-1)                                   # (B, Hq)
        outs.append(_normalise(num, den, eps))
    return torch.stack(outs, dim=2), LinearState(kv, z, state.length + T)  # (B, Hq, T, Dv)


# ---------------------------------------------------------------------------------------------
# Public functions on q, k, v
# ---------------------------------------------------------------------------------------------


def _features(feature_map, x: torch.Tensor, name: str) -> torch.Tensor:
    out = feature_map_fn(feature_map)(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[:3] != x.shape[:3]:
        got = V.shape_str(out) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"feature_map({name}) must return (B, H, N, F) for {name} of shape {V.shape_str(x)}, got {got}")
    if not isinstance(feature_map, str) and bool((out < 0).any()):  # the named maps are >= 0 by construction
        raise ValueError(f"feature_map({name}) returned negative values (min {float(out.min()):.3g}); linear "
                         "attention needs phi >= 0 so that its normaliser stays positive (e.g. elu(x) + 1)")
    return out


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu+1", causal: bool = False,
                     mask=None, chunk_size: int = 64, eps: float = 0.0, state: LinearState | None = None,
                     return_state: bool = False):
    """Linear attention out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j) (Katharopoulos et al. 2020).

    Args:
        q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), Hq a multiple of Hk.
        feature_map: "elu+1" (elu(x) + 1, no scale) or a callable (B, H, N, D) -> (B, H, N, F)
            with non-negative outputs.
        causal: bottom-right aligned (query i at key position i + Nk - Nq).
        mask: as ``attnkit.attention`` (a spec or a bool tensor, True = may attend), restricted
            to what linear attention can honour: ``masks.causal()``, key padding
            (``masks.key_padding``, ``key_padding_from_bool``, a bool (B, 1, 1, Nk) tensor) and
            their ``&``. Other masks raise (see the module docstring).
        chunk_size: C for the causal chunked form (quadratic within a chunk).
        eps: added to a positive normaliser (the paper's code uses 1e-6); default 0.
        state / return_state: continue from / return a ``LinearState`` (prefill before ``linear_attention_step``).

    Returns out (B, Hq, Nq, Dv) in q's dtype (and the state). Cost O(N F Dv) time non-causal,
    O(N C (F + Dv) + N F Dv) causal; memory linear in N in both (forward and backward).
    """
    V.check_qkv(q, k, v)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    is_causal, valid = split_key_mask(mask, batch=B, heads=Hq, nq=Nq, nk=Nk, device=q.device,
                                      variant="linear attention", reason=_REASON)
    ct = compute_dtype(q.dtype)
    phi_q = _features(feature_map, q.to(ct), "q")                     # (B, Hq, Nq, F)
    phi_k = _features(feature_map, k.to(ct), "k")                     # (B, Hk, Nk, F)
    res = linear_attention_features(phi_q, phi_k, v.to(ct), causal=causal or is_causal, key_valid=valid,
                                    chunk_size=chunk_size, eps=eps, state=state, return_state=return_state)
    if return_state:
        return res[0].to(q.dtype), res[1]
    return res.to(q.dtype)


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState | None = None, *,
                          feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu+1",
                          eps: float = 0.0) -> tuple[torch.Tensor, LinearState]:
    """Decode T >= 1 new tokens recurrently (causal): q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv).

    Returns (out (B, Hq, T, Dv), new state). state=None starts from no keys. Equal to the causal
    parallel form over the whole sequence. Cost O(F Dv) per token, independent of the position.
    """
    V.check_qkv(q, k, v)
    ct = compute_dtype(q.dtype)
    phi_q = _features(feature_map, q.to(ct), "q")                     # (B, Hq, T, F)
    phi_k = _features(feature_map, k.to(ct), "k")                     # (B, Hk, T, F)
    if state is None:
        state = LinearState.zeros(q.shape[0], q.shape[1], phi_q.shape[-1], v.shape[-1], dtype=ct, device=q.device)
    out, state = linear_step_features(phi_q, phi_k, v.to(ct), state, eps=eps)
    return out.to(q.dtype), state


# ---------------------------------------------------------------------------------------------
# Variant spec and module core
# ---------------------------------------------------------------------------------------------


class RecurrentVariant(Variant):
    """A variant with a ``causal`` field whose causal form decodes with a RecurrentState (the
    carried key sums): linear attention and Performer."""

    causal: bool = False

    def causal_version(self) -> RecurrentVariant:
        return dataclasses.replace(self, causal=True)

    def decode_reason(self) -> str | None:
        return None if self.causal else f"{type(self).__name__}(causal=False) has no recurrent form; use causal=True"

    def make_cache(self, **_):
        return RecurrentState()

    def check_cache(self, cache) -> None:
        reason = self.decode_reason()
        if reason:
            raise ValueError(f"cache={type(cache).__name__} given, but {reason}")
        if not isinstance(cache, RecurrentState):
            raise TypeError(f"{type(self).__name__} attention decodes with a RecurrentState, got {type(cache).__name__}")



@dataclass(frozen=True)
class Linear(RecurrentVariant):
    """Linear attention (Katharopoulos et al. 2020): phi(q) (phi(k)^T v), phi = elu + 1.

    causal=True runs the chunked prefix form and decodes with a RecurrentState. Masks: key
    padding (and causal). Cost O(N D^2).
    """

    feature_map: str | Callable = "elu+1"
    causal: bool = False
    chunk_size: int = 64

    name = "linear"

    def __post_init__(self):
        feature_map_fn(self.feature_map)
        check_bool("Linear", "causal", self.causal)
        pos_int("Linear", "chunk_size", self.chunk_size)

    def build_core(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return LinearCore(self)


class LinearCore(nn.Module):
    """``linear_attention`` on projected heads; with a RecurrentState it carries the key sums."""

    def __init__(self, spec: Linear):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, *, mask, bias, dropout_p, need_weights, cache, query_valid=None):
        s = self.spec
        if cache is None:
            return linear_attention(q, k, v, feature_map=s.feature_map, causal=s.causal, mask=mask,
                                    chunk_size=s.chunk_size), None
        out, cache.state = linear_attention(q, k, v, feature_map=s.feature_map, causal=True, mask=mask,
                                            chunk_size=s.chunk_size, state=cache.state, return_state=True)
        return out, None


__all__ = ["linear_attention", "linear_attention_step", "linear_attention_features", "linear_step_features",
           "LinearState", "elu_plus_one", "feature_map_fn", "RecurrentVariant", "Linear", "LinearCore"]
