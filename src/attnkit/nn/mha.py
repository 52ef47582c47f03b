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
from ..variants import Softmax, Variant
from . import torch_compat as TC
from .positions import PositionSpec


def _check_int(name: str, val, minimum: int = 1) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"MultiHeadAttention: {name} must be an int >= {minimum}, got {val!r}")
    return val


def check_combination(attention, position, *, dropout: float = 0.0) -> None:
    """Raise a ValueError/TypeError saying why ``attention`` + ``position`` (+ attention dropout)
    cannot make a layer. The variant and the position spec answer; nothing here knows their classes."""
    if not isinstance(attention, Variant):
        raise TypeError(f"attention must be a variant spec from attnkit.variants (Softmax(), Linear(), ...), "
                        f"got {attention!r}")
    if position is not None and not isinstance(position, PositionSpec):
        raise TypeError(f"position must be None or a position spec from attnkit.nn (Rope(), Alibi(), T5(), Shaw(), "
                        f"XL()), got {position!r}")
    reason = attention.position_reason(position)
    if reason:
        raise ValueError(reason)
    a = type(attention).__name__
    if dropout and not attention.attention_dropout:
        raise ValueError(f"dropout={dropout} drops attention weights, which {a} attention does not support; "
                         "use dropout=0.0 (apply dropout on the module output instead)")
    if dropout and position is not None and position.own_kernel:
        raise ValueError(f"dropout={dropout}: position={type(position).__name__}() runs its own kernel, which has "
                         "no attention dropout; use dropout=0.0")


class MultiHeadAttention(nn.Module):
    """Multi-head (grouped-query) self- and cross-attention with a choice of variant and positions.

    Args:
        embed_dim: E. num_heads: H (E % H == 0; head dim D = E // H).
        num_kv_heads: Hk for grouped-query / multi-query attention (default H).
        kdim, vdim: widths of the key / value inputs for cross-attention (default E).
        bias: biases on the four projections. dropout: on the attention weights (variants with
            attention dropout, i.e. Softmax: a seeded hash pattern, see ``attnkit.attention``),
            active in training mode.
        attention: a variant spec from ``attnkit.variants`` (default ``Softmax()``: full, non-causal).
        position: None or a position spec (``Rope``, ``Alibi``, ``T5``, ``Shaw``, ``XL``),
            self-attention only.
        batch_first: True for (B, N, E) inputs; False for (N, B, E).

    Parameters ``q_proj`` (E -> H D), ``k_proj`` (kdim -> Hk D; absent for variants whose keys
    are the queries, ``shares_qk``), ``v_proj`` (vdim -> Hk D), ``out_proj`` (H D -> E), ``core``
    (the variant's module), ``pos`` (the position scheme's module or None). Cost: O(N E^2) for
    projections plus the variant's cost. Invalid variant/position/dropout combinations raise at
    construction with the reason.
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
        for name, val in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(val, bool):
                raise TypeError(f"MultiHeadAttention: {name} must be a bool, got {val!r}")
        attention = Softmax() if attention is None else attention
        check_combination(attention, position, dropout=dropout)
        self.embed_dim, self.num_heads, self.num_kv_heads = E, H, Hk
        self.head_dim = D = E // H
        self.kdim = E if kdim is None else _check_int("kdim", kdim)
        self.vdim = E if vdim is None else _check_int("vdim", vdim)
        if attention.shares_qk and self.kdim != E:
            raise ValueError(f"{type(attention).__name__} attention shares queries and keys; kdim must equal embed_dim")
        self.dropout, self.batch_first, self.has_bias = float(dropout), batch_first, bias
        self.attention, self.position = attention, position
        fk = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(E, H * D, bias=bias, **fk)
        self.k_proj = None if attention.shares_qk else nn.Linear(self.kdim, Hk * D, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, Hk * D, bias=bias, **fk)
        self.out_proj = nn.Linear(H * D, E, bias=bias, **fk)
        self.pos = None if position is None else position.build(num_heads=H, head_dim=D, attention=attention).to(**fk)
        self.core = attention.build_core(num_heads=H, num_kv_heads=Hk, head_dim=D).to(**fk)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"attention={self.attention!r}, position={self.position!r}")

    # -- caches ----------------------------------------------------------------------------------
    def _cache_owner(self):
        """The spec that chooses and checks this layer's cache: the position scheme when it owns
        one (Transformer-XL's segment memory), else the attention variant."""
        return self.position if self.position is not None and self.position.owns_cache else self.attention

    def make_cache(self, max_batch: int, max_len: int, *, dtype=None, device=None):
        """The cache this layer decodes with, chosen by its variant (KVCache; SlidingWindowCache
        for windowed masks; RecurrentState for causal Linear/Performer) or position (SegmentMemory
        for XL)."""
        reason = self.attention.decode_reason()
        if reason:
            raise ValueError(f"this layer cannot decode with a cache: {reason}")
        w = self.q_proj.weight
        return self._cache_owner().make_cache(max_batch=max_batch, max_len=max_len, num_kv_heads=self.num_kv_heads,
                                              head_dim=self.head_dim, dtype=dtype or w.dtype, device=device or w.device)

    def _check_cache(self, cache, cross: bool) -> None:
        if cache is None:
            return
        if cross != cache.for_cross:
            raise TypeError("cross-attention (context=...) caches its context's keys/values in a StaticKV; "
                            f"self-attention decodes with the cache from make_cache(); got {type(cache).__name__} "
                            f"for {'cross' if cross else 'self'}-attention")
        if not cross:
            self._cache_owner().check_cache(cache)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask=None, key_padding_mask: torch.Tensor | None = None, torch_attn_mask: torch.Tensor | None = None,
                cache=None, need_weights: bool = False, average_attn_weights: bool = True, context_parallel=None):
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
            context_parallel: an ``attnkit.distributed.ContextParallel``: x is this rank's shard of
                a sequence sharded over its process group (self-attention, variants whose
                ``context_parallel_reason()`` is None; ``mask`` a spec of the whole sequence).

        Returns: out (B, Nq, E), or (out, weights) when need_weights.
        """
        if not self.batch_first:
            x = x.transpose(0, 1)
            context = None if context is None else context.transpose(0, 1)
            value = None if value is None else value.transpose(0, 1)
        out, w = self._forward(x, context, value, mask, key_padding_mask, torch_attn_mask, cache, need_weights,
                               context_parallel)
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
        wdtype = self.q_proj.weight.dtype
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (embeddings, not token ids), got dtype {t.dtype}")
        if t.dtype != wdtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(f"{name} has dtype {t.dtype} but the module's weights are {wdtype}; convert one of them "
                            f"(e.g. x.to({wdtype}) or module.to({t.dtype}))")

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, heads, self.head_dim).transpose(1, 2)  # (B, heads, N, D)

    def _key_valid(self, key_padding_mask, batch: int, nk: int, source: str):
        """(B, Nk') bool, True = real key, from torch's key_padding_mask (True = padding)."""
        if key_padding_mask is None:
            return None
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor (B, Nk) with True = padding (torch's polarity), "
                            f"got {got}; for torch's float masks use torch_forward()")
        if tuple(key_padding_mask.shape) != (batch, nk):
            raise ValueError(f"key_padding_mask has shape {shape_str(key_padding_mask)}, expected ({batch}, {nk}): one "
                             f"flag per {source} token this call adds (True = padding)")
        return ~key_padding_mask

    def _context_parallel_reason(self, cross, mask, key_padding_mask, torch_attn_mask, cache, need_weights):
        """Why this call cannot run on a sequence shard, or None."""
        if self.pos is not None and self.pos.computes_attention:
            return f"position={self.position!r} runs its own kernel"
        checks = ((cross, "cross-attention (context=)"), (cache is not None, "a cache (decoding)"),
                  (need_weights, "need_weights=True"), (key_padding_mask is not None, "key_padding_mask"),
                  (torch_attn_mask is not None, "torch_attn_mask"),
                  (isinstance(mask, torch.Tensor), "a mask tensor (pass a spec of the whole sequence)"),
                  (self.training and self.dropout > 0, f"attention dropout={self.dropout} in training"))
        for bad, what in checks:
            if bad:
                return f"{what} is not supported"
        return self.attention.context_parallel_reason()

    def _forward(self, x, context, value, mask, key_padding_mask, torch_attn_mask, cache, need_weights,
                 context_parallel=None):
        self._check_input("x", x, self.embed_dim, None)
        B, Nq, _ = x.shape
        cross = context is not None
        a = self.attention
        if value is not None and not cross:
            raise ValueError("value= is the value input of cross-attention; pass context= as well")
        if cross:
            if not a.cross:
                raise ValueError(f"{type(a).__name__} attention shares queries and keys: it is self-attention only "
                                 "(context= is not supported)")
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
        own_kernel = self.pos is not None and self.pos.computes_attention
        if need_weights and (own_kernel or not a.returns_weights):
            what = f"position={self.position!r}" if own_kernel else f"{type(a).__name__} attention"
            raise ValueError(f"need_weights=True: {what} never forms the (Nq, Nk) weight matrix")
        self._check_cache(cache, cross)
        cp = context_parallel
        if cp is not None:
            reason = self._context_parallel_reason(cross, mask, key_padding_mask, torch_attn_mask, cache, need_weights)
            if reason:
                raise ValueError(f"context_parallel: {reason}")
        key_valid = self._key_valid(key_padding_mask, B, key_in.shape[1], "context" if cross else "input")
        query_valid = key_valid if not cross and cache is None else None
        offset = 0 if cache is None or cross else cache.length

        q = self._heads(self.q_proj(x), self.num_heads)  # (B, H, Nq, D)
        reused = None if cache is None else cache.reuse()
        if reused is not None:  # keys/values computed once for this context
            k, v, key_valid = reused
            if k.shape[0] != B:
                raise ValueError(f"{type(cache).__name__} holds batch {k.shape[0]}, got batch {B}; reset() it first")
        else:
            v = self._heads(self.v_proj(val_in), self.num_kv_heads)  # (B, Hk, Nk, D)
            k = q if self.k_proj is None else self._heads(self.k_proj(key_in), self.num_kv_heads)  # (B, Hk, Nk, D)
            if self.pos is not None:
                at = offset if cp is None else cp.positions(Nq, device=x.device)  # a shard's global positions
                q, k = self.pos.rotate(q, k, q_offset=at, k_offset=at)
            if cache is not None:
                k, v, key_valid = cache.update(k, v, key_valid)
        k, v = k.to(q.dtype), v.to(q.dtype)  # a cache keeps its own dtype (e.g. float32 under autocast)
        Nk = k.shape[2]

        tmask, tbias = TC.convert_attn_mask(torch_attn_mask, batch=B, num_heads=self.num_heads, nq=Nq, nk=Nk)
        parts = [mask if cp is not None else  # a spec of the whole sequence, checked by the ring
                 M.as_mask(mask, batch=B, heads=self.num_heads, nq=Nq, nk=Nk, device=x.device, name="mask",
                           float_hint="torch's attn_mask (True = blocked, or float) goes to torch_attn_mask=")]
        parts.append(None if tmask is None else M.TensorMask(tmask, Nq, Nk))
        parts.append(None if key_valid is None else M.key_padding_from_bool(~key_valid))
        combined = None
        for p in parts:
            if p is not None:
                combined = p if combined is None else combined & p
        bias = None if tbias is None else TensorBias(tbias, Nq, Nk)
        pos_bias = None if self.pos is None else self.pos.bias(nq=Nq, nk=Nk)
        if pos_bias is not None:
            bias = pos_bias if bias is None else SumBias((pos_bias, bias))
        if tbias is not None and (own_kernel or not a.takes_bias):
            what = f"position={self.position!r}" if own_kernel else f"{type(a).__name__} attention"
            raise ValueError(f"{what} cannot add a float attn_mask to its scores; pass bool masks instead")
        attend = self.pos.attend if own_kernel else self.core
        extra = {} if cp is None else {"context_parallel": cp}
        out, w = attend(q, k, v, mask=a.with_own_mask(combined), bias=bias, dropout_p=self.dropout if self.training else 0.0,
                        need_weights=need_weights, cache=None if cross else cache, query_valid=query_valid, **extra)
        if cache is not None:
            cache.after(k, v, Nq)
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
        if self.attention != Softmax():
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


__all__ = ["MultiHeadAttention", "check_combination"]
