"""Cores for the additive, LSH and Performer variants (see ``_cores`` for the calling protocol).

Legend: B batch, H query heads, Hk key/value heads, Nq queries, Nk keys, D head dim,
A additive attention dim, m random features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._cores import _no_bias, _no_weights, require
from .specs import LSH, Additive, Performer


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hk, N, D) -> (B, H, N, D): query head h reads key/value head h // (H // Hk)."""
    g = heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


class AdditiveCore(nn.Module):
    """Per-head Bahdanau scores v_a[h] . tanh(W_q[h] q_i + W_k[h] k_j + b[h]) on projected heads.

    Parameters w_q, w_k (H, A, D), v_a (H, A), b (H, A). Any mask spec; weights available.
    Cost O(Nq Nk A) time, memory linear in N (``attnkit.additive.additive_attention``).
    """

    def __init__(self, spec: Additive, *, num_heads: int, head_dim: int):
        super().__init__()
        self.fn = require("additive").additive_attention
        A = spec.attn_dim or head_dim
        bound_in, bound_a = 1 / math.sqrt(head_dim), 1 / math.sqrt(A)
        self.w_q = nn.Parameter(torch.empty(num_heads, A, head_dim).uniform_(-bound_in, bound_in))  # (H, A, D)
        self.w_k = nn.Parameter(torch.empty(num_heads, A, head_dim).uniform_(-bound_in, bound_in))  # (H, A, D)
        self.v_a = nn.Parameter(torch.empty(num_heads, A).uniform_(-bound_a, bound_a))  # (H, A)
        self.b = nn.Parameter(torch.zeros(num_heads, A))  # (H, A)

    def forward(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        _no_bias("Additive", bias)
        H = q.shape[1]
        res = self.fn(q, _expand(k, H), _expand(v, H), self.w_q, self.w_k, self.v_a, bias=self.b,
                      mask=masking.combined(), return_weights=need_weights)
        return res if need_weights else (res, None)


class LSHCore(nn.Module):
    """Reformer LSH attention with shared QK: the projected queries are the keys (k is unused).

    Rotations: drawn from (seed, call counter) in training, as the paper redraws them; fixed
    (seed) in eval mode so that inference is deterministic. Self-attention only.
    """

    def __init__(self, spec: LSH):
        super().__init__()
        self.fn = require("lsh").lsh_attention
        self.spec, self.calls = spec, 0

    def forward(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        _no_weights("LSH", need_weights)
        _no_bias("LSH", bias)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"LSH attention shares queries and keys, so it needs self-attention over one sequence "
                             f"(Nq == Nk), got Nq={q.shape[2]}, Nk={k.shape[2]}")
        kp = masking.only_key_padding("LSH", "bucketed chunks have no dense score matrix (use LSH(causal=True) "
                                      "for causal attention)")
        seed = self.spec.seed
        if self.training:
            seed, self.calls = seed * 1_000_003 + self.calls, self.calls + 1
        out = self.fn(q, _expand(v, q.shape[1]), n_hashes=self.spec.n_hashes, bucket_size=self.spec.bucket_size,
                      causal=self.spec.causal, key_padding=kp, seed=seed)
        return out, None


class PerformerCore(nn.Module):
    """Performer FAVOR+ (``attnkit.performer.performer_attention``) with a (m, D) projection buffer.

    The projection is drawn from a generator seeded with ``spec.seed``; with
    ``spec.redraw_interval = k`` a new one is drawn before every k-th training call (never in
    eval mode, so decoding and the full pass use the same features). Cost O(N m D).
    """

    def __init__(self, spec: Performer, *, num_heads: int, head_dim: int):
        super().__init__()
        mod = require("performer")
        self.fn, self.spec = mod.performer_attention, spec
        self.num_features = spec.num_features or mod.FavorConfig().features_for(head_dim)
        self.head_dim, self.calls = head_dim, 0
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.register_buffer("projection", self._draw())  # (m, D)

    def _draw(self) -> torch.Tensor:
        return require("feature_maps").draw_favor_projection(self.num_features, self.head_dim, generator=self.generator)

    def forward(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        _no_weights("Performer", need_weights)
        _no_bias("Performer", bias)
        k_int = self.spec.redraw_interval
        if self.training and k_int is not None:
            if self.calls > 0 and self.calls % k_int == 0:
                with torch.no_grad():
                    self.projection.copy_(self._draw())
            self.calls += 1
        mask = masking.combined()
        if state is None:
            return self.fn(q, k, v, projection=self.projection, causal=self.spec.causal, mask=mask), None
        out, state.state = self.fn(q, k, v, projection=self.projection, causal=True, mask=mask, state=state.state,
                                   return_state=True)
        return out, None
