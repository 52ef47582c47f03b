"""``attnkit.attention``: the one entry point for exact softmax attention.

Legend: B batch, Hq query heads, Hk key/value heads (Hq % Hk == 0), Nq queries, Nk keys,
D head dim, Dv value head dim.
"""

from __future__ import annotations

import torch

from . import _nonfinite as nonfinite
from ._call import make_call
from .backends import BACKENDS
from .dispatch import choose


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None, bias=None,
              scale: float | None = None, softcap: float | None = None, dropout_p: float = 0.0,
              dropout_seed: int | None = None, backend: str = "auto", return_weights: bool = False):
    """Exact softmax attention, out = softmax(softcap(scale * q k^T) + bias, masked) v.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hk, Nk, D). v: (B, Hk, Nk, Dv). Hq must be a multiple of Hk
            (grouped-query: query head h reads key/value head h // (Hq // Hk)).
        mask: None, a bool tensor broadcastable to (B, Hq, Nq, Nk) with True = may attend, or
            a spec from ``attnkit.masks`` (composable with & and |). Causal alignment is
            bottom-right: query i sits at key position i + Nk - Nq.
        bias: None, a float tensor broadcastable to (B, Hq, Nq, Nk), or a spec from
            ``attnkit.biases`` / ``attnkit.positions``; added after scaling and softcap.
        scale: multiplies q.k; default 1 / sqrt(D). Must be > 0 (T5 uses 1.0).
        softcap: c * tanh(s / c) on the scaled scores (Gemma 2), before bias and mask.
        dropout_p: dropout on the attention weights, in [0, 1). The pattern is a hash of
            (dropout_seed, b, h, i, j): equal across backends and reproducible in backward.
            With dropout_seed=None a seed is drawn from torch's global generator.
        backend: "auto" or a name from ``attnkit.backends.BACKENDS``.
        return_weights: also return the weights (B, Hq, Nq, Nk) as used (after dropout).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, weights). A query row with no allowed key
        gives zeros and zero gradient. Half/bfloat16 inputs accumulate in float32. NaN/inf on
        every backend: a row that reads a non-finite q, k or v entry is NaN; masked keys never
        contribute (``attnkit._nonfinite``; docs/index.md).

    Cost: O(Nq * Nk * D) time; memory depends on the backend (reference: O(Nq * Nk)).
    """
    call = make_call(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap, dropout_p=dropout_p,
                     dropout_seed=dropout_seed, return_weights=return_weights)
    return nonfinite.run(BACKENDS[choose(call, backend)], call)


def which_backend(q, k, v, *, backend: str = "auto", **kwargs) -> str:
    """The backend ``attention`` would run for these arguments (for logs, demos and tests)."""
    return choose(make_call(q, k, v, **kwargs), backend)
