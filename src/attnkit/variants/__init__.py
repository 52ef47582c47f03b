"""Attention variants: one file per family (its function, its spec, its module core), one registry.

| word        | spec         | function(s)                                   | file           |
|-------------|--------------|-----------------------------------------------|----------------|
| softmax     | ``Softmax``  | ``attnkit.attention`` (backends, dispatch)      | softmax.py     |
| additive    | ``Additive`` | ``additive_attention``                        | additive.py    |
| linear      | ``Linear``   | ``linear_attention``, ``linear_attention_step`` | linear.py      |
| performer   | ``Performer``| ``performer_attention``, ``performer_attention_step`` | performer.py |
| linformer   | ``Linformer``| ``linformer_attention``                       | linformer.py   |
| nystrom     | ``Nystrom``  | ``nystrom_attention``                         | nystrom.py     |
| lsh         | ``LSH``      | ``lsh_attention``                             | lsh.py         |

A spec answers every question consumers ask about its variant (``variants.base.Variant``);
``MultiHeadAttention(attention=spec)`` builds its core. Adding a variant is one file and one
line in ``REGISTRY``.
"""

from __future__ import annotations

from .additive import Additive, additive_attention
from .base import MaskedVariant, Variant
from .linear import Linear, LinearState, elu_plus_one, linear_attention, linear_attention_step
from .linformer import Linformer, linformer_attention
from .lsh import LSH, lsh_attention, shared_qk_attention
from .nystrom import Nystrom, nystrom_attention
from .performer import (
    Performer,
    PerformerState,
    draw_favor_projection,
    favor_features,
    performer_attention,
    performer_attention_step,
)
from .softmax import Softmax

REGISTRY: dict[str, type[Variant]] = {
    spec.name: spec for spec in (Softmax, Additive, Linear, Performer, Linformer, Nystrom, LSH)
}


def variant_class(word: str) -> type[Variant]:
    """The spec class registered under ``word`` (e.g. "softmax", "performer")."""
    if word not in REGISTRY:
        raise ValueError(f"unknown attention variant {word!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[word]


__all__ = [
    "REGISTRY", "variant_class", "Variant", "MaskedVariant",
    "Softmax", "Additive", "Linear", "Performer", "Linformer", "Nystrom", "LSH",
    "additive_attention", "linear_attention", "linear_attention_step", "LinearState", "elu_plus_one",
    "performer_attention", "performer_attention_step", "PerformerState", "draw_favor_projection", "favor_features",
    "linformer_attention", "nystrom_attention", "lsh_attention", "shared_qk_attention",
]
