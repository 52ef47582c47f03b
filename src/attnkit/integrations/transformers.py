"""attnkit as an attention backend of Hugging Face transformers models.

Legend: B batch, Hq query heads, Hk key/value heads (Hq % Hk == 0), Nq queries, Nk keys handed
over by the model (the whole static cache, or the sliding cache's window), K keys kept after the
causal crop, D head dim.

    import attnkit.integrations.transformers as akt
    akt.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnkit")

``register()`` adds the name ``"attnkit"`` to two registries of transformers, and needs both:

- ``AttentionMaskInterface``: ``mask_spec`` receives the geometry (batch, query and key lengths
  and offsets, the 2-D padding mask) and HF's mask *function*, and returns an ``HFMask``: an
  attnkit spec (``causal``, ``sliding_window(W - 1)``, ``key_padding_from_bool`` for left/right
  padding, ``document`` for packed sequences, see ``_hf_masks``) plus how many keys a causal
  mask can see. Nothing Nq x Nk is built; blockwise skips empty tiles.
- ``AttentionInterface``: ``attention_forward(module, q, k, v, attention_mask, ...)`` with q
  (B, Hq, Nq, D) after RoPE and k, v (B, Hk, Nk, D) *not* repeated (attnkit's grouped-query
  mapping is HF's ``repeat_kv``), returning ``(out (B, Nq, Hq, D), weights or None)``.

Without the mask function transformers hands the attention function ``attention_mask=None``
and padding would be silently ignored; ``attention_forward`` therefore refuses None when the
model's implementation name has no registered mask function.

Alignment: HF masks use absolute positions (query i at ``q_offset + i``, key j at
``kv_offset + j``). For a causal mask the keys after the last query are never attended, so they
are cropped (K = q_offset + Nq - kv_offset): a static-cache prefill or decode then looks like a
dynamic cache's, and attnkit's bottom-right causal mask is exactly HF's. Sliding caches already
hand over only the window; their kv_offset shifts the padding mask.

Query rows with no allowed key (left-padding rows) give zeros here; HF's eager path gives NaN
(float64) or uniform weights there. Such rows are padding: no real token attends to them, so
real tokens' outputs are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import masks
from ..functional import attention
from ..masks import Band, Mask
from . import _hf_masks as H

NAME = "attnkit"


@dataclass(frozen=True)
class HFMask:
    """What ``mask_spec`` hands ``attention_forward``.

    mask: spec over (Nq, K) in attnkit coordinates, or None (every pair allowed): the pattern
        and the padding together.
    pattern: the part from HF's mask function (a band, a document mask, ...), without padding.
    left_pad: per row, the number of leading padding keys when the padding is left padding only
        (keys [left_pad[b], K) real); None otherwise. Lets the attention drop those keys per row.
    keep: K, the keys [0, K) that may be attended; later keys are cropped before the call.
    kv_length: Nk, the keys the model hands over (checked against k).

    transformers reads ``ndim`` of a mask passed into a model: a precomputed ``HFMask`` (as
    ``generate`` makes for static caches) must not look like a 2-D padding mask, and
    ``mask_spec`` returns it unchanged when it meets it again.
    """

    mask: Mask | None
    batch_size: int
    q_length: int
    kv_length: int
    keep: int
    pattern: Mask | None = None
    left_pad: tuple[int, ...] | None = None
    ndim: ClassVar[int] = 4


def _as_int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


def mask_spec(*, batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0,
              kv_offset=0, mask_function=None, attention_mask=None, cache_position=None, use_vmap: bool = False,
              **unused) -> HFMask:
    """transformers' mask interface: the mask as attnkit specs (registered by ``register()``).

    Args (keywords, as transformers passes them): batch_size; q_length, q_offset (5.x) or
    cache_position (Nq,) (4.5x); kv_length, kv_offset; mask_function, HF's closure over absolute
    (batch, head, q, kv) indices; attention_mask, the 2-D (B, L) padding mask, 1 = token (or an
    ``HFMask`` already made for this step, returned as is); use_vmap, whether HF's closure needs
    vmap. Other keywords (dtype, config, device, local_size, allow_*_skip) are not needed.
    """
    if q_length is None:
        if cache_position is None:
            raise TypeError("mask_spec needs q_length and q_offset (transformers 5) or cache_position (4.5x)")
        q_length, q_offset = int(cache_position.shape[0]), _as_int(cache_position[0])
    q_length, kv_length = int(q_length), int(kv_length)
    q_offset, kv_offset = _as_int(q_offset), _as_int(kv_offset)
    if isinstance(attention_mask, HFMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (q_length, kv_length):
            raise ValueError(f"a precomputed HFMask is for (Nq, Nk) = ({attention_mask.q_length}, "
                             f"{attention_mask.kv_length}), this step has ({q_length}, {kv_length})")
        return attention_mask
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function
    keep = kv_length
    if any(H.is_causal_piece(f) for f in H.conjuncts(mask_function)):
        last = q_offset + q_length - kv_offset  # keys at or before the last query's position
        keep = min(kv_length, last) if last >= 1 else kv_length
    geo = H.Geometry(int(batch_size), q_length, kv_length, q_offset, kv_offset, keep, bool(use_vmap))
    pattern = H.translate(mask_function, geo)
    valid = None if attention_mask is None else H.key_valid(attention_mask, geo)  # (B, K) or None
    if valid is None:
        return HFMask(pattern, geo.batch_size, q_length, kv_length, keep, pattern)
    pad = masks.key_padding_from_bool(~valid)
    spec = pad if pattern is None else pattern & pad
    return HFMask(spec, geo.batch_size, q_length, kv_length, keep, pattern, H.left_padding(valid))


def _check_mask_registered(module) -> None:
    name = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if name is None:
        return
    from transformers.masking_utils import AttentionMaskInterface

    if name not in AttentionMaskInterface._global_mapping:
        raise ValueError(
            f"attention_forward got attention_mask=None from a model whose attn_implementation {name!r} has no "
            "registered mask function: transformers then drops the padding mask. Register both with "
            "attnkit.integrations.transformers.register() and use attn_implementation='attnkit'")


def _default_mask(module, nq: int, nk: int, is_causal, sliding_window) -> tuple[Mask | None, int]:
    """No mask given (a standalone module): HF sdpa's meaning of is_causal, plus flash's window."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return None, nk
    keep = nq if nk > nq > 1 else nk  # sdpa: top-left causal over an empty static cache = crop to Nq
    if sliding_window:
        return masks.sliding_window(int(sliding_window) - 1), keep
    return (masks.causal() if nq > 1 else None), keep


def _without_left_padding(query, key, value, hm: HFMask, *, scale, softcap) -> torch.Tensor:
    """Attention of left-padded rows with their padding dropped (as HF's flash path unpads).

    For each distinct pad length p: one call on those rows' real keys [p, K) and the queries that
    can reach one of them, with the band pattern alone (its offsets k - q and the bottom-right
    alignment survive the slicing); earlier query rows see padding only and get zeros. A row
    without padding is then plain causal attention, which ``auto`` hands to sdpa's fused kernel.
    Returns (B, Hq, Nq, Dv).
    """
    B, Hq, Nq, D = query.shape
    K, off = hm.keep, hm.keep - Nq  # query row i sits at key position i + off
    hi = hm.pattern.hi if isinstance(hm.pattern, Band) else None
    pieces, order = [], []
    for p in sorted(set(hm.left_pad)):
        rows = [b for b, x in enumerate(hm.left_pad) if x == p]
        pick = slice(None) if len(rows) == B else torch.tensor(rows, device=query.device)
        r0 = 0 if hi is None else min(Nq, max(0, p - hi - off))  # rows before r0 reach keys < p only
        if r0 < Nq and p < K:
            o = attention(query[pick][:, :, r0:], key[pick][:, :, p:K], value[pick][:, :, p:K], mask=hm.pattern,
                          scale=scale, softcap=softcap)  # (G, Hq, Nq - r0, Dv)
            o = F.pad(o, (0, 0, r0, 0))  # (G, Hq, Nq, Dv)
        else:
            o = query.new_zeros(len(rows), Hq, Nq, value.shape[-1])
        pieces.append(o)
        order += rows
    if len(pieces) == 1:
        return pieces[0]
    inverse = torch.empty(B, dtype=torch.long, device=query.device)
    inverse[torch.tensor(order, device=query.device)] = torch.arange(B, device=query.device)
    return torch.cat(pieces)[inverse]  # (B, Hq, Nq, Dv) in batch order


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, *, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention interface, computed by ``attnkit.attention`` (registered by ``register()``).

    Args:
        query: (B, Hq, Nq, D). key, value: (B, Hk, Nk, D), not repeated (``module.num_key_value_groups``
            = Hq / Hk, the same head mapping as attnkit's grouped-query attention).
        attention_mask: an ``HFMask`` from ``mask_spec`` (its window and causality are the layer's),
            None (then ``is_causal`` / ``module.is_causal`` and ``sliding_window`` decide, as in HF's
            sdpa and flash paths), or a prepared 4-D tensor (bool: True = attend; float: added).
        dropout: on the weights (attnkit's seeded pattern, not torch's; the seed comes from torch's
            generator). scaling: default D^-0.5. softcap: Gemma 2's c * tanh(s / c).
        kwargs: ``output_attentions`` returns the weights (B, Hq, Nq, Nk); ``position_bias`` (B|1, Hq|1,
            Nq, Nk) is added to the scores. Attention sinks (``s_aux``, ``sinks``) are refused.

    Returns: (out (B, Nq, Hq, Dv) contiguous, weights or None).
    """
    for sink in ("s_aux", "sinks"):
        if kwargs.get(sink) is not None:
            raise ValueError(f"attnkit does not implement attention sinks ({sink}=...); use attn_implementation='eager'")
    Nq, Nk = query.shape[2], key.shape[2]
    spec, keep, bias = _resolve_mask(module, attention_mask, query, key, is_causal, sliding_window,
                                     kwargs.get("position_bias"))
    if keep < Nk:
        key, value = key[:, :, :keep], value[:, :, :keep]  # (B, Hk, K, D)
        bias = None if bias is None else bias[..., :keep]
    want_weights = bool(kwargs.get("output_attentions", False))
    if (isinstance(attention_mask, HFMask) and attention_mask.left_pad is not None and Nq > 1 and bias is None
            and not want_weights and not dropout and isinstance(attention_mask.pattern, (Band, type(None)))):
        out = _without_left_padding(query, key, value, attention_mask, scale=scaling, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None  # (B, Nq, Hq, Dv)
    res = attention(query, key, value, mask=spec, bias=bias, scale=scaling, softcap=softcap,
                    dropout_p=float(dropout or 0.0), return_weights=want_weights)
    out, weights = res if want_weights else (res, None)
    if weights is not None and keep < Nk:
        weights = F.pad(weights, (0, Nk - keep))  # (B, Hq, Nq, Nk): cropped keys get weight 0
    return out.transpose(1, 2).contiguous(), weights  # (B, Nq, Hq, Dv)


def _resolve_mask(module, attention_mask, query, key, is_causal, sliding_window, bias):
    """(spec or bool tensor or None, keys kept K, bias or None) for whatever mask the model passed."""
    Nq, Nk = query.shape[2], key.shape[2]
    if isinstance(attention_mask, HFMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (Nq, Nk):
            raise ValueError(f"the attnkit mask is for (Nq, Nk) = ({attention_mask.q_length}, {attention_mask.kv_length}) "
                             f"but the layer got query {tuple(query.shape)} and key {tuple(key.shape)}")
        return attention_mask.mask, attention_mask.keep, bias
    if attention_mask is None:
        _check_mask_registered(module)
        return (*_default_mask(module, Nq, Nk, is_causal, sliding_window), bias)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask, Nk, bias  # True = attend
        add = attention_mask.to(query.dtype)  # HF's additive form: 0 / finfo.min
        return None, Nk, add if bias is None else bias + add
    got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
    raise ValueError(f"attention_mask must be an attnkit HFMask, None or a 4-D tensor (B|1, 1|Hq, Nq, Nk), got {got}")


def register() -> None:
    """Register ``"attnkit"`` with transformers' attention and mask interfaces (both; idempotent)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError("attnkit.integrations.transformers needs transformers >= 4.53 with the attention and "
                          "mask interfaces: pip install 'attnkit[transformers]'") from e
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_spec)
