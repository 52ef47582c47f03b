"""``AttentionCall``: one validated exact-attention call, what every backend receives.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.

``make_call`` validates the user's arguments once (shapes, dtypes, devices, mask and bias data
against the sizes, scale and the range of the scores it gives, softcap, dropout; whether q, k, v
are finite, for the rule in ``attnkit._nonfinite``) and wraps tensor masks / biases as specs
(``TensorMask``, ``TensorBias``), so a backend consumes one kind of object. Derived data that
several backends or the dispatcher need (the dense mask, the dense bias) is built at most once
per call (``dense_mask()``, ``dense_bias()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _validate as V
from ._nonfinite import check_score_range, input_stats
from ._numerics import compute_dtype
from .biases import Bias, as_bias
from .masks import Mask, as_mask, causal

_CAUSAL = causal()


@dataclass(frozen=True)
class AttentionCall:
    q: torch.Tensor  # (B, Hq, Nq, D)
    k: torch.Tensor  # (B, Hk, Nk, D)
    v: torch.Tensor  # (B, Hk, Nk, Dv)
    mask: Mask | None
    bias: Bias | None
    scale: float
    softcap: float | None
    dropout_p: float
    dropout_seed: int | None
    return_weights: bool
    inputs_finite: bool = True  # q, k, v hold no NaN/inf (else ``_nonfinite.run`` applies the rule)
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """(B, Hq, Hk, Nq, Nk, D)."""
        B, Hq, Nq, D = self.q.shape
        return B, Hq, self.k.shape[1], Nq, self.k.shape[2], D

    @property
    def needs_grad(self) -> bool:
        ts = [self.q, self.k, self.v]
        if self.bias is not None:
            ts += list(self.bias.tensors())
        return torch.is_grad_enabled() and any(t.requires_grad for t in ts)

    @property
    def mask_tensor(self) -> torch.Tensor | None:
        """The bool tensor the user passed as mask (wrapped), else None."""
        return None if self.mask is None else self.mask.dense_tensor

    @property
    def bias_tensor(self) -> torch.Tensor | None:
        """The float tensor the user passed as bias (wrapped), else None."""
        return None if self.bias is None else self.bias.dense_tensor

    @property
    def plain_causal(self) -> bool:
        """The mask is exactly ``causal()`` and Nq == Nk (torch's is_causal)."""
        return self.mask == _CAUSAL and self.q.shape[2] == self.k.shape[2]

    def dense_mask(self) -> torch.Tensor:
        """The mask as a bool (B|1, Hq|1, Nq, Nk) tensor (True = may attend), built once per call."""
        if "mask" not in self.memo:
            B, Hq, Hk, Nq, Nk, D = self.shape
            t = self.mask.dense_tensor
            self.memo["mask"] = t if t is not None else self.mask.to_dense(Nq, Nk, batch=B, heads=Hq,
                                                                           device=self.q.device)
        return self.memo["mask"]

    def dense_bias(self) -> torch.Tensor:
        """The bias as a float tensor broadcastable to (B, Hq, Nq, Nk) in the compute dtype, built once."""
        if "bias" not in self.memo:
            B, Hq, Hk, Nq, Nk, D = self.shape
            self.memo["bias"] = self.bias.to_dense(Nq, Nk, batch=B, heads=Hq, device=self.q.device,
                                                   dtype=compute_dtype(self.q.dtype))
        return self.memo["bias"]

    def describe(self) -> str:
        """One line naming the call: shapes, dtype, device, mask and bias kinds, options."""
        B, Hq, Hk, Nq, Nk, D = self.shape
        parts = [f"q {tuple(self.q.shape)}, k {tuple(self.k.shape)}, v {tuple(self.v.shape)}",
                 f"{self.q.dtype} on {self.q.device}",
                 f"mask={self.mask!r}" if self.mask is not None else "no mask",
                 f"bias={self.bias!r}" if self.bias is not None else "no bias"]
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.dropout_p:
            parts.append(f"dropout_p={self.dropout_p}")
        if self.return_weights:
            parts.append("return_weights=True")
        if self.needs_grad:
            parts.append("needs grad")
        return ", ".join(parts)


def make_call(q, k, v, *, mask=None, bias=None, scale=None, softcap=None, dropout_p=0.0,
              dropout_seed=None, return_weights=False) -> AttentionCall:
    """Validate arguments and build the AttentionCall every backend receives."""
    V.check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    sizes = {"batch": B, "heads": Hq, "nq": Nq, "nk": Nk, "device": q.device}
    dropout_p = V.check_dropout(dropout_p)
    dropout_seed = V.check_seed(dropout_seed)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2**31 - 1, ()).item())
    checked_scale = V.check_scale(scale, D)
    finite, max_q, max_k = input_stats(q, k, v)
    check_score_range(q, max_q, max_k, checked_scale, name_scale=scale is not None, k=k)
    return AttentionCall(
        q=q, k=k, v=v,
        mask=as_mask(mask, **sizes),
        bias=as_bias(bias, **sizes),
        scale=checked_scale,
        softcap=V.check_softcap(softcap),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        return_weights=V.check_bool("return_weights", return_weights),
        inputs_finite=finite,
    )


__all__ = ["AttentionCall", "make_call"]
