"""Variant/position specs: validation, combination rules, decode capability, error messages."""

from __future__ import annotations

import pytest
import torch

from attnkit import masks as M
from attnkit.nn import (
    LSH,
    T5,
    XL,
    Additive,
    Alibi,
    Linear,
    Linformer,
    MultiHeadAttention,
    Nystrom,
    Performer,
    Rope,
    Shaw,
    Softmax,
    check_combination,
)
from attnkit.variants import REGISTRY, variant_class


def test_specs_are_frozen_hashable_data():
    a, b = Softmax(mask=None, softcap=3.0), Softmax(softcap=3.0)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.softcap = 1.0
    assert Rope() == Rope(base=10000.0) and XL(mem_len=4) != XL(mem_len=5)


@pytest.mark.parametrize("make, match", [
    (lambda: Softmax(mask="causal"), "mask must be None or an attnkit.masks spec"),
    (lambda: Softmax(softcap=-1.0), "softcap"),
    (lambda: Softmax(scale=0.0), "scale"),
    (lambda: Performer(num_features=0), "num_features"),
    (lambda: Linformer(max_len=0), "max_len"),
    (lambda: Linformer(max_len=8, sharing="rows"), "sharing"),
    (lambda: Nystrom(conv_kernel_size=4), "odd"),
    (lambda: Linear(feature_map="elu"), "feature_map must be one of"),
    (lambda: Linear(causal=1), "causal must be a bool"),
    (lambda: Performer(stabilizer="paper2"), "stabilizer"),
    (lambda: Performer(eps=1e-4), "needs stabilizer='paper'"),
    (lambda: LSH(seed=1.5), "seed must be an int"),
    (lambda: LSH(bucket_size=0), "bucket_size"),
    (lambda: Rope(rotary_dim=3), "even"),
    (lambda: T5(num_buckets=1), "num_buckets"),
    (lambda: XL(mem_len=-1), "mem_len"),
    (lambda: Additive(attn_dim=0), "attn_dim"),
])
def test_invalid_specs_raise_with_reason(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("att, pos, match", [
    (Linear(), Alibi(), "never forms"),
    (Performer(), T5(), "never forms"),
    (Nystrom(), Shaw(), "never forms"),
    (Additive(), Rope(), "tanh"),
    (Softmax(), XL(), "needs a causal variant"),
    (Softmax(mask=M.sliding_window(4, 2)), XL(), "needs a causal variant"),
    (Softmax(softcap=5.0, mask=M.causal()), Shaw(), "no softcap"),
    (Softmax(backend="sdpa"), Shaw(), "own kernel"),
    ("softmax", None, "attention must be a variant spec"),
    (Softmax(), "rope", "position must be None or a position spec"),
])
def test_invalid_combinations_fail_at_construction(att, pos, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_combination(att, pos)
    with pytest.raises((ValueError, TypeError), match=match):
        MultiHeadAttention(8, 2, attention=att, position=pos)


def test_dropout_needs_weights():
    with pytest.raises(ValueError, match="dropout=0.1"):
        MultiHeadAttention(8, 2, attention=Linear(), dropout=0.1)
    with pytest.raises(ValueError, match="own kernel"):
        MultiHeadAttention(8, 2, attention=Softmax(mask=M.causal()), position=Shaw(), dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(8, 2, dropout=1.0)


def test_module_shape_errors():
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        MultiHeadAttention(8, 3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads=3"):
        MultiHeadAttention(12, 4, num_kv_heads=3)
    m = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must be a 3-D \(B, N, 8\)"):
        m(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"expected \(B, N, 8\)"):
        m(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 4\), expected \(2, 3\)"):
        m(torch.randn(2, 3, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch's polarity"):
        m(torch.randn(2, 3, 8), key_padding_mask=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="torch_attn_mask"):
        m(torch.randn(2, 3, 8), mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="kdim == vdim == embed_dim"):
        MultiHeadAttention(8, 2, kdim=4)(torch.randn(1, 2, 8))


def test_errors_known_only_at_forward():
    x = torch.randn(1, 4, 8)
    ctx = torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="cross-attention takes position=None"):
        MultiHeadAttention(8, 2, position=Rope())(x, context=ctx)
    with pytest.raises(ValueError, match="cross-attention takes position=None"):
        MultiHeadAttention(8, 2, attention=Softmax(mask=M.causal()), position=XL())(x, context=ctx)
    with pytest.raises(ValueError, match="not causal"):
        m = MultiHeadAttention(8, 2)
        m(x, cache=MultiHeadAttention(8, 2, attention=Softmax(mask=M.causal())).make_cache(1, 8))
    with pytest.raises(ValueError, match="Linformer cannot honour the mask causal"):
        MultiHeadAttention(8, 2, attention=Linformer(max_len=8, proj_dim=2))(x, mask=M.causal())
    with pytest.raises(ValueError, match="linear attention cannot honour"):
        MultiHeadAttention(8, 2, attention=Linear())(x, mask=M.sliding_window(1))
    with pytest.raises(ValueError, match="need_weights=True"):
        MultiHeadAttention(8, 2, attention=Linear())(x, need_weights=True)
    with pytest.raises(ValueError, match="self-attention only"):
        MultiHeadAttention(8, 2, attention=LSH(bucket_size=2))(x, context=ctx)
    with pytest.raises(ValueError, match="cannot decode"):
        MultiHeadAttention(8, 2, attention=Nystrom(num_landmarks=2)).make_cache(1, 8)


def test_decode_reasons():
    assert Softmax(mask=M.causal()).decode_reason() is None
    assert (Softmax(mask=M.sliding_window(3) & M.causal())).decode_reason() is None
    assert Linear(causal=True).decode_reason() is None
    assert "not causal" in Softmax().decode_reason()
    assert "causal=True" in Performer().decode_reason()
    assert "non-causal" in Linformer(max_len=4).decode_reason()
    assert "incremental" in LSH(causal=True).decode_reason()
    # the Sparse Transformer's strided head decodes (issue 10): strided is causal
    assert Softmax(mask=M.sliding_window(3) | M.strided(4)).decode_reason() is None


def test_causal_versions():
    assert Softmax().causal_version() == Softmax(mask=M.causal())
    assert Softmax(mask=M.causal()).causal_version() == Softmax(mask=M.causal())
    assert Linear().causal_version() == Linear(causal=True)
    assert Performer(num_features=8).causal_version() == Performer(num_features=8, causal=True)
    assert LSH().causal_version().causal
    for spec in (Linformer(max_len=4), Nystrom()):
        with pytest.raises(ValueError, match="non-causal by construction"):
            spec.causal_version()


def test_mask_structure_is_answered_by_the_mask():
    assert M.causal().is_causal and M.sliding_window(3).is_causal
    assert not M.sliding_window(3, 1).is_causal
    assert (M.causal() & M.prefix_lm(3)).is_causal
    assert not (M.causal() | M.prefix_lm(3)).is_causal
    assert (M.sliding_window(3) | M.strided(4)).is_causal and M.dilated(3, 2).is_causal
    assert M.sliding_window(5).window == 5 and M.causal().window is None
    assert (M.causal() & M.sliding_window(2)).window == 2
    assert (M.sliding_window(2) | M.sliding_window(6)).window == 6
    assert (M.causal() & M.sliding_window(2)).translation_invariant
    assert not (M.causal() & M.prefix_lm(2)).translation_invariant
    assert M.key_padding(torch.tensor([2, 3])).key_only and not M.causal().key_only
    assert (M.causal() & M.key_padding(torch.tensor([2]))).conjuncts()[0] == M.causal()


def test_registry_words_build_their_specs():
    assert list(REGISTRY) == ["softmax", "additive", "linear", "performer", "linformer", "nystrom", "lsh"]
    for word, cls in REGISTRY.items():
        assert variant_class(word) is cls and cls.name == word
    with pytest.raises(ValueError, match="unknown attention variant 'flash'; registered: softmax, additive"):
        variant_class("flash")
