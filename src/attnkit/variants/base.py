"""What every attention variant spec states about itself, and the helpers variants share.

Legend: B batch, H query heads, Hk key/value heads, Nq queries, Nk keys, D head dim.

A variant spec is a small frozen dataclass (hashable, printable, comparable) holding the one
set of defaults of its family. ``MultiHeadAttention``, the models, the CLI and the integrations
never ask for its class: they ask the spec.

| question                         | member                                   |
|----------------------------------|------------------------------------------|
| registry word (``softmax``, ...) | ``name`` (class attribute)               |
| causal?                          | ``causal``                               |
| the causal version, or why not   | ``causal_version()``                     |
| can it decode? with which cache  | ``decode_reason()``, ``make_cache()``, ``check_cache()`` |
| a position scheme it accepts     | ``position_reason(position)``            |
| attention dropout / weights / a float bias / cross-attention | ``attention_dropout``, ``returns_weights``, ``takes_bias``, ``cross`` |
| shared query/key (no key projection) | ``shares_qk``                        |
| its module core                  | ``build_core(num_heads=, num_kv_heads=, head_dim=)`` |

A core is an ``nn.Module`` called as ``core(q, k, v, *, mask, bias, dropout_p, need_weights,
cache)`` with q (B, H, Nq, D), k, v (B, Hk, Nk, D) and ``mask`` one spec (the variant's own mask,
the call's masks and the key padding, combined by ``&``) or None; it returns (out (B, H, Nq, D),
weights (B, H, Nq, Nk) or None). ``cache`` is the layer's cache (for recurrent variants, the
state they carry); the module has already checked it with ``check_cache``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .._validate import check_broadcastable
from ..caches import KVCache, SlidingWindowCache
from ..masks import Mask, as_mask, causal, index_grid


def pos_int(cls: str, name: str, val, minimum: int = 1) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"{cls}: {name} must be an int >= {minimum}, got {val!r}")
    return val


def opt_pos_float(cls: str, name: str, val) -> None:
    if val is None:
        return
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
        raise ValueError(f"{cls}: {name} must be a finite number > 0 or None, got {val!r}")


def check_bool(cls: str, name: str, val) -> None:
    if not isinstance(val, bool):
        raise TypeError(f"{cls}: {name} must be a bool, got {val!r}")


def check_mask_spec(cls: str, mask) -> None:
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"{cls}: mask must be None or an attnkit.masks spec (e.g. causal()), got {type(mask).__name__}")


class Variant:
    """Base of the variant specs (mixed into frozen dataclasses). Defaults: a non-causal variant
    that cannot decode, forms no (Nq, Nk) weights, takes no float bias, no attention dropout."""

    name = "?"
    attention_dropout = False
    returns_weights = False
    takes_bias = False
    cross = True            # can attend to another sequence (context=)
    shares_qk = False       # keys are the queries (Reformer): the module has no key projection
    dot_product = True      # scores are q . k: a rotary embedding is meaningful
    forms_scores = False    # forms the (Nq, Nk) score matrix: score-changing positions apply

    @property
    def causal(self) -> bool:
        return False

    def with_own_mask(self, mask):
        """The mask a call runs with: the spec's own mask (if it has one) ``&`` the call's."""
        return mask

    def causal_version(self) -> Variant:
        """The causal form of this spec (for decoder self-attention), or raise saying why not."""
        if self.causal:
            return self
        raise ValueError(f"{self!r} has no causal form")

    def decode_reason(self) -> str | None:
        """None if a cached pass equals the full pass, else why it cannot decode."""
        return f"{type(self).__name__} attention cannot decode with a cache"

    def context_parallel_reason(self) -> str | None:
        """None if the core runs on a sequence shard (``context_parallel=``), else why not."""
        return f"{type(self).__name__} attention has no context-parallel form (ring attention is exact softmax)"

    def make_cache(self, *, max_batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype, device):
        """The cache this variant decodes with (called only when ``decode_reason()`` is None)."""
        return KVCache(max_batch, max_len, num_kv_heads, head_dim, dtype, device)

    def check_cache(self, cache) -> None:
        """Raise if ``cache`` is not one this variant decodes with."""
        reason = self.decode_reason()
        if reason:
            raise ValueError(f"cache={type(cache).__name__} given, but {reason}")
        if not isinstance(cache, KVCache):
            raise TypeError(f"{type(self).__name__} attention decodes with a KVCache, got {type(cache).__name__}")

    def position_reason(self, position) -> str | None:
        """None if ``position`` (a spec from ``attnkit.nn``) works with this variant, else why not."""
        if position is None:
            return None
        a, p = type(self).__name__, type(position).__name__
        if position.needs_scores and not self.forms_scores:
            return (f"position={p}() changes the score matrix, which {a} attention never forms; "
                    "use attention=Softmax(...) or position=Rope()/None")
        if position.needs_dot_product and not self.dot_product:
            return (f"position={p}() rotates q and k for a dot product; {a} attention scores with "
                    "tanh(W_q q + W_k k), where a rotation has no relative meaning")
        if position.needs_causal and not self.causal:
            return (f"position={p}(...) uses a segment memory of *past* inputs and needs a causal variant: "
                    "attention=Softmax(mask=causal()) (or a sliding window)")
        return None

    def build_core(self, *, num_heads: int, num_kv_heads: int, head_dim: int):
        raise NotImplementedError(f"{type(self).__name__} must implement build_core()")


class MaskedVariant(Variant):
    """A variant that honours any mask spec exactly (its ``mask`` field applies on every call):
    causal when the mask is; decodes with a KVCache, or a SlidingWindowCache of W keys when the
    mask reaches at most W keys back and depends only on k - q."""

    mask: Mask | None = None

    def with_own_mask(self, mask: Mask | None) -> Mask | None:
        if self.mask is None or mask is None:
            return self.mask if mask is None else mask
        return self.mask & mask

    @property
    def causal(self) -> bool:
        return self.mask is not None and self.mask.is_causal

    def causal_version(self) -> MaskedVariant:
        if self.causal:
            return self
        return dataclasses.replace(self, mask=causal() if self.mask is None else causal() & self.mask)

    def decode_reason(self) -> str | None:
        if self.causal:
            return None
        return (f"{type(self).__name__}(mask={self.mask!r}) is not causal, so a cached pass would differ from the full pass; "
                "use mask=causal() or sliding_window(left, 0) (optionally & other specs)")

    def _ring_ok(self, window: int) -> bool:
        """A ring buffer of ``window`` keys serves this mask."""
        w = self.mask.window if self.mask is not None else None
        return w is not None and w <= window and self.mask.translation_invariant

    def make_cache(self, *, max_batch, max_len, num_kv_heads, head_dim, dtype, device):
        w = self.mask.window if self.mask is not None else None
        if w is not None and w < max_len and self._ring_ok(w):
            return SlidingWindowCache(max_batch, max(w, 1), num_kv_heads, head_dim, dtype, device)
        return KVCache(max_batch, max_len, num_kv_heads, head_dim, dtype, device)

    def check_cache(self, cache) -> None:
        reason = self.decode_reason()
        if reason:
            raise ValueError(f"cache={type(cache).__name__} given, but {reason}")
        if isinstance(cache, SlidingWindowCache):
            if not self._ring_ok(cache.window):
                w = self.mask.window
                raise ValueError(f"SlidingWindowCache(window={cache.window}) keeps only the last {cache.window} keys, "
                                 f"but the mask {self.mask!r} reaches {'unboundedly far' if w is None else w} keys "
                                 "back or depends on absolute positions; use a KVCache or a larger window")
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"{type(self).__name__} attention decodes with a KVCache or SlidingWindowCache, got {type(cache).__name__}")



_CAUSAL = causal()


def split_key_mask(mask, *, batch: int, heads: int, nq: int, nk: int, device, variant: str, reason: str,
                   allow_causal: bool = True) -> tuple[bool, torch.Tensor | None]:
    """Split ``mask`` (None, a spec, or a bool tensor broadcastable to (B, H, Nq, Nk), True = may
    attend) into (causal, key_valid) for variants that sum over keys once per query set:
    ``key_valid`` (B', H', Nk) bool (B' in {1, B}, H' in {1, H}) is the AND of the key-only parts
    (padding), ``causal`` says whether ``causal()`` is one of the parts. Any other part raises a
    ValueError naming ``variant`` and ``reason``.
    """
    spec = as_mask(mask, batch=batch, heads=heads, nq=nq, nk=nk, device=device)
    if spec is None:
        return False, None
    is_causal, valid = False, None
    b, h, _, k = index_grid(batch, heads, 1, nk, device)
    for part in spec.conjuncts():
        if part == _CAUSAL and allow_causal:
            is_causal = True
        elif part.key_only:
            kv = part.allows(b, h, torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device) + (nk - 1), k,
                             num_keys=nk)
            while kv.dim() < 4:
                kv = kv.unsqueeze(0)
            kv = kv[:, :, 0]  # (B', H', Nk)
            valid = kv if valid is None else valid & kv
        else:
            extra = "" if allow_causal else " (and it is non-causal by construction)"
            raise ValueError(f"{variant} cannot honour the mask {part!r}: {reason}{extra}; only key padding"
                             f"{' and causal()' if allow_causal else ''} can be applied")
    return is_causal, valid


def key_valid(mask, *, batch: int, nk: int, device, variant: str, reason: str, nq: int | None = None):
    """(B, Nk) bool key validity (True = real key) from a key-padding-only ``mask``, or None."""
    _, valid = split_key_mask(mask, batch=batch, heads=1, nq=nk if nq is None else nq, nk=nk, device=device,
                              variant=variant, reason=reason, allow_causal=False)
    if valid is None:
        return None
    return torch.broadcast_to(valid[:, 0], (batch, nk))


__all__ = ["Variant", "MaskedVariant", "split_key_mask", "key_valid", "pos_int", "opt_pos_float", "check_bool", "check_mask_spec",
           "check_broadcastable"]
