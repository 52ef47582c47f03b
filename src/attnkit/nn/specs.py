"""Small frozen dataclasses that choose an attention variant and a position scheme.

Legend: B batch, H query heads, Hk key/value heads, N sequence, D head dim, E embed dim.

``MultiHeadAttention(..., attention=Softmax(mask=causal()), position=Rope())`` reads these specs;
they are data (hashable, printable, comparable), never code paths. ``check_combination``
states which combinations make sense and raises with the reason for the others.

Attention variants                           | decodes with a cache?
---------------------------------------------|---------------------------------------------
Softmax(mask, backend, softcap, scale)       | yes when the mask is causal (KVCache;
                                             | SlidingWindowCache for sliding_window masks)
Additive(attn_dim, mask) (Bahdanau)          | yes when the mask is causal (KVCache)
Linear(feature_map, causal)                  | causal=True: RecurrentState
Performer(num_features, causal, ...)         | causal=True: RecurrentState
Linformer(max_len, proj_dim), Nystrom(...)   | no (non-causal by construction)
LSH(n_hashes, bucket_size, causal)           | no (buckets are re-sorted over the whole input)

Position schemes: Rope(base, interleaved, rotary_dim), Alibi(), T5(num_buckets, max_distance,
bidirectional), Shaw(max_distance), XL(mem_len), or None. Alibi, T5, Shaw and XL change the
score matrix and so need Softmax; Rope rotates q and k and works with every dot-product
variant (Softmax, Linear, Performer, Nystrom, Linformer, LSH).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..masks import And, Band, Mask, Or


def _pos_int(cls: str, name: str, val, minimum: int = 1) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"{cls}: {name} must be an int >= {minimum}, got {val!r}")


def _opt_pos_float(cls: str, name: str, val) -> None:
    if val is None:
        return
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
        raise ValueError(f"{cls}: {name} must be a finite number > 0 or None, got {val!r}")


def _check_mask(cls: str, mask) -> None:
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"{cls}: mask must be None or an attnkit.masks spec (e.g. causal()), got {type(mask).__name__}")


def mask_is_causal(mask: Mask | None) -> bool:
    """True when the spec never lets query i see a key j > i (structurally, not by sampling).

    Band with hi <= 0 (causal(), sliding_window(l, 0)) is causal; ``a & b`` is causal when
    either part is; ``a | b`` when both are. Other specs count as non-causal.
    """
    if isinstance(mask, Band):
        return mask.hi is not None and mask.hi <= 0
    if isinstance(mask, And):
        return any(mask_is_causal(p) for p in mask.parts)
    if isinstance(mask, Or):
        return all(mask_is_causal(p) for p in mask.parts)
    return False


def mask_window(mask: Mask | None) -> int | None:
    """How many past keys (besides the query's own) the mask may reach; None = unbounded."""
    if isinstance(mask, Band):
        return None if mask.lo is None else -mask.lo
    if isinstance(mask, And):
        ws = [w for w in (mask_window(p) for p in mask.parts) if w is not None]
        return min(ws) if ws else None
    if isinstance(mask, Or):
        ws = [mask_window(p) for p in mask.parts]
        return None if any(w is None for w in ws) else max(ws)
    return None


def mask_is_relative(mask: Mask | None) -> bool:
    """True when the mask depends only on k - q (so it survives a ring buffer's re-indexing)."""
    if mask is None or isinstance(mask, Band):
        return True
    if isinstance(mask, (And, Or)):
        return all(mask_is_relative(p) for p in mask.parts)
    return False


# ------------------------------------------------------------------------------------------------
# Attention variants
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Softmax:
    """Exact softmax attention through ``attnkit.attention`` (any mask spec, GQA, softcap).

    mask: a spec from ``attnkit.masks`` applied on every call (e.g. ``causal()``,
    ``sliding_window(127)``); per-call masks passed to forward are combined with it by ``&``.
    backend: "auto" or a backend name. softcap: Gemma-2 score cap. scale: default 1/sqrt(D).
    Cost O(N^2 D) time; memory depends on the backend.
    """

    mask: Mask | None = None
    backend: str = "auto"
    softcap: float | None = None
    scale: float | None = None

    def __post_init__(self):
        _check_mask("Softmax", self.mask)
        if not isinstance(self.backend, str):
            raise TypeError(f"Softmax: backend must be a str, got {type(self.backend).__name__}")
        _opt_pos_float("Softmax", "softcap", self.softcap)
        _opt_pos_float("Softmax", "scale", self.scale)

    @property
    def causal(self) -> bool:
        return mask_is_causal(self.mask)


@dataclass(frozen=True)
class Additive:
    """Bahdanau additive attention, e_ij = v^T tanh(W_q q_i + W_k k_j), per head.

    attn_dim: width of the tanh layer (default: the head dim). mask: as in Softmax.
    Cost O(Nq * Nk * attn_dim) time, computed in chunks (Bahdanau et al. 2015).
    """

    attn_dim: int | None = None
    mask: Mask | None = None

    def __post_init__(self):
        if self.attn_dim is not None:
            _pos_int("Additive", "attn_dim", self.attn_dim)
        _check_mask("Additive", self.mask)

    @property
    def causal(self) -> bool:
        return mask_is_causal(self.mask)


@dataclass(frozen=True)
class Linear:
    """Linear attention (Katharopoulos et al. 2020): phi(q) (phi(k)^T v), phi = elu + 1.

    causal=True runs the chunked prefix form and decodes with a RecurrentState. O(N D^2).
    """

    feature_map: str = "elu+1"
    causal: bool = False

    def __post_init__(self):
        if not isinstance(self.feature_map, str) and not callable(self.feature_map):
            raise TypeError(f"Linear: feature_map must be a name or a callable, got {type(self.feature_map).__name__}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"Linear: causal must be a bool, got {self.causal!r}")


@dataclass(frozen=True)
class Performer:
    """Performer FAVOR+ (Choromanski et al. 2021): positive orthogonal random features.

    num_features: m (default int(D ln D)). causal=True decodes with a RecurrentState.
    redraw_interval: draw new features before every k-th training call (None = never);
    seed: of the generator the features are drawn from.
    Cost O(N m D).
    """

    num_features: int | None = None
    causal: bool = False
    redraw_interval: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.num_features is not None:
            _pos_int("Performer", "num_features", self.num_features)
        if self.redraw_interval is not None:
            _pos_int("Performer", "redraw_interval", self.redraw_interval)
        if not isinstance(self.causal, bool):
            raise TypeError(f"Performer: causal must be a bool, got {self.causal!r}")


@dataclass(frozen=True)
class Linformer:
    """Linformer (Wang et al. 2020): keys and values projected along N to proj_dim rows.

    max_len: the longest key sequence (the projections are proj_dim x max_len). Non-causal.
    Cost O(N * proj_dim * D).
    """

    max_len: int
    proj_dim: int = 64
    causal: bool = False

    def __post_init__(self):
        _pos_int("Linformer", "max_len", self.max_len)
        _pos_int("Linformer", "proj_dim", self.proj_dim)
        if self.causal:
            raise ValueError("Linformer(causal=True): the projections E, F mix every key position into each "
                             "projected row, so future keys leak into every query; Linformer is non-causal")


@dataclass(frozen=True)
class Nystrom:
    """Nystromformer (Xiong et al. 2021): segment-mean landmarks, iterative pseudo-inverse.

    Non-causal. Cost O(N * num_landmarks * D).
    """

    num_landmarks: int = 64
    pinv_iterations: int = 6
    causal: bool = False

    def __post_init__(self):
        _pos_int("Nystrom", "num_landmarks", self.num_landmarks)
        _pos_int("Nystrom", "pinv_iterations", self.pinv_iterations)
        if self.causal:
            raise ValueError("Nystrom(causal=True): landmarks are means over segments that include future "
                             "positions, so the approximation is non-causal")


@dataclass(frozen=True)
class LSH:
    """Reformer LSH attention (Kitaev et al. 2020): shared-QK, angular hashing, sorted chunks.

    Keys are the (normalised) queries: the module's key projection is not used. Cost
    O(n_hashes * N * bucket_size * D).
    """

    n_hashes: int = 1
    bucket_size: int = 32
    causal: bool = False
    seed: int = 0

    def __post_init__(self):
        _pos_int("LSH", "n_hashes", self.n_hashes)
        _pos_int("LSH", "bucket_size", self.bucket_size)
        if not isinstance(self.causal, bool):
            raise TypeError(f"LSH: causal must be a bool, got {self.causal!r}")


AttentionSpec = Softmax | Additive | Linear | Performer | Linformer | Nystrom | LSH
ATTENTION_SPECS = (Softmax, Additive, Linear, Performer, Linformer, Nystrom, LSH)


# ------------------------------------------------------------------------------------------------
# Position schemes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rope:
    """Rotary embedding (Su et al. 2021) on q and k; base theta, interleaved pairs (Meta LLaMA,
    GPT-J) or half-split (GPT-NeoX, HF), rotary_dim channels (default all of D). O(N D)."""

    base: float = 10000.0
    interleaved: bool = False
    rotary_dim: int | None = None

    def __post_init__(self):
        _opt_pos_float("Rope", "base", self.base)
        if self.rotary_dim is not None:
            _pos_int("Rope", "rotary_dim", self.rotary_dim, 2)
            if self.rotary_dim % 2:
                raise ValueError(f"Rope: rotary_dim must be even, got {self.rotary_dim}")


@dataclass(frozen=True)
class Alibi:
    """ALiBi (Press et al. 2022): -slope_h * |i - j| added to the scores; slopes from the paper."""


@dataclass(frozen=True)
class T5:
    """T5 relative bias (Raffel et al. 2020): a learned scalar per (head, log-bucket of j - i).

    bidirectional=None: True unless the attention mask is causal.
    """

    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool | None = None

    def __post_init__(self):
        _pos_int("T5", "num_buckets", self.num_buckets, 2)
        _pos_int("T5", "max_distance", self.max_distance)


@dataclass(frozen=True)
class Shaw:
    """Shaw et al. 2018 relative key and value embeddings, offsets clipped to +-max_distance."""

    max_distance: int = 16

    def __post_init__(self):
        _pos_int("Shaw", "max_distance", self.max_distance)


@dataclass(frozen=True)
class XL:
    """Transformer-XL (Dai et al. 2019): sinusoidal relative positions with u, v biases and a
    segment memory of the last mem_len inputs (no gradient into the memory)."""

    mem_len: int = 0

    def __post_init__(self):
        _pos_int("XL", "mem_len", self.mem_len, 0)


PositionSpec = Rope | Alibi | T5 | Shaw | XL
POSITION_SPECS = (Rope, Alibi, T5, Shaw, XL)
_SCORE_POSITIONS = (Alibi, T5, Shaw, XL)
_DOT_PRODUCT = (Softmax, Linear, Performer, Linformer, Nystrom, LSH)


def check_combination(attention, position, *, dropout: float = 0.0) -> None:
    """Raise a ValueError/TypeError saying why ``attention`` + ``position`` cannot work."""
    if not isinstance(attention, ATTENTION_SPECS):
        names = ", ".join(c.__name__ for c in ATTENTION_SPECS)
        raise TypeError(f"attention must be one of the attnkit.nn specs ({names}), got {attention!r}")
    if position is not None and not isinstance(position, POSITION_SPECS):
        names = ", ".join(c.__name__ for c in POSITION_SPECS)
        raise TypeError(f"position must be None or one of {names}, got {position!r}")
    a = type(attention).__name__
    if isinstance(position, _SCORE_POSITIONS) and not isinstance(attention, Softmax):
        raise ValueError(
            f"position={type(position).__name__}() changes the score matrix, which {a} attention never "
            "forms; use attention=Softmax(...) or position=Rope()/None"
        )
    if isinstance(position, Rope) and not isinstance(attention, _DOT_PRODUCT):
        raise ValueError(f"position=Rope() rotates q and k for a dot product; {a} attention scores with "
                         "tanh(W_q q + W_k k), where a rotation has no relative meaning")
    if isinstance(position, XL) and not attention.causal:
        raise ValueError("position=XL(...) uses a segment memory of *past* inputs and needs a causal mask: "
                         "attention=Softmax(mask=causal()) (or a sliding window)")
    if dropout and not isinstance(attention, (Softmax,)):
        raise ValueError(f"dropout={dropout} drops attention weights, which {a} attention does not form; "
                         "use dropout=0.0 (apply dropout on the module output instead)")
    if dropout and isinstance(position, (Shaw, XL)):
        raise ValueError(f"dropout={dropout}: position={type(position).__name__}() runs its own kernel, which has no "
                         "attention dropout; use dropout=0.0")


def can_decode(attention, position) -> str | None:
    """None if this combination can run with a cache, else the reason it cannot."""
    a = type(attention).__name__
    if isinstance(attention, (Softmax, Additive)):
        if not attention.causal:
            return (f"{a}(mask={attention.mask!r}) is not causal, so a cached pass would differ from the "
                    "full pass; use mask=causal() or sliding_window(left, 0) (optionally & other specs)")
        return None
    if isinstance(attention, (Linear, Performer)):
        return None if attention.causal else f"{a}(causal=False) has no recurrent form; use causal=True"
    if isinstance(attention, (Linformer, Nystrom)):
        return f"{a} projects/summarises the whole key sequence and is non-causal, so it cannot decode"
    if isinstance(attention, LSH):
        return "LSH re-sorts all keys into buckets on every call; it has no incremental form"
    return f"{a} cannot decode"


__all__ = [
    "Softmax", "Additive", "Linear", "Performer", "Linformer", "Nystrom", "LSH",
    "Rope", "Alibi", "T5", "Shaw", "XL", "AttentionSpec", "PositionSpec",
    "check_combination", "can_decode", "mask_is_causal", "mask_window", "mask_is_relative",
]
