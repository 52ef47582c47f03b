"""attnkit: every common self-attention variant behind one PyTorch API.

Layout (B, H, N, D); bool masks True = may attend; causal is bottom-right aligned; a query row
with no allowed key gives zeros (never NaN); default scale 1/sqrt(D).

- exact softmax attention: ``attention`` with ``masks`` / ``biases`` specs and backends
- positions: ``positions`` (RoPE, ALiBi, T5, Shaw, Transformer-XL, absolute)
- other families (``variants``): ``additive_attention``, ``linear_attention``,
  ``performer_attention``, ``linformer_attention``, ``nystrom_attention``, ``lsh_attention``
- modules and models: ``MultiHeadAttention``, ``nn`` (position specs, family modules),
  ``caches``, ``models``
"""

from . import biases, caches, masks, models, nn, positions, variants
from ._version import __version__
from .dispatch import NoBackendError
from .functional import attention, which_backend
from .nn import (
    AdditiveAttention,
    LinearAttention,
    LinformerAttention,
    LSHSelfAttention,
    MultiHeadAttention,
    NystromAttention,
    PerformerAttention,
)
from .variants import (
    LinearState,
    PerformerState,
    additive_attention,
    linear_attention,
    linear_attention_step,
    linformer_attention,
    lsh_attention,
    nystrom_attention,
    performer_attention,
    performer_attention_step,
    shared_qk_attention,
)

__all__ = [
    "attention", "which_backend", "masks", "biases", "positions", "variants", "caches", "NoBackendError",
    "additive_attention", "linear_attention", "linear_attention_step", "LinearState",
    "performer_attention", "performer_attention_step", "PerformerState",
    "linformer_attention", "nystrom_attention", "lsh_attention", "shared_qk_attention",
    "MultiHeadAttention", "AdditiveAttention", "LinearAttention", "PerformerAttention", "LinformerAttention",
    "NystromAttention", "LSHSelfAttention", "nn", "models", "__version__",
]
