"""Positional schemes: rotary (RoPE), ALiBi, T5 buckets, Shaw relative keys/values,
Transformer-XL relative attention with memory, and absolute (sinusoidal, learned) embeddings.

Legend: B batch, H heads, N positions, D head dim, E model dim. Query row i of Nq sits at key
position i + (Nk - Nq) (bottom-right, the attnkit convention), which is what a KV cache needs.

How each scheme plugs into attention:
- RoPE: transforms q and k before ``attnkit.attention`` (``RotaryEmbedding.apply``).
- ALiBi, T5: bias specs passed as ``attnkit.attention(..., bias=spec)``; evaluated per tile.
- Shaw, Transformer-XL: their own attention functions (``shaw_attention``, ``xl_attention``),
  because they change the values (Shaw) or need a per-head query bias on a relative key (XL).
- Absolute: added to (B, N, E) token embeddings before the projections.
See docs/positions.md.
"""

from .absolute import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding, sinusoidal_table
from .alibi import ALiBi, alibi_slopes, show_alibi
from .rope import RotaryEmbedding, apply_rotary, interleaved_to_half_split, rope_inv_freq
from .shaw import ShawRelativePosition, shaw_attention, shaw_indices
from .t5 import T5Bias, T5RelativeBias, show_t5, t5_relative_bucket
from .xl import XLRelativePosition, update_memory, xl_attention, xl_distances, xl_sinusoid

__all__ = [
    "RotaryEmbedding", "apply_rotary", "rope_inv_freq", "interleaved_to_half_split",
    "ALiBi", "alibi_slopes", "show_alibi",
    "T5Bias", "T5RelativeBias", "t5_relative_bucket", "show_t5",
    "ShawRelativePosition", "shaw_attention", "shaw_indices",
    "XLRelativePosition", "xl_attention", "xl_sinusoid", "xl_distances", "update_memory",
    "SinusoidalPositionalEmbedding", "LearnedPositionalEmbedding", "sinusoidal_table",
]
