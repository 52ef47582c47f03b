"""Reformer LSH attention: shared-QK attention inside hash buckets (Kitaev et al. 2020).

Legend: B batch, H heads, N sequence, D head dim, Dv value dim, R hash rounds (n_hashes),
nb buckets per round, c chunk length (bucket_size), C = ceil(N / c) chunks per round,
G = B * H flattened (batch, head) pairs.

Algorithm (per (b, h)):
1. Angular LSH: for each round r, bucket(x) = argmax([x R_r, -x R_r]) with R_r a (D, nb/2)
   Gaussian matrix (Andoni et al. 2015).
2. Sort positions by (bucket, position) in each round; cut the sorted order of each round into C
   chunks of c slots (the last one padded with empty slots). The R * C chunks are laid end to
   end, round after round, and each attends to itself and to the chunk before it (the first
   chunk of round r looks back at the last chunk of round r - 1, wrapping around), as trax and
   reformer-pytorch do. With a single chunk in all there is no look-back.
3. Shared QK: queries are qk, keys are qk / |qk|; score = scale * q . k (scale 1/sqrt(D)).
4. A query never attends to its own position unless no round offers it any other allowed key
   (causal position 0, or all others padded); then it attends only to itself.
5. Each round gives o_r and lse_r (log of its softmax denominator); the rounds are combined as
   out = sum_r softmax_r(lse_r) o_r, i.e. one softmax over the multiset union of the rounds'
   keys (a pair met in several rounds counts several times, like the peer's default
   ``allow_duplicate_attention=True``).

Paper: N. Kitaev, L. Kaiser, A. Levskaya, "Reformer: The Efficient Transformer", ICLR 2020.
Cost: O(R N c (D + Dv)) time; memory O(R N (D + Dv)) per head saved for backward (the sorted
slots), plus O(R N c) for the window masks when they are not the shared one (causal, padding).
Heads are hashed, sorted and attended in groups, so transient memory is one group's. The chunk
attention runs in ``lsh_chunks`` (torch's fused CPU flash kernel on overlapping window views, no
score matrix kept; backward on the saved slots, nothing re-sorted).

Peer: ``reformer_pytorch.LSHAttention`` (1.4.4) on (B * H, N, D). Same rotations layout (D, R,
nb/2), same sort key, chunking and look-back. Differences: the peer fills the self score with
-5e4 instead of excluding it (identical results unless every other score is below about -5e4
+ 700), needs N divisible by 2 * bucket_size (here any N; the last chunk of a round is padded)
and masks padded *queries* too (here key padding masks keys only; padded rows are computed).

Rotations: the function draws them from ``seed`` (None: torch's global generator, fresh on every
call, like the peer) or takes ``rotations``. The module core (``LSH`` spec) draws fresh ones on
every training call from (seed, call count), as the paper does, and keeps fixed ones (from seed)
in eval mode so that inference is deterministic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from .._numerics import compute_dtype, expand_kv, safe_softmax_lse
from . import lsh_chunks
from .base import Variant, check_bool, pos_int, split_key_mask

_REASON = "queries and keys are sorted into hash buckets, so there is no dense score matrix to mask"


def default_n_buckets(n: int, bucket_size: int) -> int:
    """The peer's N // bucket_size, rounded up to an even number >= 2."""
    return max(2, 2 * -(-n // (2 * bucket_size)))


def draw_rotations(head_dim: int, n_hashes: int, n_buckets: int, *, seed: int | None = None,
                   dtype=torch.float32, device=None) -> torch.Tensor:
    """Gaussian rotations (D, R, nb/2). seed=None draws from torch's global generator."""
    shape = (head_dim, n_hashes, max(n_buckets // 2, 1))
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def lsh_buckets(qk: torch.Tensor, rotations: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket ids (B, H, R, N) in [0, nb): argmax over [x R_r, -x R_r]; nb == 1: all zero."""
    B, H, N, D = qk.shape
    R, half = rotations.shape[1], rotations.shape[2]
    if n_buckets == 1:
        return torch.zeros(B, H, R, N, dtype=torch.int64, device=qk.device)
    with torch.no_grad():
        rot = torch.matmul(qk, rotations.to(qk.dtype).reshape(D, R * half)).view(B, H, N, R, half)
        # argmax of [rot, -rot] (first index on ties) without building the concatenation
        hi, ihi = rot.max(dim=-1)
        lo, ilo = rot.min(dim=-1)
        return torch.where(hi >= -lo, ihi, ilo + half).transpose(-1, -2).contiguous()  # (B, H, R, N)


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, *, n_hashes: int = 8, bucket_size: int = 64,
                  n_buckets: int | None = None, causal: bool = False, mask=None,
                  scale: float | None = None, seed: int | None = None, rotations: torch.Tensor | None = None,
                  heads_per_group: int | None = None) -> torch.Tensor:
    """Reformer LSH attention with shared query/key vectors.

    Args:
        qk: (B, H, N, D) shared queries/keys (keys are qk / |qk|). v: (B, H, N, Dv).
        n_hashes: rounds R. bucket_size: chunk length c (the paper's and peer's bucket size).
        n_buckets: buckets per round, even (or 1 = no hashing); default N // bucket_size
            rounded up to even, like the peer.
        causal: keys at positions > query position are blocked (as is ``mask=masks.causal()``).
        mask: as ``attnkit.attention`` (a spec or a bool tensor, True = may attend), restricted to
            ``causal()`` and key padding (``masks.key_padding``, ``key_padding_from_bool``,
            (B, 1, 1, N) bool): padded keys are never attended (they still take part in hashing;
            their own rows are computed). Other masks raise.
        scale: default 1/sqrt(D).
        seed / rotations: rotations (D, R, nb/2) to use; else drawn with ``seed`` (None = torch's
            global generator, like the peer). Same seed, same buckets.
        heads_per_group: (b, h) pairs hashed, sorted and masked together; default keeps one
            group's window mask near 2^26 elements (it bounds the transient memory, not the result).

    Returns: (B, H, N, Dv) in qk's dtype (half/bfloat16 computed in float32).
    Cost: O(R N c (D + Dv)) time, O(R N (c + D + Dv)) memory per group.
    """
    V.check_rank4("qk", qk, "(B, H, N, D)")
    V.check_rank4("v", v, "(B, H, N, Dv)")
    if v.shape[:3] != qk.shape[:3]:
        raise ValueError(f"v {V.shape_str(v)} must match qk {V.shape_str(qk)} in (B, H, N): LSH attention shares "
                         "queries and keys, so values are per position of the same sequence")
    if v.dtype != qk.dtype or v.device != qk.device:
        raise TypeError(f"qk and v must share dtype and device, got {qk.dtype}/{qk.device} and {v.dtype}/{v.device}")
    B, H, N, D = qk.shape
    if N == 0:
        raise ValueError(f"qk has no positions (N=0): shape {V.shape_str(qk)}")
    for name, val in (("n_hashes", n_hashes), ("bucket_size", bucket_size)):
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be an int > 0, got {val!r}")
    nb = default_n_buckets(N, bucket_size) if n_buckets is None else n_buckets
    if not isinstance(nb, int) or nb <= 0 or (nb > 1 and nb % 2):
        raise ValueError(f"n_buckets must be 1 or an even int >= 2 (angular LSH uses [xR, -xR]), got {nb!r}")
    scale = V.check_scale(scale, D)
    if rotations is None:
        rotations = draw_rotations(D, n_hashes, nb, seed=seed, dtype=qk.dtype, device=qk.device)
    elif not isinstance(rotations, torch.Tensor) or tuple(rotations.shape) != (D, n_hashes, max(nb // 2, 1)):
        got = V.shape_str(rotations) if isinstance(rotations, torch.Tensor) else type(rotations).__name__
        raise ValueError(f"rotations must have shape (D, n_hashes, n_buckets // 2) = ({D}, {n_hashes}, "
                         f"{max(nb // 2, 1)}), got {got}")
    mask_causal, valid = split_key_mask(mask, batch=B, heads=1, nq=N, nk=N, device=qk.device, variant="LSH attention",
                                        reason=_REASON)
    causal = causal or mask_causal
    valid = None if valid is None else torch.broadcast_to(valid[:, 0], (B, N))  # (B, N)
    in_dtype = qk.dtype
    ct = compute_dtype(in_dtype)
    qk, v = qk.to(ct), v.to(ct)
    G, Dv = B * H, v.shape[-1]
    E = max(D, Dv)  # the chunk kernel wants one head dim: zero columns change no score and no output
    qkf = qk.reshape(G, N, D)                                             # (G, N, D)
    kn = qkf / torch.linalg.vector_norm(qkf, dim=-1, keepdim=True).clamp_min(1e-12)  # keys qk / |qk|
    vf = v.reshape(G, N, Dv)                                              # (G, N, Dv)
    if D < E:
        qkf, kn = F.pad(qkf, (0, E - D)), F.pad(kn, (0, E - D))          # (G, N, E)
    if Dv < E:
        vf = F.pad(vf, (0, E - Dv))                                       # (G, N, E)
    validf = None if valid is None else valid.repeat_interleave(H, dim=0)  # (G, N)
    c = bucket_size
    width = c if n_hashes * -(-N // c) == 1 else 2 * c
    per = heads_per_group or max(1, (1 << 26) // max(1, n_hashes * N * width))
    outs = []
    for g0 in range(0, G, per):
        sl = slice(g0, g0 + per)
        buckets = lsh_buckets(qk.reshape(1, G, N, D)[:, sl], rotations, nb)[0]  # (g, R, N)
        plan = lsh_chunks.plan(buckets, None if validf is None else validf[sl], c, causal, ct)
        outs.append(lsh_chunks.attend(qkf[sl], kn[sl], vf[sl], plan, scale))  # (g, N, E)
    out = torch.cat(outs, dim=0)[..., :Dv].reshape(B, H, N, Dv)          # (B, H, N, Dv)
    return out.to(in_dtype)


def shared_qk_attention(qk: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None,
                        scale: float | None = None) -> torch.Tensor:
    """Exact attention that LSH approximates: keys qk/|qk|, self excluded unless nothing else.

    qk (B, H, N, D), v (B, H, N, Dv) -> (B, H, N, Dv). Cost O(N^2) time and memory per head.
    """
    V.check_rank4("qk", qk, "(B, H, N, D)")
    V.check_rank4("v", v, "(B, H, N, Dv)")
    if v.shape[:3] != qk.shape[:3]:
        raise ValueError(f"v {V.shape_str(v)} must match qk {V.shape_str(qk)} in (B, H, N)")
    B, H, N, D = qk.shape
    scale = V.check_scale(scale, D)
    s = torch.matmul(qk, F.normalize(qk, dim=-1).transpose(-1, -2)) * scale  # (B, H, N, N)
    i = torch.arange(N, device=qk.device)
    ok = torch.ones(N, N, dtype=torch.bool, device=qk.device)
    if causal:
        ok = i.view(-1, 1) >= i.view(1, -1)
    ok = ok.expand(B, 1, N, N)
    mask_causal, valid = split_key_mask(mask, batch=B, heads=1, nq=N, nk=N, device=qk.device,
                                        variant="shared_qk_attention", reason=_REASON)
    if mask_causal:
        ok = ok & (i.view(-1, 1) >= i.view(1, -1))
    if valid is not None:
        ok = ok & valid[:, :, None, :]
    eye = torch.eye(N, dtype=torch.bool, device=qk.device)
    other = ok & ~eye
    allowed = other | (ok & eye & ~other.any(dim=-1, keepdim=True))
    p, _ = safe_softmax_lse(s, ~allowed)
    return torch.matmul(p, v)  # (B, H, N, Dv)


@dataclass(frozen=True)
class LSH(Variant):
    """Reformer LSH attention (Kitaev et al. 2020): shared-QK, angular hashing, sorted chunks.

    n_hashes: rounds R. bucket_size: chunk length c. n_buckets: per round (None: N / c rounded
    up to even). causal: block future keys. seed: of the rotations (see the module docstring).
    Keys are the (normalised) queries: the module has no key projection; self-attention only.
    Masks: key padding (and causal). Cost O(R N c D).
    """

    n_hashes: int = 8
    bucket_size: int = 64
    n_buckets: int | None = None
    causal: bool = False
    seed: int = 0

    name = "lsh"
    cross = False
    shares_qk = True

    def __post_init__(self):
        pos_int("LSH", "n_hashes", self.n_hashes)
        pos_int("LSH", "bucket_size", self.bucket_size)
        if self.n_buckets is not None:
            pos_int("LSH", "n_buckets", self.n_buckets)
        check_bool("LSH", "causal", self.causal)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"LSH: seed must be an int, got {self.seed!r}")

    def causal_version(self) -> LSH:
        return dataclasses.replace(self, causal=True)

    def decode_reason(self) -> str | None:
        return "LSH re-sorts all keys into buckets on every call; it has no incremental form"

    def build_core(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return LSHCore(self)


class LSHCore(nn.Module):
    """``lsh_attention`` with shared QK (the projected queries are the keys; k is not used)."""

    def __init__(self, spec: LSH):
        super().__init__()
        self.spec, self.calls = spec, 0

    def forward(self, q, k, v, *, mask, bias, dropout_p, need_weights, cache, query_valid=None):
        s = self.spec
        if q.shape[2] != v.shape[2]:
            raise ValueError(f"LSH attention shares queries and keys, so it needs self-attention over one sequence "
                             f"(Nq == Nk), got Nq={q.shape[2]}, Nk={v.shape[2]}")
        seed = s.seed
        if self.training:
            seed, self.calls = s.seed * 1_000_003 + self.calls, self.calls + 1
        G = q.shape[1] // v.shape[1]
        out = lsh_attention(q, expand_kv(v, G), n_hashes=s.n_hashes,
                            bucket_size=s.bucket_size, n_buckets=s.n_buckets, causal=s.causal, mask=mask, seed=seed)
        return out, None


__all__ = ["lsh_attention", "shared_qk_attention", "lsh_buckets", "draw_rotations", "default_n_buckets", "LSH",
           "LSHCore"]
