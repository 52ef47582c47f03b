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
    can_decode,
    check_combination,
)
from attnkit.nn._cores import require
from attnkit.nn.specs import mask_is_causal, mask_is_relative, mask_window


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
    (lambda: Linformer(max_len=8, causal=True), "non-causal"),
    (lambda: Nystrom(causal=True), "non-causal"),
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
    (Softmax(), XL(), "needs a causal mask"),
    (Softmax(mask=M.sliding_window(4, 2)), XL(), "needs a causal mask"),
    ("softmax", None, "attention must be one of"),
    (Softmax(), "rope", "position must be None or one of"),
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
    with pytest.raises(ValueError, match="Nq == Nk"):
        MultiHeadAttention(8, 2, attention=LSH(bucket_size=2))(x, context=ctx)
    with pytest.raises(ValueError, match="cannot decode"):
        MultiHeadAttention(8, 2, attention=Nystrom(num_landmarks=2)).make_cache(1, 8)


def test_can_decode_reasons():
    assert can_decode(Softmax(mask=M.causal()), None) is None
    assert can_decode(Softmax(mask=M.sliding_window(3) & M.causal()), Rope()) is None
    assert can_decode(Linear(causal=True), None) is None
    assert "not causal" in can_decode(Softmax(), None)
    assert "causal=True" in can_decode(Performer(), None)
    assert "non-causal" in can_decode(Linformer(max_len=4), None)
    assert "incremental" in can_decode(LSH(causal=True), None)


def test_mask_structure_helpers():
    assert mask_is_causal(M.causal()) and mask_is_causal(M.sliding_window(3))
    assert not mask_is_causal(M.sliding_window(3, 1)) and not mask_is_causal(None)
    assert mask_is_causal(M.causal() & M.prefix_lm(3))
    assert not mask_is_causal(M.causal() | M.prefix_lm(3))
    assert mask_window(M.sliding_window(5)) == 5 and mask_window(M.causal()) is None
    assert mask_window(M.causal() & M.sliding_window(2)) == 2
    assert mask_window(M.sliding_window(2) | M.sliding_window(6)) == 6
    assert mask_is_relative(M.causal() & M.sliding_window(2))
    assert not mask_is_relative(M.causal() & M.prefix_lm(2))


def test_missing_module_message():
    with pytest.raises(ValueError, match="not available: attnkit.no_such_variant is missing"):
        require("no_such_variant")
