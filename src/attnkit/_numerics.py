"""Numerics every attention path shares: compute dtype, grouped-query expansion, softmax forms.

Legend: B batch, Hq query heads, Hk key/value heads (G = Hq // Hk), N positions, D head dim,
R rows (queries) of a tile, L keys of a tile, Dv value dim.

- Half and bfloat16 inputs are computed in float32 (statistics, sums); other dtypes as given.
- A softmax row with no allowed entry (all -inf) gives zeros and zero gradient, never NaN; its
  log-sum-exp is +inf (so that exp(s - lse) is 0 in a recomputing backward, with no branch).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16 inputs, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hk, N, D) -> (B, Hk * groups, N, D): query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def safe_softmax_lse(s: torch.Tensor, blocked: torch.Tensor | None = None, *,
                     empty_lse: float = float("inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim with ``blocked`` (bool, broadcastable to s) entries excluded, and
    the log-sum-exp (s without its last dim). All-blocked / all -inf rows give zero weights
    (zero gradient) and lse = ``empty_lse`` (+inf for recomputing backwards; -inf to merge
    several softmaxes by their lse, where an empty one must weigh nothing)."""
    if blocked is not None:
        s = s.masked_fill(blocked, NEG_INF)
    mx = s.amax(dim=-1, keepdim=True).detach()
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(s - mx)
    den = p.sum(dim=-1, keepdim=True)
    ok = den > 0
    den1 = torch.where(ok, den, torch.ones_like(den))
    lse = torch.where(ok, torch.log(den1) + mx, torch.full_like(den, empty_lse))
    return p / den1, lse.squeeze(-1)


def safe_softmax(s: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """``safe_softmax_lse`` without the log-sum-exp."""
    return safe_softmax_lse(s, blocked)[0]


class OnlineSoftmax:
    """Running max m, sum l and unnormalised output acc of a softmax over key tiles folded in one
    at a time (Milakov & Gimelshein 2018; FlashAttention-2, Algorithm 1).

    rows: the shape of the row statistics, e.g. (B, H, R); acc is rows + (Dv,). ``update(s, v)``
    folds in scores s (rows + (L,), -inf = blocked) and values v (..., L, Dv); ``result()``
    returns (out rows + (Dv,), lse rows) with out = 0 and lse = +inf on rows that saw no key.
    The first tile is stored as is (no rescaling of zeros), so one tile costs one softmax.
    """

    def __init__(self, rows: tuple[int, ...], value_dim: int, *, dtype: torch.dtype, device):
        self.rows, self.value_dim, self.dtype, self.device = tuple(rows), value_dim, dtype, device
        self.m = self.l = self.acc = None  # set by the first update

    def update(self, s: torch.Tensor, v: torch.Tensor, p_hook=None) -> None:
        """Fold in one tile. ``s`` is consumed (overwritten in place). ``p_hook(p)`` may rescale the
        probabilities after the normaliser is taken (dropout)."""
        tile_max = s.amax(dim=-1)
        m_new = tile_max if self.m is None else torch.maximum(self.m, tile_max)
        m_safe = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
        p = s.sub_(m_safe.unsqueeze(-1)).exp_()  # rows + (L,)
        tile_sum = p.sum(dim=-1)
        if p_hook is not None:
            p = p_hook(p)
        pv = torch.matmul(p, v)  # rows + (Dv,)
        if self.m is None:
            self.l, self.acc = tile_sum, pv
        else:
            alpha = torch.exp(self.m - m_safe)  # 0 where the old max was -inf
            self.l.mul_(alpha).add_(tile_sum)
            self.acc.mul_(alpha.unsqueeze(-1)).add_(pv)
        self.m = m_new

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.m is None:  # no tile at all
            out = torch.zeros(*self.rows, self.value_dim, dtype=self.dtype, device=self.device)
            return out, torch.full(self.rows, float("inf"), dtype=self.dtype, device=self.device)
        empty = self.l == 0
        out = self.acc.div_(torch.where(empty, torch.ones_like(self.l), self.l).unsqueeze(-1))
        m_safe = torch.where(self.m == NEG_INF, torch.zeros_like(self.m), self.m)
        lse = torch.where(empty, torch.full_like(self.l, float("inf")), m_safe + torch.log(self.l.clamp_min(1e-300)))
        return out, lse


__all__ = ["compute_dtype", "expand_kv", "safe_softmax", "safe_softmax_lse", "OnlineSoftmax", "NEG_INF"]
