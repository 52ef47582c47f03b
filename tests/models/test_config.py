"""TransformerConfig and the model heads: every bad hyper-parameter is a ValueError/TypeError that
names it (issue 10: d_ff=0/-1, tie_embeddings="no", dropout="0.1", num_tags=0 were accepted or
ended in deep torch errors)."""

from __future__ import annotations

import pytest

from attnkit.models import DecoderLM, LayerSpec, SequenceClassifier, TokenTagger, TransformerConfig, TransformerEncoder
from attnkit.nn import XL, Softmax


@pytest.mark.parametrize("kw, exc, match", [
    ({"d_ff": 0}, ValueError, r"TransformerConfig.d_ff must be None or an int >= 1, got 0"),
    ({"d_ff": -4}, ValueError, r"TransformerConfig.d_ff must be None or an int >= 1, got -4"),
    ({"d_ff": 2.5}, ValueError, r"TransformerConfig.d_ff must be None or an int >= 1, got 2.5"),
    ({"num_kv_heads": 0}, ValueError, r"TransformerConfig.num_kv_heads must be None or an int >= 1, got 0"),
    ({"num_kv_heads": 3}, ValueError, r"num_heads=4 must be a multiple of num_kv_heads=3"),
    ({"tie_embeddings": "no"}, TypeError, r"TransformerConfig.tie_embeddings must be True or False, got 'no'"),
    ({"dropout": "0.1"}, TypeError, r"TransformerConfig.dropout must be a float in \[0, 1\), got '0.1'"),
    ({"dropout": 1.0}, ValueError, r"TransformerConfig.dropout must be a float in \[0, 1\), got 1.0"),
    ({"vocab_size": 0}, ValueError, r"TransformerConfig.vocab_size must be an int >= 1, got 0"),
    ({"num_layers": True}, ValueError, r"TransformerConfig.num_layers must be an int >= 1, got True"),
])
def test_config_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        TransformerConfig(**{"vocab_size": 10, **kw})


@pytest.mark.parametrize("head, name", [(SequenceClassifier, "num_classes"), (TokenTagger, "num_tags")])
@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_head_sizes_are_checked(head, name, n):
    with pytest.raises(ValueError, match=rf"{head.__name__}: {name} must be an int >= 1, got {n!r}"):
        head(TransformerConfig(vocab_size=10, d_model=8, num_heads=2, num_layers=1), n)


def test_decoder_accepts_a_layer_it_makes_causal():
    """LayerSpec(Softmax(), XL()) needs a causal variant; decoders make every layer causal, so the
    config must accept it (and an encoder using it must still be refused by the model)."""
    cfg = TransformerConfig(vocab_size=10, d_model=8, num_heads=2, num_layers=1, layers=LayerSpec(Softmax(), XL()))
    lm = DecoderLM(cfg)
    assert lm.blocks[0].attn.attention.causal
    with pytest.raises(ValueError, match=r"position=XL\(...\) uses a segment memory of \*past\* inputs"):
        TransformerEncoder(cfg)
