"""Data-carrying mask specs: key padding, packed documents, dense tensors, functions.

Legend: B batch, H query heads, Nq queries, Nk keys. Conventions as in ``attnkit.masks.base``
(True = may attend; query positions in key coordinates, bottom-right aligned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import check_broadcastable, check_elementwise, probe_grid, shape_str
from .base import Mask, _check_keys, _check_rows, _classify, _tile_bounds, check_tile_args, evaluate_tiles, gather_dense


class KeyPadding(Mask):
    """Keys j < lengths[b] are real; later keys are padding and never attended."""

    key_only = True

    def __init__(self, lengths: torch.Tensor):
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
            got = f"{lengths.dtype} {shape_str(lengths)}" if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"key_padding: lengths must be a 1-D integer tensor (B,), got {got}")
        if (lengths < 0).any():
            raise ValueError(f"key_padding: lengths must be >= 0, got {lengths.tolist()}")
        self.lengths = lengths.to(torch.int64)

    @property
    def device(self):
        return self.lengths.device

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def allows(self, b, h, q, k, *, num_keys=None):
        return k < self.lengths.to(k.device)[b]

    def data_tensors(self):
        return (self.lengths,)

    def check(self, nq, nk, *, batch=1, heads=1):
        if self.lengths.shape[0] != batch:
            raise ValueError(f"key_padding: lengths has {self.lengths.shape[0]} entries, expected batch size B={batch}")
        if self.lengths.numel() and int(self.lengths.max()) > nk:
            raise ValueError(f"key_padding: lengths {self.lengths.tolist()} exceed the number of keys Nk={nk}; "
                             "each length counts the real keys of its sequence (0 <= length <= Nk)")

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        self.check(nq, nk, batch=batch, heads=heads)
        _, _, k0, k1 = _tile_bounds(nq, nk, block_q, block_k, device)
        n = self.lengths.to(k0.device).view(-1, 1, 1, 1)
        tq = -(-nq // block_q)
        full = (k1 < n).expand(-1, 1, tq, -1)
        empty = (k0 >= n).expand(-1, 1, tq, -1)
        return _classify(full, empty)

    def __repr__(self):
        return f"key_padding({self.lengths.tolist() if self.lengths.numel() <= 8 else 'tensor'})"


def key_padding(lengths: torch.Tensor) -> Mask:
    """Mask padded keys: ``lengths`` (B,) gives the number of real keys of each sequence."""
    return KeyPadding(lengths)


class KeyValid(Mask):
    """Per-key validity (B, Nk), True = real key. Built from a padding tensor."""

    key_only = True

    def __init__(self, valid: torch.Tensor):
        self.valid = valid

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def device(self):
        return self.valid.device

    def check(self, nq, nk, *, batch=1, heads=1):
        _check_rows("key_padding_from_bool", "is_pad", self.valid.shape[0], batch)
        _check_keys("key_padding_from_bool", "is_pad", self.valid.shape[1], nk)

    def _size_hint(self):
        return self.valid.shape[1], self.valid.shape[1]

    def allows(self, b, h, q, k, *, num_keys=None):
        if num_keys is not None:
            _check_keys("key_padding_from_bool", "is_pad", self.valid.shape[1], num_keys)
        return self.valid.to(k.device)[b, k]

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        # Closed form, O(B * Nk): a key tile is FULL for row b when all its keys are real, EMPTY
        # when none is (left padding, arbitrary holes); the same for every query tile.
        check_tile_args(nq, nk, block_q, block_k)
        self.check(nq, nk, batch=batch, heads=heads)
        valid = self.valid.to(device or self.device)
        tk = -(-nk // block_k)
        tail = tk * block_k - nk
        any_ = F.pad(valid, (0, tail), value=False).view(-1, tk, block_k).any(dim=-1)  # (B, Tk)
        all_ = F.pad(valid, (0, tail), value=True).view(-1, tk, block_k).all(dim=-1)   # (B, Tk)
        tq = -(-nq // block_q)
        return _classify(all_.view(-1, 1, 1, tk).expand(-1, 1, tq, -1), ~any_.view(-1, 1, 1, tk).expand(-1, 1, tq, -1))

    def data_tensors(self):
        return (self.valid,)

    def __repr__(self):
        return f"key_padding_from_bool(tensor{tuple(self.valid.shape)})"


def key_padding_from_bool(is_pad: torch.Tensor) -> Mask:
    """From a (B, Nk) bool tensor where True marks PADDING (torch MHA's key_padding_mask)."""
    if not isinstance(is_pad, torch.Tensor) or is_pad.dtype != torch.bool or is_pad.dim() != 2:
        got = f"{is_pad.dtype} {shape_str(is_pad)}" if isinstance(is_pad, torch.Tensor) else type(is_pad).__name__
        raise ValueError(f"key_padding_from_bool: is_pad must be a bool tensor (B, Nk) with True = padding, got {got}")
    return KeyValid(~is_pad)


class Document(Mask):
    """Packed sequences: a query attends only keys of its own document (ids (B, Nk))."""

    def __init__(self, ids: torch.Tensor):
        if (not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.is_floating_point()
                or ids.dtype == torch.bool or ids.is_complex()):
            got = f"{ids.dtype} {shape_str(ids)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"document: ids must be an integer tensor (Nk,) or (B, Nk), got {got}")
        self.ids = (ids if ids.dim() == 2 else ids.unsqueeze(0)).to(torch.int64)

    @property
    def batch_size(self) -> int | None:
        return self.ids.shape[0] if self.ids.shape[0] > 1 else None

    @property
    def device(self):
        return self.ids.device

    def check(self, nq, nk, *, batch=1, heads=1):
        _check_rows("document", "ids", self.ids.shape[0], batch, shared_ok=True)
        _check_keys("document", "ids", self.ids.shape[1], nk)

    def _size_hint(self):
        return self.ids.shape[1], self.ids.shape[1]

    def allows(self, b, h, q, k, *, num_keys=None):
        if num_keys is not None:
            _check_keys("document", "ids", self.ids.shape[1], num_keys)
        ids = self.ids.to(k.device)
        bb = b if ids.shape[0] > 1 else torch.zeros_like(b)
        # A query before key 0 (Nq > Nk) belongs to no document.
        return (ids[bb, q.clamp_min(0)] == ids[bb, k]) & (q >= 0)

    def data_tensors(self):
        return (self.ids,)

    def tiles(self, nq, nk, block_q, block_k, *, batch=1, heads=1, device=None):
        # Closed form for sorted ids (the packed case): tile full iff one document spans it.
        self.check(nq, nk, batch=batch, heads=heads)
        ids = self.ids.to(device or self.device)
        if nq <= nk and bool((ids[:, 1:] >= ids[:, :-1]).all()):
            q0, q1, k0, k1 = _tile_bounds(nq, nk, block_q, block_k, ids.device)
            lo_q, hi_q = ids[:, q0.view(-1)].unsqueeze(-1), ids[:, q1.view(-1)].unsqueeze(-1)  # (B', Tq, 1)
            lo_k, hi_k = ids[:, k0.view(-1)].unsqueeze(1), ids[:, k1.view(-1)].unsqueeze(1)    # (B', 1, Tk)
            full = (lo_q == hi_q) & (lo_k == hi_k) & (lo_q == lo_k)
            empty = (hi_q < lo_k) | (hi_k < lo_q)
            return _classify(full.unsqueeze(1), empty.unsqueeze(1))
        return evaluate_tiles(self, nq, nk, block_q, block_k, batch=batch, heads=heads, device=device)

    def __repr__(self):
        return f"document(tensor{tuple(self.ids.shape)})"


def document(ids: torch.Tensor) -> Mask:
    """Packed sequences: ``ids`` (B, Nk) or (Nk,) labels each position with its document."""
    return Document(ids)


class TensorMask(Mask):
    """A dense bool tensor broadcastable to (B, H, Nq, Nk), wrapped as a spec.

    The tensor is indexed by query *row* (0..Nq-1); positions in key coordinates are shifted back.
    """

    def __init__(self, tensor: torch.Tensor, nq: int, nk: int):
        while tensor.dim() < 4:
            tensor = tensor.unsqueeze(0)
        self.tensor, self.nq, self.nk = tensor, nq, nk

    @property
    def dense_tensor(self) -> torch.Tensor:
        return self.tensor

    @property
    def key_only(self) -> bool:
        return self.tensor.shape[2] == 1

    @property
    def batch_size(self) -> int | None:
        return self.tensor.shape[0] if self.tensor.shape[0] > 1 else None

    @property
    def num_heads(self) -> int | None:
        return self.tensor.shape[1] if self.tensor.shape[1] > 1 else None

    @property
    def device(self):
        return self.tensor.device

    def check(self, nq, nk, *, batch=1, heads=1):
        want = (batch, heads, nq, nk)
        if any(g not in (1, w) for g, w in zip(self.tensor.shape, want)) or (nq, nk) != (self.nq, self.nk):
            raise ValueError(
                f"mask tensor of shape {shape_str(self.tensor)} (for Nq={self.nq}, Nk={self.nk}) does not broadcast "
                f"to (B, Hq, Nq, Nk) = {want}"
            )

    def _size_hint(self):
        return self.nq, self.nk

    def allows(self, b, h, q, k, *, num_keys=None):
        if num_keys is not None and num_keys != self.nk:
            raise ValueError(f"this tensor mask is for Nk={self.nk}, asked for Nk={num_keys}")
        return gather_dense(self.tensor, self.nq, self.nk, b, h, q, k)

    def data_tensors(self):
        return (self.tensor,)

    def to_dense(self, nq, nk=None, *, batch=None, heads=None, device=None):
        nk = nq if nk is None else nk
        if (nq, nk) != (self.nq, self.nk):
            raise ValueError(f"this tensor mask is for (Nq, Nk) = ({self.nq}, {self.nk}), asked for ({nq}, {nk})")
        batch = (self.batch_size or 1) if batch is None else batch
        heads = (self.num_heads or 1) if heads is None else heads
        self.check(nq, nk, batch=batch, heads=heads)
        return torch.broadcast_to(self.tensor, (batch, heads, nq, nk))

    def __repr__(self):
        return f"tensor_mask{tuple(self.tensor.shape)}"


class FunctionMask(Mask):
    def __init__(self, fn, name: str | None = None):
        self.fn, self.name = fn, name or getattr(fn, "__name__", "fn")

    def allows(self, b, h, q, k, *, num_keys=None):
        out = self.fn(b, h, q, k)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(f"mask function {self.name} must return a bool tensor, got {getattr(out, 'dtype', type(out))}")
        check_elementwise(f"mask function {self.name}", out, b, h, q, k)
        return out

    def check(self, nq, nk, *, batch=1, heads=1):
        self.allows(*probe_grid(nq, nk), num_keys=nk)  # type and shape of fn's result, on a tiny grid

    def __repr__(self):
        return f"from_function({self.name})"


def from_function(fn, name: str | None = None) -> Mask:
    """A mask from ``fn(b, h, q, k) -> bool tensor`` (flex's mask_mod; q in key coordinates)."""
    return FunctionMask(fn, name)


def as_mask(mask, *, batch: int, heads: int, nq: int, nk: int, device=None, name: str = "mask",
            float_hint: str = "pass float additive terms as bias=") -> Mask | None:
    """The one normaliser of a ``mask=`` argument: None, a spec, or a bool tensor (True = may attend)
    broadcastable to (B, H, Nq, Nk), returned as a spec checked against these sizes.

    Raises TypeError / ValueError naming ``name`` for anything else (float tensors: pass them
    as bias=; wrong shapes; another device).
    """
    if mask is None:
        return None
    if isinstance(mask, Mask):
        mask.check(nq, nk, batch=batch, heads=heads)  # data (lengths, ids, layouts) must fit
        return mask
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be None, a bool tensor or an attnkit.masks spec, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = may attend), got dtype {mask.dtype}; {float_hint}")
    if device is not None and mask.device != torch.device(device):
        raise ValueError(f"{name} is on {mask.device} but q is on {device}; move it with .to(q.device)")
    check_broadcastable(name, mask, (batch, heads, nq, nk), "(B, Hq, Nq, Nk)")
    return TensorMask(mask, nq, nk)
