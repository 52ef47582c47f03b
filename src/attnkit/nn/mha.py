"""``MultiHeadAttention``: projections, heads, positions, caches around one attention variant.

Legend: B batch, Nq queries (x), Nk keys (x itself, the context, or the cache), E embed dim,
H query heads, Hk key/value heads (H % Hk == 0, grouped-query), D = E // H head dim,
kdim / vdim widths of the key / value inputs of cross-attention.

Conventions: inputs (B, N, E) (batch_first=False: (N, B, E), as torch's default). ``mask`` is a
spec from ``attnkit.masks`` or a bool tensor broadcastable to (B, H, Nq, Nk) with
True = may attend; ``key_padding_mask`` (B, Nk) has torch's polarity (True = padding) and is
converted here with ``attnkit.masks.key_padding_from_bool``; ``torch_attn_mask`` takes torch's
``attn_mask`` (bool True = blocked, or float added) and is converted here too. A query row with
no allowed key gives zeros (torch gives NaN).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import masks as M
from .._validate import shape_str
from ..biases import SumBias, TensorBias
from . import torch_compat as TC
from ._cores import Masking, build_core
from ._positions import build_position
from .cache import KVCache, RecurrentState, SegmentMemory, SlidingWindowCache, StaticKV
from .specs import (
    XL,
    Linear,
    Performer,
    Rope,
    Softmax,
    can_decode,
    check_combination,
    mask_is_relative,
    mask_window,
)


def _check_int(name: str, val, minimum: int = 1) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"MultiHeadAttention: {name} must be an int >= {minimum}, got {val!r}")
    return val


class MultiHeadAttention(nn.Module):
    """Multi-head (grouped-query) self- and cross-attention with a choice of variant and positions.

    Args:
        embed_dim: E. num_heads: H (E % H == 0; head dim D = E // H).
        num_kv_heads: Hk for grouped-query / multi-query attention (default H).
        kdim, vdim: widths of the key / value inputs for cross-attention (default E).
        bias: biases on the four projections. dropout: on the attention weights (Softmax only;
            a seeded hash pattern, see ``attnkit.attention``), active in training mode.
        attention: a spec from ``attnkit.nn.specs`` (default ``Softmax()``: full, non-causal).
        position: None or Rope / Alibi / T5 / Shaw / XL (self-attention only).
        batch_first: True for (B, N, E) inputs; False for (N, B, E).

    Parameters ``q_proj`` (E -> E), ``k_proj`` (kdim -> Hk D), ``v_proj`` (vdim -> Hk D),
    ``out_proj`` (E -> E). Cost: O(N E^2) for projections plus the variant's cost.
    Invalid variant/position/dropout combinations raise at construction with the reason.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0, attention=None, position=None,
                 batch_first: bool = True, device=None, dtype=None):
        super().__init__()
        E = _check_int("embed_dim", embed_dim)
        H = _check_int("num_heads", num_heads)
        Hk = H if num_kv_heads is None else _check_int("num_kv_heads", num_kv_heads)
        if E % H:
            raise ValueError(f"MultiHeadAttention: embed_dim={E} must be divisible by num_heads={H}")
        if H % Hk:
            raise ValueError(f"MultiHeadAttention: num_heads={H} must be a multiple of num_kv_heads={Hk}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: dropout must be a float in [0, 1), got {dropout!r}")
        attention = Softmax() if attention is None else attention
        check_combination(attention, position, dropout=dropout)
        self.embed_dim, self.num_heads, self.num_kv_heads = E, H, Hk
        self.head_dim = D = E // H
        self.kdim = E if kdim is None else _check_int("kdim", kdim)
        self.vdim = E if vdim is None else _check_int("vdim", vdim)
        self.dropout, self.batch_first, self.has_bias = float(dropout), bool(batch_first), bool(bias)
        self.attention, self.position = attention, position
        fk = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(E, H * D, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kdim, Hk * D, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, Hk * D, bias=bias, **fk)
        self.out_proj = nn.Linear(H * D, E, bias=bias, **fk)
        self.pos = build_position(position, attention, num_heads=H, head_dim=D, embed_dim=E, **fk)
        self.core = build_core(attention, num_heads=H, num_kv_heads=Hk, head_dim=D, **fk)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"attention={self.attention!r}, position={self.position!r}")

    # -- caches ----------------------------------------------------------------------------------
    def make_cache(self, max_batch: int, max_len: int, *, dtype=None, device=None):
        """The cache this layer decodes with: KVCache, SlidingWindowCache (sliding-window masks,
        ring of the window), RecurrentState (causal Linear/Performer) or SegmentMemory (XL)."""
        reason = can_decode(self.attention, self.position)
        if reason:
            raise ValueError(f"this layer cannot decode with a cache: {reason}")
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        if isinstance(self.position, XL):
            return SegmentMemory(self.position.mem_len)
        if isinstance(self.attention, (Linear, Performer)):
            return RecurrentState()
        w = mask_window(self.attention.mask)
        if w is not None and w < max_len and isinstance(self.attention, Softmax) and mask_is_relative(self.attention.mask):
            return SlidingWindowCache(max_batch, w, self.num_kv_heads, self.head_dim, dtype, device)
        return KVCache(max_batch, max_len, self.num_kv_heads, self.head_dim, dtype, device)

    def _check_cache(self, cache, cross: bool) -> None:
        if cache is None:
            return
        if cross:
            if not isinstance(cache, StaticKV):
                raise TypeError(f"cross-attention caches its context's keys/values in a StaticKV, got {type(cache).__name__}")
            return
        if isinstance(cache, StaticKV):
            raise TypeError("StaticKV is for cross-attention (context=...); self-attention decodes with the cache "
                            "from make_cache()")
        reason = can_decode(self.attention, self.position)
        if reason:
            raise ValueError(f"cache={type(cache).__name__} given, but {reason}")
        if isinstance(self.position, XL):
            if not isinstance(cache, SegmentMemory):
                raise TypeError(f"position=XL decodes with a SegmentMemory, got {type(cache).__name__}")
            return
        if isinstance(self.attention, (Linear, Performer)):
            if not isinstance(cache, RecurrentState):
                raise TypeError(f"{type(self.attention).__name__} attention decodes with a RecurrentState, got "
                                f"{type(cache).__name__}")
            return
        if isinstance(cache, SlidingWindowCache):
            mask = self.attention.mask
            w = mask_window(mask)
            if not mask_is_relative(mask) or w is None or w > cache.window:
                raise ValueError(f"SlidingWindowCache(window={cache.window}) keeps only the last {cache.window} keys, "
                                 f"but the mask {mask!r} reaches {'unboundedly far' if w is None else w} keys back or "
                                 "depends on absolute positions; use a KVCache or a larger window")
            if not isinstance(self.attention, Softmax):
                raise TypeError("SlidingWindowCache works with Softmax attention")
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, SlidingWindowCache, RecurrentState, SegmentMemory or StaticKV, "
                            f"got {type(cache).__name__}")

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask=None, key_padding_mask: torch.Tensor | None = None, torch_attn_mask: torch.Tensor | None = None,
                cache=None, need_weights: bool = False, average_attn_weights: bool = True):
        """Attend from x to itself (self-attention) or to ``context`` (cross-attention).

        Args:
            x: (B, Nq, E) queries (and keys/values in self-attention).
            context: (B, Nc, kdim) keys source for cross-attention, any length Nc.
            value: (B, Nc, vdim) values source when it differs from ``context`` (torch's
                separate key/value inputs; required when kdim != vdim).
            mask: a mask spec (combined with the variant's own mask by ``&``) or a bool tensor
                broadcastable to (B, H, Nq, Nk) with True = may attend. Nk counts cached keys.
            key_padding_mask: (B, Nk') bool, True = padding, for the keys this call adds: x's
                tokens in self-attention (the new tokens when decoding with a cache; the cache
                remembers them), the context's in cross-attention.
            torch_attn_mask: torch's attn_mask ((Nq, Nk) or (B * H, Nq, Nk); bool True = blocked,
                or float added to the scores), converted here.
            cache: from ``make_cache`` (self-attention) or a ``StaticKV`` (cross-attention).
            need_weights: also return the attention weights; average_attn_weights: mean over
                heads (B, Nq, Nk) like torch, else per head (B, H, Nq, Nk).

        Returns: out (B, Nq, E), or (out, weights) when need_weights.
        """
        if not self.batch_first:
            x = x.transpose(0, 1)
            context = None if context is None else context.transpose(0, 1)
            value = None if value is None else value.transpose(0, 1)
        out, w = self._forward(x, context, value, mask, key_padding_mask, torch_attn_mask, cache, need_weights)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (Nq, B, E)
        if not need_weights:
            return out
        return out, (w.mean(dim=1) if average_attn_weights else w)

    def _check_input(self, name: str, t, width: int, batch: int | None) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = shape_str(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D (B, N, {width}) tensor, got {got}")
        if t.shape[2] != width or (batch is not None and t.shape[0] != batch):
            raise ValueError(f"{name} has shape {shape_str(t)}, expected ({batch or 'B'}, N, {width})")

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, heads, self.head_dim).transpose(1, 2)  # (B, heads, N, D)

    def _forward(self, x, context, value, mask, key_padding_mask, torch_attn_mask, cache, need_weights):
        self._check_input("x", x, self.embed_dim, None)
        B, Nq, _ = x.shape
        cross = context is not None
        if value is not None and not cross:
            raise ValueError("value= is the value input of cross-attention; pass context= as well")
        self._check_cache(cache, cross)
        if cross:
            if self.position is not None:
                raise ValueError(f"position={self.position!r} relates positions within one sequence; queries and "
                                 "context do not share positions, so cross-attention takes position=None")
            value = context if value is None else value
            self._check_input("context", context, self.kdim, B)
            self._check_input("value", value, self.vdim, B)
            if value.shape[1] != context.shape[1]:
                raise ValueError(f"value {shape_str(value)} and context {shape_str(context)} must have the same length")
            key_in, val_in = context, value
        else:
            if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
                raise ValueError(f"self-attention needs kdim == vdim == embed_dim ({self.kdim}, {self.vdim}, "
                                 f"{self.embed_dim}); pass context= for cross-attention")
            key_in = val_in = x
        offset = 0 if cache is None or isinstance(cache, StaticKV) else cache.length

        q = self._heads(self.q_proj(x), self.num_heads)  # (B, H, Nq, D)
        key_valid = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (B, Nk) with True = padding (torch's polarity); "
                                "for torch's float masks use torch_forward()")
            M.key_padding_from_bool(key_padding_mask)  # validates (B, Nk) bool
            if tuple(key_padding_mask.shape) != (B, key_in.shape[1]):
                raise ValueError(f"key_padding_mask has shape {shape_str(key_padding_mask)}, expected "
                                 f"({B}, {key_in.shape[1]}): one flag per key this call adds (True = padding)")
            key_valid = ~key_padding_mask  # (B, Nk'), True = real key
        if isinstance(cache, StaticKV) and cache.filled:
            if cache.k.shape[0] != B:
                raise ValueError(f"StaticKV holds batch {cache.k.shape[0]}, got batch {B}; reset() it for a new context")
            k, v, key_valid = cache.k, cache.v, cache.valid
        else:
            k = self._heads(self.k_proj(key_in), self.num_kv_heads)  # (B, Hk, Nk, D)
            v = self._heads(self.v_proj(val_in), self.num_kv_heads)  # (B, Hk, Nk, D)
            if isinstance(self.position, Rope):
                q, k = self.pos.rotate(q, k, q_offset=offset, k_offset=offset)
            if isinstance(cache, StaticKV):
                cache.k, cache.v, cache.valid, cache.length = k, v, key_valid, k.shape[2]
        if isinstance(cache, (KVCache, SlidingWindowCache)):
            k, v, key_valid = cache.update(k, v, key_valid)
        elif isinstance(cache, SegmentMemory) and cache.memory is not None:
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask with a SegmentMemory: the memory does not track padding")
            if cache.memory[0].shape[0] != B:
                raise ValueError(f"SegmentMemory holds batch {cache.memory[0].shape[0]}, got batch {B}; reset() it")
            k = torch.cat([cache.memory[0], k], dim=2)  # (B, Hk, M + Nq, D)
            v = torch.cat([cache.memory[1], v], dim=2)
        Nk = k.shape[2]

        tmask, tbias = TC.convert_attn_mask(torch_attn_mask, batch=B, num_heads=self.num_heads, nq=Nq, nk=Nk)
        masking = Masking.build(self.attention, mask, tmask, key_valid, batch=B, heads=self.num_heads, nq=Nq, nk=Nk)
        bias = None if tbias is None else TensorBias(tbias, Nq, Nk)
        pos_bias = self.pos.bias(nq=Nq, nk=Nk) if self.pos is not None else None
        if pos_bias is not None:
            bias = pos_bias if bias is None else SumBias((pos_bias, bias))
        dropout_p = self.dropout if self.training else 0.0
        attend = self.pos.attend if self.pos is not None and self.pos.computes_attention else self.core
        out, w = attend(q, k, v, masking=masking, bias=bias, dropout_p=dropout_p, need_weights=need_weights,
                        state=cache if isinstance(cache, RecurrentState) else None)
        if isinstance(cache, SegmentMemory):
            cache.advance(k, v, Nq)
        elif isinstance(cache, RecurrentState):
            cache.length += Nq
        out = out.transpose(1, 2).reshape(B, Nq, self.num_heads * self.head_dim)  # (B, Nq, H D)
        return self.out_proj(out), w

    # -- torch interoperability -----------------------------------------------------------------
    def torch_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                      average_attn_weights=True, is_causal=False):
        """torch.nn.MultiheadAttention.forward's signature and polarity; returns (out, weights or None).

        Self-attention when ``key is query and value is query``, else cross-attention. Masks in
        torch's polarity (bool True = blocked / padding; float added) are converted here.
        ``is_causal`` is only a hint in torch (attn_mask must hold the causal mask) and is ignored.
        """
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, Nq = query.shape[:2]
        Nk = key.shape[1]
        kmask, kbias = TC.convert_key_padding_mask(key_padding_mask, batch=B, nk=Nk)
        amask, abias = TC.convert_attn_mask(attn_mask, batch=B, num_heads=self.num_heads, nq=Nq, nk=Nk)
        allowed = kmask if amask is None else (amask if kmask is None else amask & kmask)
        bias = kbias if abias is None else (abias if kbias is None else abias + kbias)
        float_mask = None if bias is None else (bias if allowed is None else bias.masked_fill(~allowed, float("-inf")))
        selfattn = key is query and value is query
        out, w = self._forward(query, None if selfattn else key, None if selfattn else value,
                               None if float_mask is not None else allowed, None,
                               None if float_mask is None else float_mask.expand(B, self.num_heads, Nq, Nk).reshape(-1, Nq, Nk),
                               None, need_weights)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (w.mean(dim=1) if average_attn_weights else w)

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> MultiHeadAttention:
        """Same weights, same outputs and weights as ``m`` (Softmax, no positions, H == Hk)."""
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(m).__name__}")
        w = TC.torch_weights(m)
        p = m.out_proj.weight
        mod = cls(m.embed_dim, m.num_heads, kdim=m.kdim, vdim=m.vdim, bias=m.in_proj_bias is not None,
                  dropout=float(m.dropout), batch_first=bool(m.batch_first), device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for name in ("q", "k", "v", "out"):
                lin = getattr(mod, f"{name}_proj")
                lin.weight.copy_(w[f"{name}_weight"])
                if lin.bias is not None:
                    lin.bias.copy_(w[f"{name}_bias"])
        mod.train(m.training)
        return mod

    def to_torch(self) -> nn.MultiheadAttention:
        """A torch.nn.MultiheadAttention with these weights (only for what torch can express)."""
        reasons = []
        if self.num_kv_heads != self.num_heads:
            reasons.append(f"grouped-query (num_kv_heads={self.num_kv_heads} != num_heads={self.num_heads})")
        if not isinstance(self.attention, Softmax) or self.attention != Softmax():
            reasons.append(f"attention={self.attention!r} (torch has plain Softmax() only; pass masks per call)")
        if self.position is not None:
            reasons.append(f"position={self.position!r}")
        if reasons:
            raise ValueError("to_torch: torch.nn.MultiheadAttention cannot express " + "; ".join(reasons))
        p = self.q_proj.weight
        m = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.has_bias,
                                  kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                  device=p.device, dtype=p.dtype)
        w = {}
        for name in ("q", "k", "v", "out"):
            lin = getattr(self, f"{name}_proj")
            w[f"{name}_weight"] = lin.weight.detach()
            w[f"{name}_bias"] = None if lin.bias is None else lin.bias.detach()
        TC.load_torch_weights(m, w)
        m.train(self.training)
        return m


__all__ = ["MultiHeadAttention"]
