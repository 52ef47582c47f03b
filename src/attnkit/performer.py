"""Performer FAVOR+ attention (Choromanski et al. 2021, "Rethinking Attention with Performers").

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim,
Dv value dim, m random features.

Softmax attention approximated with positive orthogonal random features
(``attnkit.feature_maps``): exp(scale q.k) = E[phi(x).phi(y)] with x = q scale^1/2, y = k scale^1/2,
phi(x) = m^-1/2 exp(W x - |x|^2/2), W (m, D). The attention is then linear attention on these
features, computed by the same core as ``attnkit.linear`` (non-causal O(N m Dv); causal by the
chunked prefix form with a carried (m, Dv) state; memory linear in N, forward and backward).

Stabiliser: features are computed as exp(logit - c) with c a per-query-row max (queries) and
a per-(batch, head) max over valid keys (keys); c cancels between numerator and normaliser, so
the output is the unstabilised estimator's (for eps = 0). In decoding, c for keys is a running
max and the carried state is rescaled when it grows, which gives the same numbers as the
parallel form. eps > 0 (performer-pytorch's 1e-4) needs stabilizer="paper" and is not
available for decoding (the output then depends on c, which a decoder cannot know in advance).

Masks: as linear attention (key padding, causal, both); others raise with the reason.
The projection is drawn by ``draw_favor_projection`` from a seeded generator; the module
``PerformerAttention`` redraws it on demand (``redraw()``) or every k training calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import _validate as V
from .feature_maps import draw_favor_projection, favor_features, key_max
from .linear import LinearState, key_only_mask, linear_attention_features, linear_step_features


@dataclass(frozen=True)
class FavorConfig:
    """FAVOR+ options. num_features None = int(D ln D) (the paper's / performer-pytorch's default)."""

    num_features: int | None = None
    orthogonal: bool = True
    scaling: str = "chi"              # row norms: "chi" (unbiased) or "sqrt_d"
    eps: float = 0.0                  # added to features; > 0 needs stabilizer="paper"
    stabilizer: str = "robust"        # "robust" or "paper" (see feature_maps.favor_features)
    redraw_interval: int | None = None  # module: redraw every k training forward calls
    seed: int = 0                     # module: seed of the generator the projections are drawn from

    def features_for(self, head_dim: int) -> int:
        return self.num_features if self.num_features is not None else max(1, int(head_dim * math.log(head_dim)))


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_projection(projection, head_dim: int) -> None:
    if not isinstance(projection, torch.Tensor) or projection.dim() != 2 or projection.shape[1] != head_dim:
        got = V.shape_str(projection) if isinstance(projection, torch.Tensor) else type(projection).__name__
        raise ValueError(f"projection must be a (m, D) tensor with D = {head_dim} "
                         f"(see attnkit.feature_maps.draw_favor_projection), got {got}")


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


def performer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, projection: torch.Tensor,
                        causal: bool = False, mask=None, scale: float | None = None, eps: float = 0.0,
                        stabilizer: str = "robust", chunk_size: int = 128, state: PerformerState | None = None,
                        return_state: bool = False):
    """FAVOR+ approximation of softmax(scale q k^T) v (Choromanski et al. 2021).

    Args:
        q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv); Hq a multiple of Hk.
        projection: W (m, D), e.g. ``draw_favor_projection(m, D, generator=g)``; shared by heads.
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
    is_causal, valid = key_only_mask(mask, batch=B, heads=Hq, nq=Nq, nk=Nk, device=q.device, variant="Performer")
    ct = _compute_dtype(q.dtype)
    w = projection.to(ct)
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
    ct = _compute_dtype(q.dtype)
    w = projection.to(ct)
    m = w.shape[0]
    if state is None:
        state = _empty_state(B, Hq, k.shape[1], m, v.shape[-1], ct, q.device)
    x, y = q.to(ct) * sc ** 0.5, k.to(ct) * sc ** 0.5                        # (B, H, T, D)
    phi_q = favor_features(x, w, role="query")                              # (B, Hq, T, m)
    phi_k, c, shrink = _key_features(y, w, None, 0.0, "robust", state)       # (B, Hk, T, m)
    out, lin = linear_step_features(phi_q, phi_k, v.to(ct), _rescaled(state, shrink, Hq))
    return out.to(q.dtype), PerformerState(lin, c)


class PerformerAttention(nn.Module):
    """Multi-head Performer attention on (B, N, E): q/k/v/out projections around ``performer_attention``.

    The FAVOR+ projection W (m, D) is a buffer shared by the heads, drawn from a torch.Generator
    seeded with ``config.seed``. ``redraw()`` draws the next one now; with
    ``config.redraw_interval = k`` a new one is drawn before every k-th forward call in training
    mode (never in eval mode). forward(query, key=None, value=None, *, key_padding_mask=None) with
    key_padding_mask (B, Nk) True = padding (torch MHA's polarity, converted here).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, config: FavorConfig = FavorConfig(),
                 bias: bool = True, chunk_size: int = 128):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if config.redraw_interval is not None and (not isinstance(config.redraw_interval, int) or config.redraw_interval <= 0):
            raise ValueError(f"redraw_interval must be None or an int > 0, got {config.redraw_interval!r}")
        self.embed_dim, self.num_heads, self.causal, self.config, self.chunk_size = (
            embed_dim, num_heads, causal, config, chunk_size)
        self.head_dim = embed_dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim, bias=bias)
                                                                for _ in range(4))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.calls = 0
        self.register_buffer("projection", self._draw())

    def _draw(self) -> torch.Tensor:
        c = self.config
        return draw_favor_projection(c.features_for(self.head_dim), self.head_dim, generator=self.generator,
                                     orthogonal=c.orthogonal, scaling=c.scaling)

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw the next projection from the module's generator (in place: the buffer keeps its device)."""
        self.projection.copy_(self._draw())

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, E = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def forward(self, query, key=None, value=None, *, key_padding_mask=None):
        if self.training and self.config.redraw_interval is not None:
            if self.calls > 0 and self.calls % self.config.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        key = query if key is None else key
        value = key if value is None else value
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, :]  # (B, 1, 1, Nk)
        out = performer_attention(q, k, v, projection=self.projection, causal=self.causal, mask=mask,
                                  eps=self.config.eps, stabilizer=self.config.stabilizer,
                                  chunk_size=self.chunk_size)                # (B, H, Nq, D)
        B, H, Nq, D = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, Nq, H * D))      # (B, Nq, E)
