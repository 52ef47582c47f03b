"""attnkit.nn: MultiHeadAttention, its variant/position specs, and decoding caches.

Layout: modules take (B, N, E) (batch_first); heads are (B, H, N, D) inside. Bool masks
True = may attend; torch-polarity masks (key_padding_mask, torch_attn_mask) are converted at
the module boundary.
"""

from .cache import KVCache, RecurrentState, SegmentMemory, SlidingWindowCache, StaticKV
from .mha import MultiHeadAttention
from .specs import (
    LSH,
    T5,
    XL,
    Additive,
    Alibi,
    Linear,
    Linformer,
    Nystrom,
    Performer,
    Rope,
    Shaw,
    Softmax,
    can_decode,
    check_combination,
)
from .torch_compat import convert_attn_mask, convert_key_padding_mask

__all__ = [
    "MultiHeadAttention", "KVCache", "SlidingWindowCache", "RecurrentState", "SegmentMemory", "StaticKV",
    "Softmax", "Additive", "Linear", "Performer", "Linformer", "Nystrom", "LSH",
    "Rope", "Alibi", "T5", "Shaw", "XL", "can_decode", "check_combination",
    "convert_attn_mask", "convert_key_padding_mask",
]
