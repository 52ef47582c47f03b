"""Bias specs: additive score biases computed from positions, so kernels never need Nq x Nk.

Legend: B batch, H query heads, Nq queries, Nk keys.

A bias spec is called as ``bias(b, h, q, k)`` with broadcastable int64 index tensors (q in key
coordinates, see ``attnkit.masks``) and returns a float tensor of their broadcast shape. It is
added to the scaled (and soft-capped) scores: s = softcap(scale * q.k) + bias.

Learnable biases (T5's table, ...) list their trainable tensors in ``tensors()``; a backend that
evaluates the bias per tile must route gradients to them (the reference does so by autograd).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._validate import check_broadcastable, check_elementwise, probe_grid, shape_str
from .masks import gather_dense, index_grid


class Bias:
    """Base class of bias specs: ``bias(b, h, q, k)`` -> float tensor of the indices' broadcast shape."""

    dense_tensor: torch.Tensor | None = None  # the tensor of a wrapped float tensor (TensorBias)

    # True when the bias depends only on the head and the offset r = k - q; such specs implement
    # ``relative(h, r)``, which lets tiled kernels reduce gradients per offset, not per pair.
    translation_invariant: bool = False
    # True when, moreover, ``relative(h, r)`` is linear in r (slope[h] * r, e.g. causal ALiBi): over any
    # rectangle the bias is then a per-key term relative(h, k - q0) minus a per-query constant
    # relative(h, q - q0), which the softmax ignores (kernels add a (1, H, 1, L) key row, no table).
    linear_in_offset: bool = False

    def __call__(self, b, h, q, k) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def relative(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The bias at head indices h and offsets r = k - q (broadcast), for translation-invariant specs."""
        raise TypeError(f"{self!r} is not translation-invariant (translation_invariant is False)")

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors the bias reads that may require grad (for per-tile backward passes)."""
        return ()

    def terms(self) -> tuple[Bias, ...]:
        """The specs whose sum this is (itself for anything but a sum)."""
        return (self,)

    def check(self, nq: int, nk: int, *, batch: int = 1, heads: int = 1) -> None:
        """Raise a ValueError if this spec cannot describe a (batch, heads, Nq, Nk) input."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to_dense(self, nq: int, nk: int | None = None, *, batch: int = 1, heads: int = 1,
                 device=None, dtype=torch.float32) -> torch.Tensor:
        """Float tensor broadcastable to (batch, heads, Nq, Nk) (ignored dims stay size 1)."""
        nk = nq if nk is None else nk
        b, h, q, k = index_grid(batch, heads, nq, nk, device or self.device)
        out = self(b, h, q, k)
        while out.dim() < 4:
            out = out.unsqueeze(0)
        return out.to(dtype)

    def __add__(self, other: Bias) -> Bias:
        if not isinstance(other, Bias):
            raise TypeError(f"bias specs add only to other bias specs, got {type(other).__name__}")
        return SumBias((self, other))

    def picture(self, nq: int = 8, nk: int | None = None, *, head: int = 0) -> str:
        dense = self.to_dense(nq, nk, heads=head + 1).expand(1, head + 1, nq, nk or nq)[0, head]
        return "\n".join(" ".join(f"{x:6.2f}" for x in row.tolist()) for row in dense)


class SumBias(Bias):
    def __init__(self, parts: Sequence[Bias]):
        self.parts = tuple(parts)

    def __call__(self, b, h, q, k):
        out = self.parts[0](b, h, q, k)
        for p in self.parts[1:]:
            out = out + p(b, h, q, k)
        return out

    def tensors(self):
        return tuple(t for p in self.parts for t in p.tensors())

    def to_dense(self, nq, nk=None, *, batch=1, heads=1, device=None, dtype=torch.float32):
        """The sum of the parts' dense forms, each converted to ``dtype`` first (float64 sums of
        float32 parts stay exact to float64 rounding, like a tiled backend adding them one by one)."""
        out = None
        for p in self.parts:
            d = p.to_dense(nq, nk, batch=batch, heads=heads, device=device, dtype=dtype)
            out = d if out is None else out + d
        return out

    def terms(self):
        return tuple(t for p in self.parts for t in p.terms())

    def check(self, nq, nk, *, batch=1, heads=1):
        for p in self.parts:
            p.check(nq, nk, batch=batch, heads=heads)

    @property
    def device(self):
        return self.parts[0].device

    def __repr__(self):
        return " + ".join(repr(p) for p in self.parts)


class FunctionBias(Bias):
    def __init__(self, fn: Callable, tensors: Sequence[torch.Tensor] = (), name: str | None = None):
        if not callable(fn):
            raise TypeError(f"from_function: fn must be callable, got {type(fn).__name__}")
        self.fn, self._tensors = fn, tuple(tensors)
        self.name = name or getattr(fn, "__name__", "fn")

    def __call__(self, b, h, q, k):
        out = self.fn(b, h, q, k)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TypeError(f"bias function {self.name} must return a float tensor, got {getattr(out, 'dtype', type(out))}")
        check_elementwise(f"bias function {self.name}", out, b, h, q, k)
        return out

    def check(self, nq, nk, *, batch=1, heads=1):
        self(*probe_grid(nq, nk, self.device))  # type and shape of fn's result, on a tiny grid

    def tensors(self):
        return self._tensors

    @property
    def device(self):
        return self._tensors[0].device if self._tensors else torch.device("cpu")

    def __repr__(self):
        return f"from_function({self.name})"


def from_function(fn: Callable, *, tensors: Sequence[torch.Tensor] = (), name: str | None = None) -> Bias:
    """A bias spec from ``fn(b, h, q, k) -> float tensor`` (an additive flex score_mod).

    Pass any learnable tensors that ``fn`` closes over as ``tensors=`` so per-tile backends can
    compute their gradients. Example: ``from_function(lambda b, h, i, j: -0.01 * (i - j).float())``.
    """
    return FunctionBias(fn, tensors, name)


class TensorBias(Bias):
    """A dense float tensor broadcastable to (B, H, Nq, Nk), indexed by query row."""

    def __init__(self, tensor: torch.Tensor, nq: int, nk: int):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() > 4:
            got = f"{tensor.dtype} {shape_str(tensor)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"TensorBias: tensor must be a floating-point tensor with <= 4 dims, got {got}")
        while tensor.dim() < 4:
            tensor = tensor.unsqueeze(0)
        self.tensor, self.nq, self.nk = tensor, nq, nk

    @property
    def dense_tensor(self) -> torch.Tensor:
        return self.tensor

    def check(self, nq, nk, *, batch=1, heads=1):
        want = (batch, heads, nq, nk)
        if any(g not in (1, w) for g, w in zip(self.tensor.shape, want)) or (nq, nk) != (self.nq, self.nk):
            raise ValueError(
                f"bias tensor of shape {shape_str(self.tensor)} (for Nq={self.nq}, Nk={self.nk}) does not broadcast "
                f"to (B, Hq, Nq, Nk) = {want}"
            )

    def __call__(self, b, h, q, k):
        return gather_dense(self.tensor, self.nq, self.nk, b, h, q, k)

    def tensors(self):
        return (self.tensor,)

    @property
    def device(self):
        return self.tensor.device

    def to_dense(self, nq, nk=None, *, batch=1, heads=1, device=None, dtype=None):
        return self.tensor if dtype is None else self.tensor.to(dtype)

    def __repr__(self):
        return f"tensor_bias{tuple(self.tensor.shape)}"


def as_bias(bias, *, batch: int, heads: int, nq: int, nk: int, device=None, name: str = "bias") -> Bias | None:
    """The one normaliser of a ``bias=`` argument: None, a spec, or a float tensor broadcastable
    to (B, H, Nq, Nk), returned as a spec checked against these sizes."""
    if bias is None:
        return None
    if isinstance(bias, Bias):
        bias.check(nq, nk, batch=batch, heads=heads)
        return bias
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name} must be None, a float tensor or an attnkit.biases spec, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {bias.dtype}; pass bool masks as mask=")
    if device is not None and bias.device != torch.device(device):
        raise ValueError(f"{name} is on {bias.device} but q is on {device}; move it with .to(q.device)")
    check_broadcastable(name, bias, (batch, heads, nq, nk), "(B, Hq, Nq, Nk)")
    if bool(torch.isposinf(bias.detach()).any()):
        n = int(torch.isposinf(bias.detach()).sum())
        raise ValueError(f"{name} has {n} entries equal to +inf, which make the softmax NaN; a float bias may hold "
                         "finite values and -inf (blocked) only: block pairs with a bool mask= or -inf")
    return TensorBias(bias, nq, nk)


__all__ = ["Bias", "from_function", "SumBias", "TensorBias", "FunctionBias", "as_bias"]
