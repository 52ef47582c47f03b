"""attnkit.nn: MultiHeadAttention (the one attention module), position specs, caches.

Layout: modules take (B, N, E) (batch_first); heads are (B, H, N, D) inside. Bool masks
True = may attend; torch-polarity masks (key_padding_mask, torch_attn_mask) are converted at
the module boundary. The variant specs (``Softmax``, ``Linear``, ...) live in
``attnkit.variants`` and are re-exported here; the caches live in ``attnkit.caches``.
"""

from ..caches import Cache, KVCache, RecurrentState, SegmentMemory, SlidingWindowCache, StaticKV
from ..variants import LSH, Additive, Linear, Linformer, Nystrom, Performer, Softmax
from .family import (
    AdditiveAttention,
    LinearAttention,
    LinformerAttention,
    LSHSelfAttention,
    NystromAttention,
    PerformerAttention,
)
from .mha import MultiHeadAttention, check_combination
from .positions import T5, XL, Alibi, PositionSpec, Rope, Shaw
from .torch_compat import convert_attn_mask, convert_key_padding_mask

__all__ = [
    "MultiHeadAttention", "check_combination",
    "Cache", "KVCache", "SlidingWindowCache", "RecurrentState", "SegmentMemory", "StaticKV",
    "Softmax", "Additive", "Linear", "Performer", "Linformer", "Nystrom", "LSH",
    "PositionSpec", "Rope", "Alibi", "T5", "Shaw", "XL",
    "AdditiveAttention", "LinearAttention", "PerformerAttention", "LinformerAttention", "NystromAttention",
    "LSHSelfAttention", "convert_attn_mask", "convert_key_padding_mask",
]
