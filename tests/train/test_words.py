"""Variant, position and list words: specs from the registries, one-line errors naming the argument."""

from __future__ import annotations

import pytest

from attnkit import masks as M
from attnkit.nn import T5, Linformer, Performer, Rope, Softmax
from attnkit.train.words import attention_from_word, position_from_word, split_list


def test_words_build_registry_specs():
    assert attention_from_word("softmax") == Softmax()
    assert attention_from_word("softmax:sliding_window(63)") == Softmax(mask=M.sliding_window(63))
    both = attention_from_word("softmax:causal & sliding_window(7), softcap=30.0")
    assert repr(both) == repr(Softmax(mask=M.causal() & M.sliding_window(7), softcap=30.0))
    assert attention_from_word("performer:num_features=64") == Performer(num_features=64)
    assert attention_from_word("linformer:proj_dim=8", context={"max_len": 32}) == Linformer(max_len=32, proj_dim=8)
    assert position_from_word("rope") == (None, Rope())
    assert position_from_word("t5:num_buckets=16") == (None, T5(num_buckets=16))
    assert position_from_word("learned") == ("learned", None) and position_from_word("none") == (None, None)


@pytest.mark.parametrize("word, match", [
    ("flash", "--attention: unknown attention variant 'flash'; registered: softmax, "),
    ("performer:nf=3", "Performer has no option 'nf'"),
    ("performer:num_features=0", "num_features must be an int >= 1"),
    ("linear:sliding_window(3)", "Linear takes no mask"),
    ("softmax:window(3)", "unknown spec 'window'"),
    ("softmax:sliding_window(", "not an argument list"),
    ("linformer", "Linformer needs max_len="),
])
def test_bad_attention_words(word, match):
    with pytest.raises(ValueError, match=match) as e:
        attention_from_word(word)
    assert "\n" not in str(e.value) and str(e.value).startswith("--attention")


def test_bad_position_words():
    with pytest.raises(ValueError, match="--position: unknown position scheme 'abs'"):
        position_from_word("abs")
    with pytest.raises(ValueError, match="learned takes no options"):
        position_from_word("learned:x=1")


def test_split_list_keeps_options_together():
    assert split_list("softmax,softmax:sliding_window(63),performer:num_features=64,seed=1,linear") == \
        ["softmax", "softmax:sliding_window(63)", "performer:num_features=64, seed=1", "linear"]
    assert split_list("softmax:global_tokens([0, 1]) & sliding_window(3),lsh") == \
        ["softmax:global_tokens([0, 1]) & sliding_window(3)", "lsh"]
