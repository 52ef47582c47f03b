"""The non-finite rule of ``attnkit.attention``, the same for every backend, and the score range.

Legend: B batch, Hq query heads, Hk key/value heads (G = Hq // Hk), Nq queries, Nk keys,
D head dim, Dv value dim.

The rule (docs/index.md, "NaN and infinity"):

1. Query row i reads q_i and, for each key j the mask allows it, k_j, v_j and bias[i, j]. Masked
   keys never contribute: NaN or +-inf in a masked key's k or v, or in a masked bias entry,
   changes nothing.
2. A row that reads a non-finite q, k or v entry returns NaN (the whole row; its weights too).
   NaN in a bias entry it reads propagates the same way; -inf in a bias blocks the pair; +inf in
   a bias tensor is rejected before any backend runs.
3. A row with no allowed key returns zeros, whatever its q holds.

Kernels cannot follow 1 on their own: a masked key still meets a zero weight in ``p @ v``
(0 * NaN = NaN), and sdpa's fused kernel turns a NaN query row into zeros. So the dispatch point
applies the rule around whichever backend runs: finite inputs (one min/max pass over q, k, v, which ``make_call``
also uses to check that the scores fit the compute dtype; keys and values from a decoding cache
carry the stats the cache took when it wrote them, so a step costs O(new tokens), not a rescan)
run as they are.
Otherwise the backend runs on inputs whose non-finite entries are replaced by 0, the rows that
read one are found from the mask (evaluated only at those rows and those keys, in chunks), and
NaN is added to their output, so a loss over them is NaN and gradients flow as for any NaN output.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._numerics import compute_dtype, expand_kv

# Score elements (B * Hq * rows * keys) of one chunk of mask evaluation in ``poisoned_rows``.
_CHUNK_ELEMENTS = 1 << 22


# Attribute under which a tensor may carry (version, all finite, max |entry|) from whoever wrote it
# (the decoding caches check each token once, on write): ``input_stats`` trusts it while the
# tensor's version counter is unchanged, so a decoding step does not rescan the whole cache.
_STATS = "_attnkit_stats"


def _version(t: torch.Tensor) -> int | None:
    """The version counter (bumped by every in-place edit); None for inference-mode tensors, which
    have none: their stats are trusted as written (a cache returns them straight to attention)."""
    return None if t.is_inference() else t._version


def remember_stats(t: torch.Tensor, finite: bool, max_abs: float) -> torch.Tensor:
    """Attach what is known about t's entries (finite must be certain; max_abs an upper bound)."""
    setattr(t, _STATS, (_version(t), bool(finite), float(max_abs)))
    return t


def tensor_stats(*ts: torch.Tensor) -> list[tuple[bool, float]]:
    """(every entry finite, max |entry| over finite entries) of each tensor: remembered stats where
    valid, else one min/max pass (one host sync for all of them on the common, finite path)."""
    known = [getattr(t, _STATS, None) for t in ts]
    known = [k if k is not None and k[0] == _version(t) else None for k, t in zip(known, ts)]
    todo = [t.detach() for t, k in zip(ts, known) if k is None]
    stats = []
    for t in todo:
        mn, mx = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        stats += [mn.to(torch.float64), mx.to(torch.float64)]
    vals = torch.stack(stats).tolist() if stats else []
    out, i = [], 0
    for t, k in zip(ts, known):
        if k is not None:
            out.append((k[1], k[2]))
            continue
        mn, mx = vals[2 * i], vals[2 * i + 1]
        i += 1
        if math.isfinite(mn) and math.isfinite(mx):
            out.append((True, max(abs(mn), abs(mx))))
        else:  # rare: the largest finite magnitude, for the score-range check
            out.append((False, float(_zeroed(t.detach()).abs().amax()) if t.numel() else 0.0))
    return out


def input_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, float, float]:
    """(every entry of q, k, v finite, max |q|, max |k| over finite entries)."""
    (fq, mq), (fk, mk), (fv, _) = tensor_stats(q, k, v)
    return fq and fk and fv, mq, mk


def check_score_range(q: torch.Tensor, max_q: float, max_k: float, scale: float, name_scale: bool,
                      k: torch.Tensor | None = None) -> None:
    """Raise a ValueError when scale * q.k can overflow the compute dtype (|q.k| <= D max|q| max|k|),
    which would turn the softmax into NaN."""
    D = q.shape[-1]
    ct = compute_dtype(q.dtype)
    bound = D * max_q * max_k * scale
    limit = torch.finfo(ct).max
    if bound > limit and k is not None:  # remembered magnitudes are upper bounds: measure before raising
        max_q, max_k = (float(_zeroed(t.detach()).abs().amax()) if t.numel() else 0.0 for t in (q, k))
        bound = D * max_q * max_k * scale
    if bound > limit:
        what = f"scale={scale:g}" if name_scale else f"the inputs (scale={scale:g})"
        raise ValueError(
            f"{what} can overflow the scores in {ct}: D * max|q| * max|k| * scale = {D} * {max_q:.3g} * {max_k:.3g} "
            f"* {scale:.3g} = {bound:.3g} > {limit:.3g}, which would make the softmax NaN; use a smaller scale "
            "(default 1/sqrt(D)) or normalise q and k"
        )


def _zeroed(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def poisoned_rows(call, bad_q: torch.Tensor, bad_kv: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Nq) bool: rows that read a non-finite entry. bad_q (B, Hq, Nq): rows whose q is not
    finite; bad_kv (B, Hk, Nk): keys whose k or v is not finite. A row reads key j when the mask
    allows (i, j); a row with a bad q counts only if it has an allowed key (rule 3)."""
    B, Hq, Hk, Nq, Nk, D = call.shape
    bad_kv = expand_kv(bad_kv.unsqueeze(-1), Hq // Hk).squeeze(-1)  # (B, Hq, Nk)
    if call.mask is None:
        return bad_q | bad_kv.any(dim=-1, keepdim=True)
    dev = call.q.device
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, -1, 1, 1)
    qpos = torch.arange(Nq, device=dev) + (Nk - Nq)  # key coordinates
    kpos = torch.arange(Nk, device=dev)
    poison = torch.zeros(B, Hq, Nq, dtype=torch.bool, device=dev)

    def allowed(qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:  # (B, Hq, len(qi), len(kj))
        a = call.mask.allows(b, h, qi.view(1, 1, -1, 1), kj.view(1, 1, 1, -1), num_keys=Nk)
        return torch.broadcast_to(a, (B, Hq, qi.numel(), kj.numel()))

    rows = torch.nonzero(bad_q.any(dim=(0, 1))).flatten()  # query rows with a bad q somewhere
    for r in rows.split(max(1, _CHUNK_ELEMENTS // (B * Hq * Nk))):
        poison[:, :, r] |= bad_q[:, :, r] & allowed(qpos[r], kpos).any(dim=-1)
    cols = torch.nonzero(bad_kv.any(dim=(0, 1))).flatten()  # keys with a bad k or v somewhere
    for c in cols.split(max(1, _CHUNK_ELEMENTS // (B * Hq * max(Nq, 1)))):
        poison |= (allowed(qpos, kpos[c]) & bad_kv[:, :, None, c]).any(dim=-1)
    return poison


def run(backend, call):
    """``backend.run(call)`` under the rule above."""
    if call.inputs_finite:
        return backend.run(call)
    q, k, v = call.q, call.k, call.v
    bad_q = ~torch.isfinite(q.detach()).all(dim=-1)  # (B, Hq, Nq)
    bad_kv = ~(torch.isfinite(k.detach()).all(dim=-1) & torch.isfinite(v.detach()).all(dim=-1))  # (B, Hk, Nk)
    poison = poisoned_rows(call, bad_q, bad_kv)
    clean = dataclasses.replace(call, q=_zeroed(q), k=_zeroed(k), v=_zeroed(v), inputs_finite=True, memo=call.memo)
    res = backend.run(clean)
    nan = torch.zeros(poison.shape + (1,), dtype=q.dtype, device=q.device).masked_fill_(poison.unsqueeze(-1),
                                                                                         float("nan"))
    if call.return_weights:
        out, w = res
        return out + nan, w + nan
    return res + nan


__all__ = ["input_stats", "tensor_stats", "remember_stats", "check_score_range", "poisoned_rows", "run"]
