"""Hugging Face mask functions -> attnkit mask specs (used by ``integrations.transformers``).

Legend: B batch, Nq queries, Nk keys handed to the attention function, K keys kept after the
causal crop (K <= Nk), L length of HF's 2-D attention mask.

transformers describes a mask as a closure ``mask_function(batch_idx, head_idx, q_idx, kv_idx)``
built from a few named pieces of ``transformers.masking_utils`` (``causal_mask_function``,
``sliding_window_overlay(W)``, ``and_masks`` / ``or_masks``, ``packed_sequence_mask_function``,
...), over *absolute* positions: query row i sits at ``q_offset + i``, key column j at
``kv_offset + j``. attnkit's specs use key coordinates with bottom-right alignment: query row i
sits at ``i + K - Nq``. The two differ by ``delta = (q_offset - kv_offset) - (K - Nq)``, so an
HF offset band ``lo <= kv - q <= hi`` is the attnkit band ``lo + delta <= k - q <= hi + delta``.

Each recognised piece becomes a closed-form spec (band, document, key validity) whose ``tiles``
let blockwise skip empty tiles; nothing Nq x Nk is built. A band piece is first checked against
HF's own function on its boundary (O(W) evaluations), so a transformers version that changed a
piece's meaning falls back instead of giving a different mask. A piece that is not recognised
(custom ``or_mask_function`` / ``and_mask_function``, chunked or blockwise overlays) is wrapped
as ``masks.from_function`` calling HF's closure on absolute indices: the same mask, memory still
O(block * Nk), but its tile map costs O(Nq * Nk) integer work; a warning names it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import masks
from ..masks import Band, Mask

log = logging.getLogger("attnkit")

_HF_MODULE = "transformers.masking_utils"
_WARNED: set[str] = set()


@dataclass(frozen=True)
class Geometry:
    """Where HF's queries and keys sit. ``keep`` keys survive the crop; ``delta`` as above."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    keep: int
    use_vmap: bool = False

    @property
    def delta(self) -> int:
        return (self.q_offset - self.kv_offset) - (self.keep - self.q_length)


# -- reading HF's closures ----------------------------------------------------------------------


def piece(fn) -> str | None:
    """The qualified name of a transformers mask piece, e.g. 'sliding_window_overlay.<locals>.inner_mask'."""
    if getattr(fn, "__module__", None) != _HF_MODULE:
        return None
    return getattr(fn, "__qualname__", None)


def closure(fn) -> dict:
    """The free variables of a closure by name (``sliding_window``, ``mask_functions``, ...)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or cells is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def conjuncts(fn) -> list:
    """The top-level pieces of an ``and_masks`` tree (the function itself otherwise)."""
    if piece(fn) == "and_masks.<locals>.and_mask":
        return [c for f in closure(fn).get("mask_functions", ()) for c in conjuncts(f)]
    return [fn]


def is_causal_piece(fn) -> bool:
    return piece(fn) == "causal_mask_function" and _probe_band(fn, None, 0)


# -- bands ----------------------------------------------------------------------------------------


def _band_in_hf_offsets(fn) -> tuple[int | None, int | None] | None:
    """(lo, hi) with HF's pieces allowing lo <= kv_idx - q_idx <= hi; None if not a band piece."""
    name = piece(fn)
    if name == "causal_mask_function":
        return None, 0
    if name == "sliding_window_overlay.<locals>.inner_mask":
        w = closure(fn).get("sliding_window")
        return (1 - w, None) if isinstance(w, int) and w > 0 else None
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
        w = closure(fn).get("sliding_window")
        return (-w, w) if isinstance(w, int) and w >= 0 else None
    return None


def _probe_band(fn, lo: int | None, hi: int | None) -> bool:
    """Does HF's ``fn`` allow exactly lo <= kv - q <= hi around the band's edges? O(|lo| + |hi|)."""
    reach = max(abs(lo) if lo is not None else 0, abs(hi) if hi is not None else 0) + 3
    q = torch.tensor(reach)
    kv = torch.arange(0, 2 * reach + 1)
    d = kv - q
    want = torch.ones_like(d, dtype=torch.bool)
    if lo is not None:
        want &= d >= lo
    if hi is not None:
        want &= d <= hi
    try:
        got = torch.as_tensor(fn(torch.tensor(0), torch.tensor(0), q, kv))
        return bool(torch.equal(torch.broadcast_to(got, want.shape).to(torch.bool), want))
    except Exception:  # noqa: BLE001 - a piece we cannot probe is handled by the fallback
        return False


def band(lo: int | None, hi: int | None) -> Mask | None:
    """The attnkit band lo <= k - q <= hi by its public name where it has one (None: no bound)."""
    if lo is None and hi is None:
        return None
    if lo is None and hi == 0:
        return masks.causal()
    if lo is not None and hi is not None and lo <= 0 <= hi:
        return masks.sliding_window(-lo, hi)
    return Band(lo, hi, f"band({lo}, {hi})")


def _merge_bands(a: Band, b: Band) -> Mask | None:
    los = [x for x in (a.lo, b.lo) if x is not None]
    his = [x for x in (a.hi, b.hi) if x is not None]
    return band(max(los) if los else None, min(his) if his else None)


# -- the fallback ---------------------------------------------------------------------------------


def function_mask(fn, geo: Geometry) -> Mask:
    """HF's closure as a spec: called on absolute indices (vmapped if HF asked for vmap)."""
    name = getattr(fn, "__qualname__", repr(fn))
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("attnkit: transformers mask piece %s is not recognised; it is evaluated per tile "
                    "(same mask, memory O(block * Nk), tile map O(Nq * Nk) work)", name)
    q_shift, k_shift = geo.delta + geo.kv_offset, geo.kv_offset

    def allows(b, h, q, k):
        qa, ka = q + q_shift, k + k_shift  # absolute positions, as HF's mask functions expect
        if not geo.use_vmap:
            return torch.as_tensor(fn(b, h, qa, ka)).to(torch.bool)
        shape = torch.broadcast_shapes(b.shape, h.shape, qa.shape, ka.shape)
        flat = [t.expand(shape).reshape(-1) for t in (b, h, qa, ka)]
        return torch.vmap(fn)(*flat).to(torch.bool).reshape(shape)

    return masks.from_function(allows, f"hf:{name}")


# -- translation ----------------------------------------------------------------------------------


def _and(parts: list[Mask | None]) -> Mask | None:
    """Intersection; None means 'every pair' and drops out; bands merge into one band."""
    bands = [p for p in parts if isinstance(p, Band)]
    rest = [p for p in parts if p is not None and not isinstance(p, Band)]
    out = None
    for b in bands:
        out = b if out is None else _merge_bands(out, b)
    for p in rest:
        out = p if out is None else out & p
    return out


def _document(ids: torch.Tensor, geo: Geometry) -> Mask | None:
    """Packed ids (B, N) are indexed by absolute q and kv: a document spec when they coincide."""
    if geo.delta == 0 and geo.kv_offset == 0 and ids.dim() == 2 and ids.shape[-1] == geo.keep:
        return masks.document(ids)
    return None


def _positions_consecutive_within(ids: torch.Tensor, position_ids: torch.Tensor) -> bool:
    """True if position_ids step by 1 inside every packed document (so offsets k - q are kept)."""
    if position_ids.shape[-1] != ids.shape[-1]:
        return False
    pos = position_ids.expand(ids.shape[0], -1)
    same = ids[:, 1:] == ids[:, :-1]
    return bool(((pos[:, 1:] - pos[:, :-1] == 1) | ~same).all())


def translate(fn, geo: Geometry, packed_ids: torch.Tensor | None = None) -> Mask | None:
    """An attnkit spec over (Nq, K) equal to HF's ``fn``; None = every pair allowed.

    ``packed_ids``: set inside an ``and_masks`` that also holds the packed-sequence piece; a
    position remap of a band is then the band itself (offsets within a document are unchanged
    and pairs across documents are removed by that piece).
    """
    name = piece(fn)
    hf_band = _band_in_hf_offsets(fn)
    if hf_band is not None and _probe_band(fn, *hf_band):
        lo, hi = hf_band
        lo, hi = (None if x is None else x + geo.delta for x in (lo, hi))
        # Offsets k - q of this call lie in [-(K - 1), Nq - 1]: a bound outside never binds (a
        # window as long as the sequence is plain causal, which sdpa's fused kernel runs).
        lo = None if lo is not None and lo <= -(geo.keep - 1) else lo
        hi = None if hi is not None and hi >= geo.q_length - 1 else hi
        return band(lo, hi)
    if name == "bidirectional_mask_function":
        return None
    if name == "and_masks.<locals>.and_mask":
        parts = closure(fn).get("mask_functions", ())
        ids = next((closure(p)["packed_sequence_mask"] for p in parts
                    if piece(p) == "packed_sequence_mask_function.<locals>.inner_mask"), None)
        return _and([translate(p, geo, ids if ids is not None and _document(ids, geo) is not None else None)
                     for p in parts])
    if name == "or_masks.<locals>.or_mask":
        parts = [translate(p, geo, packed_ids) for p in closure(fn).get("mask_functions", ())]
        if any(p is None for p in parts):
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out
    if name == "packed_sequence_mask_function.<locals>.inner_mask":
        spec = _document(closure(fn)["packed_sequence_mask"], geo)
        if spec is not None:
            return spec
    if name == "padding_mask_function.<locals>.inner_mask":
        valid = key_valid(closure(fn)["padding_mask"], geo)
        return None if valid is None else masks.key_padding_from_bool(~valid)
    if name == "remap_positions_for_packed_sequence.<locals>.inner_mask" and packed_ids is not None:
        c = closure(fn)
        inner = translate(c["mask_function"], geo)
        if (inner is None or isinstance(inner, Band)) and _positions_consecutive_within(packed_ids, c["position_ids"]):
            return inner
    return function_mask(fn, geo)


def key_valid(attention_mask: torch.Tensor, geo: Geometry) -> torch.Tensor | None:
    """(B, K) bool, True = real key, from HF's 2-D mask (B, L) over absolute positions; None if all real.

    Like HF: positions past the mask's end are padding (a static cache's unwritten slots).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a 2-D (B, L) tensor of 1 = token, 0 = padding, got {got}")
    if attention_mask.shape[0] != geo.batch_size:
        raise ValueError(f"attention_mask has {attention_mask.shape[0]} rows, expected batch size B={geo.batch_size}")
    am = attention_mask.to(torch.bool)
    need = geo.kv_offset + geo.keep
    if am.shape[-1] < need:
        am = F.pad(am, (0, need - am.shape[-1]), value=False)
    valid = am[:, geo.kv_offset:need]  # (B, K)
    return None if bool(valid.all()) else valid


def left_padding(valid: torch.Tensor) -> tuple[int, ...] | None:
    """Per row, the number of leading padding keys if ``valid`` (B, K) is padding-then-tokens; else None."""
    starts = valid.shape[1] - valid.sum(dim=1)  # (B,)
    want = torch.arange(valid.shape[1], device=valid.device).view(1, -1) >= starts.view(-1, 1)
    return tuple(starts.tolist()) if bool(torch.equal(want, valid)) else None
