"""``attnkit.attention``: the one entry point for exact softmax attention.

Legend: B batch, Hq query heads, Hk key/value heads (Hq % Hk == 0), Nq queries, Nk keys,
D head dim, Dv value head dim.
"""

from __future__ import annotations

import torch

from . import _validate as V
from .backends import BACKENDS
from .backends.base import AttentionCall
from .biases import Bias, TensorBias
from .dispatch import choose
from .masks import Mask, TensorMask


def _wrap_mask(mask, target, nq, nk, q) -> Mask | None:
    if mask is None:
        return None
    if isinstance(mask, Mask):
        mask.check(nq, nk, batch=target[0], heads=target[1])  # data (lengths, ids, layouts) must fit
        return mask
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None, a bool tensor or an attnkit.masks spec, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}; "
            "pass float additive terms as bias="
        )
    V.check_device("mask", mask, q)
    V.check_broadcastable("mask", mask, target, "(B, Hq, Nq, Nk)")
    return TensorMask(mask, nq, nk)


def _wrap_bias(bias, target, nq, nk, q) -> Bias | None:
    if bias is None:
        return None
    if isinstance(bias, Bias):
        bias.check(nq, nk, batch=target[0], heads=target[1])
        return bias
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be None, a float tensor or an attnkit.biases spec, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got dtype {bias.dtype}; pass bool masks as mask=")
    V.check_device("bias", bias, q)
    V.check_broadcastable("bias", bias, target, "(B, Hq, Nq, Nk)")
    return TensorBias(bias, nq, nk)


def make_call(q, k, v, *, mask=None, bias=None, scale=None, softcap=None, dropout_p=0.0,
              dropout_seed=None, return_weights=False) -> AttentionCall:
    """Validate arguments and build the AttentionCall every backend receives."""
    V.check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    target = (B, Hq, Nq, Nk)
    dropout_p = V.check_dropout(dropout_p)
    dropout_seed = V.check_seed(dropout_seed)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return AttentionCall(
        q=q, k=k, v=v,
        mask=_wrap_mask(mask, target, Nq, Nk, q),
        bias=_wrap_bias(bias, target, Nq, Nk, q),
        scale=V.check_scale(scale, D),
        softcap=V.check_softcap(softcap),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        return_weights=bool(return_weights),
    )


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
        gives zeros and zero gradient. Half/bfloat16 inputs accumulate in float32.

    Cost: O(Nq * Nk * D) time; memory depends on the backend (reference: O(Nq * Nk)).
    """
    call = make_call(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap, dropout_p=dropout_p,
                     dropout_seed=dropout_seed, return_weights=return_weights)
    return BACKENDS[choose(call, backend)].run(call)


def which_backend(q, k, v, *, backend: str = "auto", **kwargs) -> str:
    """The backend ``attention`` would run for these arguments (for logs, demos and tests)."""
    return choose(make_call(q, k, v, **kwargs), backend)
