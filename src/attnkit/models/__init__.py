"""Small reference models built from ``attnkit.nn.MultiHeadAttention``: an encoder with
classification / tagging heads, a decoder-only LM with cached ``generate``, and an
encoder-decoder with (softmax or additive) cross-attention. Per-layer variants via
``TransformerConfig.layers``."""

from .config import LayerSpec, TransformerConfig, causal_variant
from .decoder import DecoderLM
from .encoder import SequenceClassifier, TokenTagger, TransformerEncoder
from .seq2seq import Seq2Seq

__all__ = ["TransformerConfig", "LayerSpec", "causal_variant", "TransformerEncoder", "SequenceClassifier",
           "TokenTagger", "DecoderLM", "Seq2Seq"]
