"""What every softmax-attention backend receives and must state.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.

``attnkit.attention`` validates the user's arguments once and hands every backend the same
``AttentionCall``: tensor masks and biases are already wrapped as specs (``TensorMask``,
``TensorBias``) so a backend consumes one kind of object. A backend reports
``not_supported_reasons(call)`` (empty list = it can run this call and give the reference's
result within the dtype's tolerance) and ``run(call)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..biases import Bias, TensorBias
from ..masks import Mask, TensorMask


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
        return self.mask.tensor if isinstance(self.mask, TensorMask) else None

    @property
    def bias_tensor(self) -> torch.Tensor | None:
        return self.bias.tensor if isinstance(self.bias, TensorBias) else None


class Backend:
    """Base class: a name, reasons it cannot run a call, and how to run it."""

    name: str = "?"

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        raise NotImplementedError(f"backend {self.name} must state not_supported_reasons()")

    def run(self, call: AttentionCall):
        """Return out (B, Hq, Nq, Dv), or (out, weights (B, Hq, Nq, Nk)) if call.return_weights."""
        raise NotImplementedError(f"backend {self.name} must implement run()")
