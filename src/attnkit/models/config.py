"""``TransformerConfig``: the small reference models' hyper-parameters, per-layer variants included.

Legend: L layers, E d_model, H heads, F d_ff, V vocab size.

Each layer's attention variant and position scheme come from ``layers``: one ``LayerSpec``
for all layers, a tuple with one per layer, or a function of the layer index (mixing allowed,
e.g. sliding-window layers with a global layer every fourth)::

    TransformerConfig(vocab_size=100, num_layers=4,
                      layers=lambda i: LayerSpec(Softmax(mask=causal()) if i % 4 == 3
                                                 else Softmax(mask=sliding_window(63)), Rope()))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..nn.mha import check_combination
from ..variants import Softmax


@dataclass(frozen=True)
class LayerSpec:
    """One layer's attention variant (a spec from ``attnkit.nn``) and position scheme (or None)."""

    attention: object = field(default_factory=Softmax)
    position: object = None


def causal_variant(spec):
    """The causal version of an attention spec, for decoder self-attention (or raise why not):
    ``spec.causal_version()`` (Softmax/Additive: ``causal() & mask``; Linear/Performer/LSH:
    causal=True; Linformer and Nystrom have none)."""
    try:
        return spec.causal_version()
    except ValueError as e:
        raise ValueError(f"{e}; use it in the encoder (decoder_layers= chooses the decoder's)") from None


def _resolve(layers, i: int, n: int, name: str) -> LayerSpec:
    if isinstance(layers, LayerSpec):
        return layers
    if isinstance(layers, tuple):
        if len(layers) != n:
            raise ValueError(f"{name} has {len(layers)} LayerSpecs but num_layers={n}")
        out = layers[i]
    elif callable(layers):
        out = layers(i)
    else:
        raise TypeError(f"{name} must be a LayerSpec, a tuple of them or a function of the layer index, "
                        f"got {type(layers).__name__}")
    if not isinstance(out, LayerSpec):
        raise TypeError(f"{name} for layer {i} must be a LayerSpec, got {out!r}")
    return out


def _check_layer(s: LayerSpec, i: int) -> None:
    """The layer must make sense as given (encoders) or in its causal version (decoders make every
    self-attention causal); the model that builds it checks the form it uses."""
    try:
        check_combination(s.attention, s.position)
    except ValueError as first:
        try:
            causal = s.attention.causal_version()
        except ValueError:
            raise ValueError(f"layer {i}: {first}") from None
        try:
            check_combination(causal, s.position)
        except ValueError:
            raise ValueError(f"layer {i}: {first}") from None
    except TypeError as e:
        raise TypeError(f"layer {i}: {e}") from None


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of ``TransformerEncoder``, ``DecoderLM`` and ``Seq2Seq`` (pre-norm blocks).

    vocab_size: V. d_model: E. num_heads: H. num_kv_heads: grouped-query heads (default H).
    num_layers: L (decoder layers too, for Seq2Seq). d_ff: F (default 4E). max_len: longest
    sequence (learned absolute positions, default cache size). dropout: on residual branches.
    layers: per-layer ``LayerSpec`` (see module docstring). decoder_layers: Seq2Seq decoder's
    self-attention (default ``layers``; made causal). cross_attention: Seq2Seq cross-attention
    variant (``Softmax()`` or ``Additive()`` for Bahdanau). abs_position: "learned",
    "sinusoidal" or None (added to token embeddings). tie_embeddings: output layer = embedding.
    """

    vocab_size: int
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    num_kv_heads: int | None = None
    d_ff: int | None = None
    max_len: int = 512
    dropout: float = 0.0
    layers: LayerSpec | tuple | Callable[[int], LayerSpec] = field(default_factory=LayerSpec)
    decoder_layers: LayerSpec | tuple | Callable[[int], LayerSpec] | None = None
    cross_attention: object = field(default_factory=Softmax)
    abs_position: str | None = None
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "max_len"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"TransformerConfig.{name} must be an int >= 1, got {val!r}")
        for name in ("num_kv_heads", "d_ff"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
                raise ValueError(f"TransformerConfig.{name} must be None or an int >= 1, got {val!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig: d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"TransformerConfig: num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"TransformerConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if self.abs_position not in (None, "learned", "sinusoidal"):
            raise ValueError(f"TransformerConfig.abs_position must be None, 'learned' or 'sinusoidal', got {self.abs_position!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"TransformerConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        for i in range(self.num_layers):
            s = self.layer(i)
            _check_layer(s, i)
        check_combination(self.cross_attention, None)

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def layer(self, i: int) -> LayerSpec:
        """The (encoder / decoder-only) LayerSpec of layer i."""
        return _resolve(self.layers, i, self.num_layers, "layers")

    def decoder_layer(self, i: int) -> LayerSpec:
        """Layer i of a decoder: its LayerSpec with a causal attention variant."""
        s = _resolve(self.layers if self.decoder_layers is None else self.decoder_layers, i, self.num_layers,
                     "decoder_layers" if self.decoder_layers is not None else "layers")
        return LayerSpec(causal_variant(s.attention), s.position)


__all__ = ["TransformerConfig", "LayerSpec", "causal_variant"]
