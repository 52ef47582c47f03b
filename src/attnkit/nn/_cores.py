"""The attention cores MultiHeadAttention runs on projected heads, one per variant spec.

Legend: B batch, H query heads, Hk key/value heads, Nq queries, Nk keys, D head dim.

Each core is called as ``core(q, k, v, *, masking, bias, dropout_p, need_weights, state)`` with
q (B, H, Nq, D), k, v (B, Hk, Nk, D) and returns (out (B, H, Nq, D), weights (B, H, Nq, Nk) or
None). ``Masking`` carries the masks of one call, already in attnkit polarity (True = may
attend); each core takes what it can honour and raises with the reason for the rest. The
non-softmax variants live in their own modules (attnkit.linear, attnkit.performer, ...); a core
whose module is missing raises "not available: <module> is missing".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

from .. import _validate as V
from .. import masks as M
from ..functional import attention
from .cache import RecurrentState
from .specs import LSH, Additive, Linear, Linformer, Nystrom, Performer, Softmax


def require(module: str):
    """Import ``attnkit.<module>`` or raise saying it is not available."""
    try:
        return importlib.import_module(f"attnkit.{module}")
    except ModuleNotFoundError as e:
        if e.name in (f"attnkit.{module}",):
            raise ValueError(f"not available: attnkit.{module} is missing (this attention variant's module "
                             "has not been installed/written yet)") from None
        raise


@dataclass(frozen=True)
class Masking:
    """Masks of one call: ``spec`` (the variant's own mask & the call's mask spec), ``dense``
    (bool tensor broadcastable to (B, H, Nq, Nk), True = may attend: the call's tensor mask and
    torch's attn_mask), ``key_valid`` ((B, Nk) bool, True = real key)."""

    spec: M.Mask | None
    dense: torch.Tensor | None
    key_valid: torch.Tensor | None
    nq: int
    nk: int

    @staticmethod
    def build(variant, call_mask, torch_mask, key_valid, *, batch, heads, nq, nk) -> Masking:
        spec = getattr(variant, "mask", None)
        dense = torch_mask
        if isinstance(call_mask, M.Mask):
            spec = call_mask if spec is None else spec & call_mask
        elif isinstance(call_mask, torch.Tensor):
            if call_mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = may attend) or an attnkit.masks spec, got dtype "
                                f"{call_mask.dtype}; torch's attn_mask (True = blocked, or float) goes to torch_attn_mask=")
            V.check_broadcastable("mask", call_mask, (batch, heads, nq, nk), "(B, H, Nq, Nk)")
            dense = call_mask if dense is None else dense & call_mask
        elif call_mask is not None:
            raise TypeError(f"mask must be None, a bool tensor or an attnkit.masks spec, got {type(call_mask).__name__}")
        return Masking(spec, dense, key_valid, nq, nk)

    @property
    def key_padding(self) -> M.Mask | None:
        return None if self.key_valid is None else M.key_padding_from_bool(~self.key_valid)

    def combined(self) -> M.Mask | None:
        """Everything as one mask spec (None when nothing masks)."""
        parts = [p for p in (self.spec, self.key_padding) if p is not None]
        if self.dense is not None:
            parts.append(M.TensorMask(self.dense, self.nq, self.nk))
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        return out

    def only_key_padding(self, variant: str, reason: str) -> M.Mask | None:
        """The key padding spec; raise if anything else masks this call."""
        if self.spec is not None or self.dense is not None:
            what = self.spec if self.spec is not None else f"a bool mask tensor {V.shape_str(self.dense)}"
            raise ValueError(f"{variant} cannot honour the mask {what}: {reason}; only key padding is supported")
        return self.key_padding


def _no_weights(variant: str, need_weights: bool) -> None:
    if need_weights:
        raise ValueError(f"need_weights=True: {variant} attention never forms the (Nq, Nk) weight matrix")


def _no_bias(variant: str, bias) -> None:
    if bias is not None:
        raise ValueError(f"{variant} attention cannot add a float bias / float attn_mask to its scores "
                         "(it never forms them); pass bool masks instead")


class SoftmaxCore(nn.Module):
    """``attnkit.attention`` with the spec's backend, scale and softcap. Cost O(Nq Nk D)."""

    def __init__(self, spec: Softmax):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        s = self.spec
        res = attention(q, k, v, mask=masking.combined(), bias=bias, scale=s.scale, softcap=s.softcap,
                        dropout_p=dropout_p, backend=s.backend, return_weights=need_weights)
        return res if need_weights else (res, None)


class LinearCore(nn.Module):
    """``attnkit.linear.linear_attention`` (elu+1 or a callable feature map). Cost O(N D^2)."""

    def __init__(self, spec: Linear):
        super().__init__()
        self.lin = require("linear")
        fm = spec.feature_map
        if isinstance(fm, str):
            if fm not in ("elu+1", "elu_plus_one"):
                raise ValueError(f"Linear: feature_map must be 'elu+1' or a callable, got {fm!r}")
            fm = require("feature_maps").elu_plus_one
        self.feature_map, self.causal = fm, spec.causal

    def forward(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        _no_weights("Linear", need_weights)
        _no_bias("Linear", bias)
        mask = masking.combined()
        if state is None:
            return self.lin.linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal, mask=mask), None
        out, state.state = self.lin.linear_attention(q, k, v, feature_map=self.feature_map, causal=True, mask=mask,
                                                     state=state.state, return_state=True)
        return out, None


class LinformerCore(nn.Module):
    """``attnkit.linformer.linformer_attention`` with E, F (proj_dim, max_len) shared by heads."""

    def __init__(self, spec: Linformer, num_kv_heads: int):
        super().__init__()
        mod = require("linformer")
        self.fn = mod.linformer_attention
        self.proj = mod.LinformerProjections(mod.LinformerOptions(spec.max_len, spec.proj_dim, "headwise"), num_kv_heads)

    def forward(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        _no_weights("Linformer", need_weights)
        _no_bias("Linformer", bias)
        kp = masking.only_key_padding("Linformer", "every projected key mixes all positions, future ones included")
        return self.fn(q, k, v, self.proj.e, self.proj.f, key_padding=kp), None


class NystromCore(nn.Module):
    """``attnkit.nystrom.nystrom_attention`` (segment-mean landmarks, iterative pinv)."""

    def __init__(self, spec: Nystrom):
        super().__init__()
        self.fn = require("nystrom").nystrom_attention
        self.spec = spec

    def forward(self, q, k, v, *, masking, bias, dropout_p, need_weights, state):
        _no_weights("Nystrom", need_weights)
        _no_bias("Nystrom", bias)
        kp = masking.only_key_padding("Nystrom", "each landmark averages a whole segment of keys")
        qp = kp if kp is not None and q.shape[2] == k.shape[2] else None
        return self.fn(q, k, v, num_landmarks=self.spec.num_landmarks, pinv_iterations=self.spec.pinv_iterations,
                       key_padding=kp, query_padding=qp), None


def build_core(spec, *, num_heads: int, num_kv_heads: int, head_dim: int, device=None, dtype=None) -> nn.Module:
    if isinstance(spec, Softmax):
        return SoftmaxCore(spec)
    if isinstance(spec, Linear):
        return LinearCore(spec)
    if isinstance(spec, Linformer):
        return LinformerCore(spec, num_kv_heads).to(device=device, dtype=dtype)
    if isinstance(spec, Nystrom):
        return NystromCore(spec)
    if isinstance(spec, Performer):
        require("performer")
        from ._cores_extra import PerformerCore
        return PerformerCore(spec, num_heads=num_heads, head_dim=head_dim).to(device=device, dtype=dtype)
    if isinstance(spec, LSH):
        require("lsh")
        from ._cores_extra import LSHCore
        return LSHCore(spec)
    if isinstance(spec, Additive):
        require("additive")
        from ._cores_extra import AdditiveCore
        return AdditiveCore(spec, num_heads=num_heads, head_dim=head_dim).to(device=device, dtype=dtype)
    raise TypeError(f"unknown attention spec {spec!r}")


__all__ = ["Masking", "build_core", "require", "RecurrentState"]
