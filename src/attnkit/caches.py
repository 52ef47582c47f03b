"""Caches for incremental decoding, one protocol: static KV, sliding-window ring buffer,
recurrent state, Transformer-XL segment memory, and a once-computed cross-attention KV.

Legend: B batch (<= max_batch), Hk key/value heads, L cached length, n new tokens, D head dim,
Dv value head dim, W window, E embed dim, M memory length.

The protocol (``Cache``), which ``MultiHeadAttention`` follows for every cache without asking
its type:

1. ``reuse()`` -> stored (k, v, valid) to attend instead of projecting new ones (a filled
   ``StaticKV``), else None;
2. ``update(k, v, valid)`` -> (k_all, v_all, valid_all): the keys/values this call attends,
   given the n new ones (appended to a buffer, prepended with a memory, or passed through);
3. the attention runs (recurrent variants read and write the state they carry, ``state``);
4. ``after(k_all, v_all, n)``: advance what the cache owns past the call (a segment memory
   keeps the newest M keys, a recurrent state counts the tokens).

``length`` is the number of tokens seen so far, i.e. the absolute position of the next token
(what RoPE needs as an offset); ``reset()`` empties the cache. Keys come back in chronological
order, so the library's bottom-right causal alignment makes a chunk of n new queries against all
returned keys exactly ``attnkit.attention(q, k, v, mask=causal())``. Buffers hold the cache's
dtype: keys/values of another floating dtype (e.g. bfloat16 under autocast) are cast on write.

Buffers track whether every key/value written is finite and a bound on their magnitude, and tag
the tensors they return with it, so ``attnkit.attention`` applies its NaN rule without rescanning
the whole cache at every step (``attnkit._nonfinite``).

Nothing is silently overwritten: a full ``KVCache`` raises naming max_len. The one documented
exception is ``SlidingWindowCache``, a ring buffer that keeps only the last ``window`` keys
(enough for ``sliding_window(left)`` masks with left <= window).
"""

from __future__ import annotations

import abc

import torch

from ._nonfinite import remember_stats, tensor_stats
from ._validate import shape_str


def _check_new(name: str, k: torch.Tensor, v: torch.Tensor, heads: int, head_dim: int, value_dim: int,
               max_batch: int, dtype: torch.dtype) -> tuple[int, int]:
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}.update: k and v must be 4-D (B, Hk, n, D) tensors, got "
                         f"{shape_str(k) if isinstance(k, torch.Tensor) else type(k).__name__}, "
                         f"{shape_str(v) if isinstance(v, torch.Tensor) else type(v).__name__}")
    B, H, n, D = k.shape
    if B > max_batch:
        raise ValueError(f"{name}.update: batch {B} exceeds max_batch={max_batch}; build the cache with a larger max_batch")
    if H != heads or D != head_dim:
        raise ValueError(f"{name}.update: k has shape {shape_str(k)}, expected (B, {heads}, n, {head_dim}) "
                         f"(num_kv_heads={heads}, head_dim={head_dim})")
    if tuple(v.shape) != (B, H, n, value_dim):
        raise ValueError(f"{name}.update: v has shape {shape_str(v)}, expected ({B}, {H}, {n}, {value_dim})")
    if not (k.is_floating_point() and v.is_floating_point()):
        raise TypeError(f"{name}.update: k, v must be floating point, got {k.dtype}, {v.dtype}")
    return B, n


def _check_valid(name: str, valid: torch.Tensor | None, B: int, n: int) -> None:
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (B, n)):
        raise ValueError(f"{name}.update: valid must be a bool (B, n) = ({B}, {n}) tensor (True = real token), "
                         f"got {valid.dtype} {shape_str(valid)}")


class Cache(abc.ABC):
    """The decoding-cache protocol (see the module docstring). Subclasses implement ``update`` and
    ``reset``; ``for_cross`` says whether the cache holds a fixed context (cross-attention)."""

    length: int = 0
    for_cross: bool = False

    def reuse(self):
        """Stored (k, v, valid) to attend instead of new projections, or None."""
        return None

    @abc.abstractmethod
    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None):
        """(k_all, v_all, valid_all or None) for n new keys k (B, Hk, n, D), v (B, Hk, n, Dv)."""

    def after(self, k_all: torch.Tensor, v_all: torch.Tensor, new: int) -> None:
        """Advance past a call that attended k_all / v_all with ``new`` new tokens (default: nothing
        to do; segment memory keeps the newest tokens here)."""
        return None

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything stored (a new sequence or context)."""


class _Buffers(Cache):
    """Preallocated k (max_batch, Hk, slots, D), v (max_batch, Hk, slots, Dv) and valid
    (max_batch, slots) buffers with position tracking, shared by KVCache and SlidingWindowCache."""

    def _allocate(self, slots_name: str, max_batch, slots, num_kv_heads, head_dim, dtype, device, value_dim) -> None:
        for nm, val in (("max_batch", max_batch), (slots_name, slots), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{type(self).__name__}: {nm} must be an int >= 1, got {val!r}")
        self.max_batch, self.num_kv_heads, self.head_dim = max_batch, num_kv_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.dtype = dtype
        self.k = torch.zeros(max_batch, num_kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(max_batch, num_kv_heads, slots, self.value_dim, dtype=dtype, device=device)
        self.valid = torch.ones(max_batch, slots, dtype=torch.bool, device=device)
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.batch: int | None = None
        self._padded = False
        self.valid.fill_(True)
        self._stats = [True, 0.0, True, 0.0]  # k all finite, max |k|, v all finite, max |v| (bounds)

    def _note(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fold the stats of newly written keys/values (in the cache's dtype) into the running ones."""
        (fk, mk), (fv, mv) = tensor_stats(k, v)
        s = self._stats
        self._stats = [s[0] and fk, max(s[1], mk), s[2] and fv, max(s[3], mv)]

    def _vouch(self, k_all: torch.Tensor, v_all: torch.Tensor) -> None:
        """Let ``attnkit.attention`` skip rescanning what this cache returns (see attnkit._nonfinite)."""
        remember_stats(k_all, self._stats[0], self._stats[1])
        remember_stats(v_all, self._stats[2], self._stats[3])

    @property
    def device(self) -> torch.device:
        return self.k.device


class KVCache(_Buffers):
    """Preallocated key/value cache for one attention layer.

    Args: max_batch, max_len (the most tokens it will ever hold), num_kv_heads, head_dim,
    dtype, device; value_dim defaults to head_dim. Buffers k (max_batch, Hk, max_len, D),
    v (max_batch, Hk, max_len, Dv) and valid (max_batch, max_len) (False = padding token).

    ``update(k, v, valid=None)`` appends n tokens and returns (k_all, v_all, valid_all), the
    first L = length + n positions (valid_all is None while no padding was ever written).
    Appending past max_len raises; use ``reset()`` to reuse the buffers. Memory O(B Hk max_len D).
    """

    def __init__(self, max_batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None, *, value_dim: int | None = None):
        self.max_len = max_len
        self._allocate("max_len", max_batch, max_len, num_kv_heads, head_dim, dtype, device, value_dim)

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None):
        B, n = _check_new("KVCache", k, v, self.num_kv_heads, self.head_dim, self.value_dim, self.max_batch, self.dtype)
        _check_valid("KVCache", valid, B, n)
        if self.batch is not None and B != self.batch:
            raise ValueError(f"KVCache.update: batch {B} differs from the batch {self.batch} already cached; reset() first")
        if self.length + n > self.max_len:
            raise ValueError(f"KVCache is full: max_len={self.max_len}, it holds {self.length} tokens and cannot take "
                             f"{n} more; build it with a larger max_len (nothing was written)")
        start, end = self.length, self.length + n
        k, v = k.to(self.dtype), v.to(self.dtype)
        self.k[:B, :, start:end] = k  # (B, Hk, n, D)
        self.v[:B, :, start:end] = v
        self._note(k, v)
        if valid is not None:
            self.valid[:B, start:end] = valid
            self._padded = self._padded or not bool(valid.all())
        self.batch, self.length = B, end
        k_all, v_all = self.k[:B, :, :end], self.v[:B, :, :end]  # (B, Hk, L, D), views of the buffers
        self._vouch(k_all, v_all)
        return k_all, v_all, (self.valid[:B, :end] if self._padded else None)

    def __repr__(self):
        return (f"KVCache(length={self.length}/{self.max_len}, batch={self.batch}/{self.max_batch}, "
                f"heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype})")


class SlidingWindowCache(_Buffers):
    """Ring buffer of the last ``window`` keys/values, for sliding-window attention.

    ``update(k, v, valid=None)`` returns the cached past (at most ``window`` most recent tokens,
    in chronological order) followed by the n new ones: (B, Hk, min(length, W) + n, D). It then
    keeps the last W of them, overwriting the oldest entries: this is the one cache that drops
    tokens, by design. It is exact for masks that reach at most W keys back
    (``sliding_window(left, 0)`` with left <= W); MultiHeadAttention checks this. Memory O(B Hk W D).
    """

    def __init__(self, max_batch: int, window: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None, *, value_dim: int | None = None):
        self.window = window
        self._allocate("window", max_batch, window, num_kv_heads, head_dim, dtype, device, value_dim)

    def _order(self, count: int) -> torch.Tensor:
        """Ring slots of the last ``count`` tokens, oldest first."""
        first = self.length - count
        return (torch.arange(first, self.length, device=self.k.device) % self.window)

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None):
        B, n = _check_new("SlidingWindowCache", k, v, self.num_kv_heads, self.head_dim, self.value_dim,
                          self.max_batch, self.dtype)
        _check_valid("SlidingWindowCache", valid, B, n)
        if self.batch is not None and B != self.batch:
            raise ValueError(f"SlidingWindowCache.update: batch {B} differs from the cached batch {self.batch}; reset() first")
        m = min(self.length, self.window)
        idx = self._order(m)
        k, v = k.to(self.dtype), v.to(self.dtype)
        valid_new = valid if valid is not None else torch.ones(B, n, dtype=torch.bool, device=k.device)
        k_all = torch.cat([self.k[:B, :, idx], k], dim=2)  # (B, Hk, m + n, D)
        v_all = torch.cat([self.v[:B, :, idx], v], dim=2)
        valid_all = torch.cat([self.valid[:B, idx], valid_new], dim=1)  # (B, m + n)
        keep = min(n, self.window)
        slots = torch.arange(self.length + n - keep, self.length + n, device=k.device) % self.window
        self.k[:B, :, slots] = k[:, :, n - keep:]
        self.v[:B, :, slots] = v[:, :, n - keep:]
        self.valid[:B, slots] = valid_new[:, n - keep:]
        self._note(k, v)  # running bounds over everything written (evicted tokens included: still bounds)
        if valid is not None:
            self._padded = self._padded or not bool(valid.all())
        self.batch, self.length = B, self.length + n
        self._vouch(k_all, v_all)
        return k_all, v_all, (valid_all if self._padded else None)

    def __repr__(self):
        return (f"SlidingWindowCache(length={self.length}, window={self.window}, batch={self.batch}/{self.max_batch}, "
                f"heads={self.num_kv_heads}, head_dim={self.head_dim})")


class RecurrentState(Cache):
    """Running state of causal linear-type attention (Linear, Performer) for decoding.

    The attention core stores its carried state in ``state`` (for linear attention the sums
    S = sum_j phi(k_j) v_j^T (B, H, F, Dv) and z = sum_j phi(k_j) (B, H, F)); ``length`` counts
    tokens seen. Memory O(B H F Dv), independent of the sequence length. Keys pass through.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.state = None
        self.length = 0

    def update(self, k, v, valid=None):
        return k, v, valid  # the variant folds the new (unpadded) keys into ``state``

    def after(self, k_all, v_all, new):
        self.length += new

    def __repr__(self):
        return f"RecurrentState(length={self.length}, {'empty' if self.state is None else 'filled'})"


class SegmentMemory(Cache):
    """Transformer-XL segment memory: the last ``mem_len`` keys/values of one layer, detached.

    MultiHeadAttention with position=XL(...) attends over cat[memory, current keys] and then
    calls ``advance(k_all, v_all)``; no gradient flows into the memory (Dai et al. 2019, sec. 3.2;
    caching k, v instead of the layer input gives the same forward values, see
    ``attnkit.positions.xl``). ``length`` counts tokens seen. Memory O(B Hk M D).
    With mem_len >= the tokens seen, decoding with it equals the full causal pass.
    """

    def __init__(self, mem_len: int):
        if not isinstance(mem_len, int) or isinstance(mem_len, bool) or mem_len < 0:
            raise ValueError(f"SegmentMemory: mem_len must be an int >= 0, got {mem_len!r}")
        self.mem_len = mem_len
        self.reset()

    def reset(self) -> None:
        self.memory: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, Hk, M, D), (B, Hk, M, Dv)
        self.length = 0

    def update(self, k, v, valid=None):
        """cat[memory, new] along the sequence: (B, Hk, M + n, D); padding is not tracked."""
        if valid is not None and not bool(valid.all()):
            raise ValueError("SegmentMemory: key_padding_mask with padded tokens; the memory does not track padding")
        if self.memory is None:
            return k, v, None
        if self.memory[0].shape[0] != k.shape[0]:
            raise ValueError(f"SegmentMemory holds batch {self.memory[0].shape[0]}, got batch {k.shape[0]}; reset() it")
        mk, mv = (m.to(k.dtype) for m in self.memory)
        return torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2), None  # (B, Hk, M + n, D)

    def after(self, k_all: torch.Tensor, v_all: torch.Tensor, new: int) -> None:
        """Keep the last mem_len of k_all / v_all (B, Hk, M + n, .), detached; n = new tokens."""
        if self.mem_len == 0:
            self.memory = None
        else:
            self.memory = (k_all[:, :, -self.mem_len:].detach(), v_all[:, :, -self.mem_len:].detach())
        self.length += new

    def __repr__(self):
        m = 0 if self.memory is None else self.memory[0].shape[2]
        return f"SegmentMemory(mem_len={self.mem_len}, holds={m}, length={self.length})"


class StaticKV(Cache):
    """Keys/values of a fixed context (cross-attention during decoding), computed once.

    The first forward with this cache projects ``context`` and stores k, v (and the context's
    padding); later calls reuse them and ignore the context argument's values (its shape is still
    checked). ``reset()`` clears it for a new context. ``length`` is the context length.
    """

    for_cross = True

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.k = self.v = self.valid = None
        self.length = 0

    @property
    def filled(self) -> bool:
        return self.k is not None

    def reuse(self):
        return (self.k, self.v, self.valid) if self.filled else None

    def update(self, k, v, valid=None):
        self.k, self.v, self.valid, self.length = k, v, valid, k.shape[2]
        for t, (finite, max_abs) in zip((k, v), tensor_stats(k, v)):  # checked once, reused every step
            remember_stats(t, finite, max_abs)
        return k, v, valid

    def __repr__(self):
        return f"StaticKV({'empty' if self.k is None else shape_str(self.k)})"


__all__ = ["Cache", "KVCache", "SlidingWindowCache", "RecurrentState", "SegmentMemory", "StaticKV", "Cache"]
