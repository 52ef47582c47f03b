"""Performer FAVOR+ attention (Choromanski et al. 2021, "Rethinking Attention with Performers").

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim,
Dv value dim, m random features.

Softmax attention approximated with FAVOR+ positive orthogonal random features:

    phi(x) = m^-1/2 exp(W x - |x|^2 / 2),   W (m, D) with rows w_r ~ N(0, I_D)

so that E[phi(x).phi(y)] = exp(x.y) (unbiased), with per-pair variance
(1/m) exp(2 x.y) (exp|x+y|^2 - 1) for i.i.d. rows (orthogonal rows do no worse, paper Thm 2);
attention uses x = q scale^1/2 and y = k scale^1/2 (scale = 1/sqrt(D): x = q D^-1/4). The attention is then linear attention on these
features, computed by the same core as ``attnkit.linear`` (non-causal O(N m Dv); causal by the
chunked prefix form with a carried (m, Dv) state; memory linear in N, forward and backward).

Stabiliser: features are computed as exp(logit - c) with c a per-query-row max (queries) and
a per-(batch, head) max over valid keys (keys); c cancels between numerator and normaliser, so
the output is the unstabilised estimator's (for eps = 0). In decoding, c for keys is a running
max and the carried state is rescaled when it grows, which gives the same numbers as the
parallel form. eps > 0 (performer-pytorch's 1e-4) needs stabilizer="paper" and is not
available for decoding (the output then depends on c, which a decoder cannot know in advance).

Masks: as linear attention (key padding, causal, both); others raise with the reason.
The projection is drawn by ``draw_favor_projection`` from a seeded generator; in a module
(``Performer`` spec) the core redraws it on demand (``redraw()``) or every k training calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import _validate as V
from .._numerics import compute_dtype
from .base import check_bool, pos_int, split_key_mask
from .linear import (
    _REASON,
    LinearState,
    RecurrentVariant,
    _safe_reciprocal,
    linear_attention_features,
    linear_step_features,
)


def default_num_features(head_dim: int) -> int:
    """int(D ln D): the paper's / performer-pytorch's default number of random features."""
    return max(1, int(head_dim * math.log(head_dim)))


def draw_favor_projection(num_features: int, head_dim: int, *, generator: torch.Generator | None = None,
                          orthogonal: bool = True, scaling: str = "chi", dtype: torch.dtype = torch.float64,
                          device=None) -> torch.Tensor:
    """Random projection W (m, D) for FAVOR+ features, drawn from ``generator`` (seeded, reproducible).

    orthogonal=True: rows come in blocks of D mutually orthogonal directions (QR of a Gaussian
    matrix, signs fixed by diag(R) so each block is Haar-distributed); the last block is cut to
    fit m. scaling="chi" rescales each row by the norm of an independent Gaussian vector
    (chi_D distributed), so every row is marginally N(0, I_D) and the estimator stays unbiased;
    scaling="sqrt_d" uses the constant sqrt(D) (performer-pytorch's ``scaling=1``).
    orthogonal=False: i.i.d. Gaussian rows (``scaling`` is ignored).
    The draw happens on CPU in float64 and is returned in float64 unless ``dtype`` says
    otherwise, so it does not depend on the device, and a float64 call gets the exact draw (a
    call in a lower precision casts it to its compute dtype: the rounding it would get anyway).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"num_features must be an int > 0, got {num_features!r}")
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be an int > 0, got {head_dim!r}")
    if scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"scaling must be 'chi' or 'sqrt_d', got {scaling!r}")
    m, d = num_features, head_dim
    g = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    if not orthogonal:
        w = torch.randn(m, d, generator=g, dtype=torch.float64)
        return w.to(dtype=dtype, device=device)
    n_blocks = -(-m // d)
    gauss = torch.randn(n_blocks, d, d, generator=g, dtype=torch.float64)
    qm, r = torch.linalg.qr(gauss)                                         # (n, D, D) orthonormal columns
    qm = qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-uniform
    directions = qm.transpose(-1, -2).reshape(n_blocks * d, d)[:m]         # (m, D), unit rows, orthogonal per block
    if scaling == "chi":
        norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1)  # (m,) chi_D
    else:
        norms = torch.full((m,), math.sqrt(d), dtype=torch.float64)
    return (directions * norms.unsqueeze(1)).to(dtype=dtype, device=device)


def favor_features(x: torch.Tensor, projection: torch.Tensor, *, role: str = "raw", eps: float = 0.0,
                   stabilizer: str = "robust", key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR+ positive random features of already-scaled inputs x (B, H, N, D) -> (B, H, N, m).

    role="raw": the estimator itself, m^-1/2 exp(W x - |x|^2/2) (for tests; may overflow).
    role="query" / "key": stabilised for attention. A constant factor common to all features of
    a query row, or common to all keys of one (batch, head), cancels between the numerator and
    the normaliser of attention, so it is subtracted inside exp (it is treated as a constant:
    no gradient flows through it, and none needs to).
      stabilizer="robust" (default, requires eps == 0): queries subtract max_r (w_r.x - |x|^2/2)
        per row, keys subtract the max of (w_r.k - |k|^2/2) over valid keys and features of each
        (batch, head); the largest feature is then exactly m^-1/2, so nothing underflows to all-zero.
      stabilizer="paper" (the paper's code and performer-pytorch): queries subtract max_r w_r.x
        per row, keys the max of w_r.k over keys and features; then eps is added to every
        feature (m^-1/2 (exp(...) + eps)). eps > 0 biases the estimator and makes the output
        depend on the stabiliser; performer-pytorch uses eps=1e-4, the paper's code 1e-6.
    key_valid: (B', H', N) bool, True = real key; padded keys are excluded from the key max
    (their features are still computed; the caller zeroes them).
    Cost O(N m D).
    """
    if projection.dim() != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(f"projection must be (m, D) with D = {x.shape[-1]}, got shape {tuple(projection.shape)}")
    if role not in ("raw", "query", "key"):
        raise ValueError(f"role must be 'raw', 'query' or 'key', got {role!r}")
    if stabilizer not in ("robust", "paper"):
        raise ValueError(f"stabilizer must be 'robust' or 'paper', got {stabilizer!r}")
    if stabilizer == "robust" and eps != 0.0:
        raise ValueError(f"eps={eps} needs stabilizer='paper' (eps is defined relative to the paper's stabiliser)")
    m = projection.shape[0]
    log_ratio = -0.5 * math.log(m)
    u = torch.matmul(x, projection.to(x.dtype).T)                # (B, H, N, m)
    diag = 0.5 * (x * x).sum(dim=-1, keepdim=True)               # (B, H, N, 1)
    if role == "raw":
        return torch.exp(u - (diag - log_ratio))
    if role == "query":
        c = u.detach().amax(dim=-1, keepdim=True)                # (B, H, N, 1)
        if stabilizer == "robust":                               # diag cancels per row
            return u.sub_(c - log_ratio).exp_()                  # in place: matmul's backward does not need u
        return (torch.exp(u - (diag + c)) + eps) * math.exp(log_ratio)
    row_max = u.detach().amax(dim=-1)                            # (B, H, N)
    if stabilizer == "robust":
        row_max = row_max - diag.detach().squeeze(-1)
    c = key_max(row_max.unsqueeze(-1), key_valid)                # (B, H, 1, 1)
    if eps == 0.0:
        return u.sub_(diag + (c - log_ratio)).exp_()
    return (torch.exp(u - (diag + c)) + eps) * math.exp(log_ratio)


def key_max(logits: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Max of logits (B, H, N, m) over valid keys and features -> (B, H, 1, 1), detached; 0 if none valid."""
    lg = logits.detach()
    if key_valid is not None:
        lg = lg.masked_fill(~key_valid.unsqueeze(-1), float("-inf"))
    c = lg.amax(dim=(-1, -2), keepdim=True)
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))




@dataclass(frozen=True)
class PerformerState:
    """Decoding state: the linear-attention sums of key features taken relative to ``key_max``.

    linear.kv (B, Hq, m, Dv) and linear.k_sum (B, Hq, m) hold sum exp(logit_j - key_max) ...;
    key_max (B, Hk, 1, 1) is the running stabiliser (-inf before the first key).
    """

    linear: LinearState
    key_max: torch.Tensor

    @property
    def length(self) -> int:
        return self.linear.length


def _check_projection(projection, head_dim: int) -> None:
    if not isinstance(projection, torch.Tensor) or projection.dim() != 2 or projection.shape[1] != head_dim:
        got = V.shape_str(projection) if isinstance(projection, torch.Tensor) else type(projection).__name__
        raise ValueError(f"projection must be a (m, D) tensor with D = {head_dim} "
                         f"(see attnkit.variants.performer.draw_favor_projection), got {got}")
    if not projection.is_floating_point():
        raise TypeError(f"projection must be a floating-point tensor, got dtype {projection.dtype}")


def _key_features(y: torch.Tensor, projection: torch.Tensor, valid, eps: float, stabilizer: str,
                  state: PerformerState | None):
    """Key features (B, Hk, Nk, m) and the stabiliser (B, Hk, 1, 1), moving the state's if needed."""
    if state is None:
        return favor_features(y, projection, role="key", eps=eps, stabilizer=stabilizer, key_valid=valid), None, None
    u = torch.matmul(y, projection.to(y.dtype).T)                           # (B, Hk, Nk, m)
    diag = 0.5 * (y * y).sum(dim=-1, keepdim=True)                          # (B, Hk, Nk, 1)
    c_new = key_max(u - diag, valid)                                        # (B, Hk, 1, 1)
    if valid is not None:
        any_valid = valid.any(dim=-1)[..., None, None]                      # (B', H', 1, 1)
        c_new = torch.where(any_valid, c_new, torch.full_like(c_new, float("-inf")))
    c = torch.maximum(state.key_max.to(y.dtype), c_new)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    feats = projection.shape[0] ** -0.5 * torch.exp(u - diag - c)          # (B, Hk, Nk, m)
    shrink = torch.exp(state.key_max.to(y.dtype) - c)                       # (B, Hk, 1, 1), 0 if old = -inf
    return feats, c, shrink


def _rescaled(state: PerformerState, shrink: torch.Tensor, hq: int) -> LinearState:
    factor = shrink[:, :, 0, 0].repeat_interleave(hq // shrink.shape[1], dim=1)  # (B, Hq)
    return state.linear.scaled(factor.to(state.linear.kv.dtype))


class _FavorNonCausal(torch.autograd.Function):
    """Non-causal FAVOR+ attention (robust stabiliser, eps = 0) with a hand-written backward.

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), ws = scale^1/2 W (m, D), valid (B', H', Nk)
    bool or None with H' in {1, Hk}. Features phi_q = m^-1/2 exp(q ws^T - rowmax) (B, Hq, Nq, m),
    phi_k = m^-1/2 exp(k ws^T - scale |k|^2 / 2 - keymax) (B, Hk, Nk, m), zero for padded keys;
    S = phi_k^T [v | 1] (B, Hk, m, Dv + 1) gives numerator and normaliser in one matmul:
    [num | den] = phi_q S, out = num / den (0 where den = 0).
    Backward: G = [dout / den | -(dout . out) / den]; dphi_q = G S^T, dS = phi_q^T G,
    dphi_k = [v | 1] dS^T, dv = phi_k dS[:, :Dv]; the stabilisers cancel in out, so they are
    constants: du = dphi * phi, dq = du_q ws, dk = du_k ws - scale k sum_r du_k.
    Saves phi_q, phi_k, [v | 1], S, 1 / den and out; no N x m temporary besides the two features.
    """

    @staticmethod
    def forward(ctx, q, k, v, ws, valid, sc: float):
        B, Hq, Nq, _ = q.shape
        Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        m = ws.shape[0]
        log_ratio = -0.5 * math.log(m)
        phi_q = torch.matmul(q, ws.T)                                       # (B, Hq, Nq, m)
        phi_q.sub_(phi_q.amax(dim=-1, keepdim=True) - log_ratio).exp_()
        phi_k = torch.matmul(k, ws.T)                                       # (B, Hk, Nk, m)
        phi_k.sub_((0.5 * sc) * (k * k).sum(dim=-1, keepdim=True))
        phi_k.sub_(key_max(phi_k, valid) - log_ratio).exp_()
        va = torch.cat([v, v.new_ones(B, Hk, Nk, 1)], dim=-1)               # (B, Hk, Nk, Dv + 1)
        if valid is not None:
            pad = ~valid.unsqueeze(-1)                                      # (B', H', Nk, 1)
            phi_k.masked_fill_(pad, 0.0)
            va.masked_fill_(pad, 0.0)
        s = torch.matmul(phi_k.transpose(-1, -2), va)                      # (B, Hk, m, Dv + 1)
        nd = torch.matmul(phi_q.view(B, Hk, -1, m), s).view(B, Hq, Nq, Dv + 1)
        inv = _safe_reciprocal(nd[..., Dv])                                 # (B, Hq, Nq)
        out = nd[..., :Dv].mul_(inv.unsqueeze(-1))                          # (B, Hq, Nq, Dv), in place (a view)
        ctx.save_for_backward(k, ws, phi_q, phi_k, va, s, inv, out)
        ctx.sc = sc
        return out

    @staticmethod
    def backward(ctx, g):
        k, ws, phi_q, phi_k, va, s, inv, out = ctx.saved_tensors
        B, Hq, Nq, m = phi_q.shape
        Hk, Dv = phi_k.shape[1], out.shape[-1]
        gg = torch.empty(B, Hq, Nq, Dv + 1, dtype=g.dtype, device=g.device)  # [dnum | dden]
        torch.mul(g, inv.unsqueeze(-1), out=gg[..., :Dv])
        gg[..., Dv] = (g * out).sum(dim=-1).mul_(inv).neg_()
        gk = gg.view(B, Hk, -1, Dv + 1)                                     # (B, Hk, g Nq, Dv + 1)
        dphi_q = torch.matmul(gk, s.transpose(-1, -2)).view(B, Hq, Nq, m)
        ds = torch.matmul(phi_q.view(B, Hk, -1, m).transpose(-1, -2), gk)  # (B, Hk, m, Dv + 1)
        dphi_k = torch.matmul(va, ds.transpose(-1, -2))                    # (B, Hk, Nk, m)
        dv = torch.matmul(phi_k, ds[..., :Dv])                              # (B, Hk, Nk, Dv)
        dq = torch.matmul(dphi_q.mul_(phi_q), ws)                           # (B, Hq, Nq, D)
        du_k = dphi_k.mul_(phi_k)
        dk = torch.matmul(du_k, ws).addcmul_(k, du_k.sum(dim=-1, keepdim=True), value=-ctx.sc)
        return dq, dk, dv, None, None, None


def performer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, projection: torch.Tensor,
                        causal: bool = False, mask=None, scale: float | None = None, eps: float = 0.0,
                        stabilizer: str = "robust", chunk_size: int = 128, state: PerformerState | None = None,
                        return_state: bool = False):
    """FAVOR+ approximation of softmax(scale q k^T) v (Choromanski et al. 2021).

    Args:
        q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv); Hq a multiple of Hk.
        projection: W (m, D), e.g. ``draw_favor_projection(m, D, generator=g)`` (float64 by
            default); shared by heads; used in the compute dtype (a float32 projection in a
            float64 call is used as its float32 values: draw in float64 for an exact draw).
        causal: bottom-right aligned (query i at key position i + Nk - Nq).
        mask: as ``linear_attention`` (None, causal, key padding, their &, bool (B, 1, 1, Nk)).
        scale: of q.k in the softmax being approximated; default 1/sqrt(D) (x = q D^-1/4).
        eps, stabilizer: see ``feature_maps.favor_features``.
        chunk_size: C of the causal chunked form.
        state / return_state: continue from / return a ``PerformerState`` (needs eps == 0).

    Returns out (B, Hq, Nq, Dv) in q's dtype (and the state). Unbiased for each exp(scale q.k)
    term (the ratio is consistent, error O(m^-1/2)). Cost O(N m (D + Dv)) non-causal, plus
    O(N C (m + Dv)) causal; memory linear in N.
    """
    V.check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    _check_projection(projection, D)
    sc = V.check_scale(scale, D)
    if (state is not None or return_state) and eps != 0.0:
        raise ValueError(f"performer_attention with a state needs eps == 0, got eps={eps}: with eps > 0 the output "
                         "depends on the key stabiliser, which a decoder cannot know in advance")
    is_causal, valid = split_key_mask(mask, batch=B, heads=Hq, nq=Nq, nk=Nk, device=q.device, variant="Performer",
                                      reason=_REASON)
    ct = compute_dtype(q.dtype)
    w = projection.to(ct)
    if (not (causal or is_causal) and state is None and not return_state and eps == 0.0 and stabilizer == "robust"
            and not w.requires_grad and (valid is None or valid.shape[1] == 1 or k.shape[1] == Hq)):
        return _FavorNonCausal.apply(q.to(ct), k.to(ct), v.to(ct), w * sc ** 0.5, valid, sc).to(q.dtype)
    if return_state and state is None:
        state = _empty_state(B, Hq, k.shape[1], w.shape[0], v.shape[-1], ct, q.device)
    x, y = q.to(ct) * sc ** 0.5, k.to(ct) * sc ** 0.5                        # (B, H, N, D)
    phi_q = favor_features(x, w, role="query", eps=eps, stabilizer=stabilizer)  # (B, Hq, Nq, m)
    # The key stabiliser is taken over valid keys; a per-query-head mask under GQA cannot be
    # applied to the Hk key heads, so it is then taken over all keys (still a valid constant).
    kvalid = valid if valid is None or valid.shape[1] == 1 or k.shape[1] == Hq else None
    phi_k, c, shrink = _key_features(y, w, kvalid, eps, stabilizer, state)   # (B, Hk, Nk, m)
    lin_state = None if state is None else _rescaled(state, shrink, Hq)
    res = linear_attention_features(phi_q, phi_k, v.to(ct), causal=causal or is_causal, key_valid=valid,
                                    chunk_size=chunk_size, eps=0.0, state=lin_state, return_state=return_state)
    if not return_state:
        return res.to(q.dtype)
    out, new_lin = res
    return out.to(q.dtype), PerformerState(new_lin, c)


def _empty_state(B: int, Hq: int, Hk: int, m: int, dv: int, dtype, device) -> PerformerState:
    return PerformerState(LinearState.zeros(B, Hq, m, dv, dtype=dtype, device=device),
                          torch.full((B, Hk, 1, 1), float("-inf"), dtype=dtype, device=device))


def performer_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: PerformerState | None = None,
                             *, projection: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, PerformerState]:
    """Decode T >= 1 new tokens recurrently: q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv).

    Returns (out (B, Hq, T, Dv), new state); equal to the causal parallel form (eps = 0).
    Cost O(m (D + Dv)) per token.
    """
    V.check_qkv(q, k, v)
    B, Hq, T, D = q.shape
    _check_projection(projection, D)
    sc = V.check_scale(scale, D)
    ct = compute_dtype(q.dtype)
    w = projection.to(ct)
    m = w.shape[0]
    if state is None:
        state = _empty_state(B, Hq, k.shape[1], m, v.shape[-1], ct, q.device)
    x, y = q.to(ct) * sc ** 0.5, k.to(ct) * sc ** 0.5                        # (B, H, T, D)
    phi_q = favor_features(x, w, role="query")                              # (B, Hq, T, m)
    phi_k, c, shrink = _key_features(y, w, None, 0.0, "robust", state)       # (B, Hk, T, m)
    out, lin = linear_step_features(phi_q, phi_k, v.to(ct), _rescaled(state, shrink, Hq))
    return out.to(q.dtype), PerformerState(lin, c)


@dataclass(frozen=True)
class Performer(RecurrentVariant):
    """Performer FAVOR+ (Choromanski et al. 2021): linear attention on positive orthogonal random
    features approximating softmax(scale q k^T).

    num_features: m (None: int(D ln D)). causal=True decodes with a RecurrentState.
    orthogonal / scaling: how the projection is drawn (``draw_favor_projection``).
    eps / stabilizer: see ``favor_features`` (eps > 0 needs stabilizer="paper" and cannot decode).
    redraw_interval: in a module, draw new features before every k-th training call (None: never).
    seed: of the generator the module's features are drawn from. chunk_size: causal chunk C.
    Cost O(N m D). Error of the approximation: O(m^-1/2) per score (paper, Theorem 4).
    """

    num_features: int | None = None
    causal: bool = False
    orthogonal: bool = True
    scaling: str = "chi"
    eps: float = 0.0
    stabilizer: str = "robust"
    redraw_interval: int | None = None
    seed: int = 0
    chunk_size: int = 128

    name = "performer"

    def __post_init__(self):
        if self.num_features is not None:
            pos_int("Performer", "num_features", self.num_features)
        if self.redraw_interval is not None:
            pos_int("Performer", "redraw_interval", self.redraw_interval)
        check_bool("Performer", "causal", self.causal)
        check_bool("Performer", "orthogonal", self.orthogonal)
        pos_int("Performer", "chunk_size", self.chunk_size)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"Performer: seed must be an int, got {self.seed!r}")
        if self.scaling not in ("chi", "sqrt_d"):
            raise ValueError(f"Performer: scaling must be 'chi' or 'sqrt_d', got {self.scaling!r}")
        if self.stabilizer not in ("robust", "paper"):
            raise ValueError(f"Performer: stabilizer must be 'robust' or 'paper', got {self.stabilizer!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 <= self.eps < math.inf:
            raise ValueError(f"Performer: eps must be a finite float >= 0, got {self.eps!r}")
        if self.eps and self.stabilizer != "paper":
            raise ValueError(f"Performer: eps={self.eps} needs stabilizer='paper'")

    def decode_reason(self) -> str | None:
        if self.causal and self.eps:
            return f"Performer(eps={self.eps}) depends on the key stabiliser, which a decoder cannot know in advance"
        return super().decode_reason()

    def build_core(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return PerformerCore(self, head_dim=head_dim)


class PerformerCore(nn.Module):
    """``performer_attention`` with a (m, D) projection buffer shared by the heads.

    The projection is drawn from a generator seeded with ``spec.seed``; ``redraw()`` draws the
    next one; with ``spec.redraw_interval = k`` a new one is drawn before every k-th training
    call (never in eval mode, so decoding and the full pass use the same features).
    """

    def __init__(self, spec: Performer, *, head_dim: int):
        super().__init__()
        self.spec, self.head_dim, self.calls = spec, head_dim, 0
        self.num_features = spec.num_features or default_num_features(head_dim)
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.register_buffer("projection", self._draw())  # (m, D)

    def _draw(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return draw_favor_projection(self.num_features, self.head_dim, generator=self.generator,
                                     orthogonal=self.spec.orthogonal, scaling=self.spec.scaling,
                                     dtype=dtype or torch.get_default_dtype())

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw the next projection from the generator (in place: the buffer keeps its device and
        dtype; drawn in that dtype, so a float64 module gets an exact float64 draw)."""
        self.projection.copy_(self._draw(self.projection.dtype))

    def forward(self, q, k, v, *, mask, bias, dropout_p, need_weights, cache, query_valid=None):
        s = self.spec
        if self.training and s.redraw_interval is not None:
            if self.calls > 0 and self.calls % s.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        kw = {"projection": self.projection, "mask": mask, "eps": s.eps, "stabilizer": s.stabilizer,
              "chunk_size": s.chunk_size}
        if cache is None:
            return performer_attention(q, k, v, causal=s.causal, **kw), None
        out, cache.state = performer_attention(q, k, v, causal=True, state=cache.state, return_state=True, **kw)
        return out, None


__all__ = ["performer_attention", "performer_attention_step", "PerformerState", "draw_favor_projection",
           "favor_features", "key_max", "default_num_features", "Performer", "PerformerCore"]
