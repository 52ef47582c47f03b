"""attnkit: every common self-attention variant behind one PyTorch API.

Layout (B, H, N, D); bool masks True = may attend; causal is bottom-right aligned; a query row
with no allowed key gives zeros (never NaN); default scale 1/sqrt(D).

- exact softmax attention: ``attention`` with ``masks`` / ``biases`` specs and backends
- positions: ``positions`` (RoPE, ALiBi, T5, Shaw, Transformer-XL, absolute)
- other families: ``additive_attention``, ``linear_attention``, ``performer_attention``,
  ``linformer_attention``, ``nystrom_attention``, ``lsh_attention``
- modules and models: ``MultiHeadAttention``, ``nn`` (specs, caches), ``models``
"""

from . import biases, feature_maps, masks, models, nn, positions
from .additive import AdditiveAttention, additive_attention
from .dispatch import NoBackendError
from .functional import attention, which_backend
from .linear import LinearAttention, LinearState, linear_attention, linear_attention_step
from .linformer import linformer_attention
from .lsh import lsh_attention, shared_qk_attention
from .nn import MultiHeadAttention
from .nystrom import nystrom_attention
from .performer import (
    FavorConfig,
    PerformerAttention,
    PerformerState,
    performer_attention,
    performer_attention_step,
)

__version__ = "0.1.0"

__all__ = [
    "attention", "which_backend", "masks", "biases", "positions", "feature_maps", "NoBackendError",
    "additive_attention", "AdditiveAttention",
    "linear_attention", "linear_attention_step", "LinearAttention", "LinearState",
    "performer_attention", "performer_attention_step", "PerformerAttention", "FavorConfig", "PerformerState",
    "linformer_attention", "nystrom_attention", "lsh_attention", "shared_qk_attention",
    "MultiHeadAttention", "nn", "models", "__version__",
]
