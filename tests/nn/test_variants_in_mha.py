"""Every registered variant through the one module: self- and cross-attention, padding, cached
decoding equal to the full pass, and errors that name the argument (float64).

A new variant added to ``attnkit.variants.REGISTRY`` must be added to SPECS below, or the first
test fails.
"""

from __future__ import annotations

import pytest
import torch

from attnkit import MultiHeadAttention
from attnkit.variants import LSH, REGISTRY, Additive, Linear, Linformer, Nystrom, Performer, Softmax
from tests.tolerances import assert_close

F64 = torch.float64
E, H = 16, 4
SPECS = {
    "softmax": Softmax(),
    "additive": Additive(attn_dim=6),
    "linear": Linear(),
    "performer": Performer(num_features=16),
    "linformer": Linformer(max_len=16, proj_dim=4),
    "nystrom": Nystrom(num_landmarks=4),
    "lsh": LSH(n_hashes=2, bucket_size=4),
}
# LSH hashes padded positions too (as the paper and the peer do), so padded tokens' values
# change which real keys share a bucket: padding is excluded from the weights, not from hashing.
HASHES_PADDING = {"lsh"}
# Nystrom's landmark segments cover the padded length: padding changes the segments (not the
# padded values' influence), so a padded context is not the same computation as the unpadded one.
SEGMENTS_SEE_LENGTH = {"nystrom"}


def _module(spec, **kw) -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(E, H, num_kv_heads=2, attention=spec, dtype=F64, **kw).eval()


def test_every_registered_variant_is_covered():
    assert set(SPECS) == set(REGISTRY)
    for word, spec in SPECS.items():
        assert type(spec) is REGISTRY[word]


@pytest.mark.parametrize("word", sorted(SPECS))
def test_self_attention_with_padding(word):
    m = _module(SPECS[word])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, E, generator=g, dtype=F64)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 7:] = True
    out = m(x, key_padding_mask=pad)
    assert out.shape == (2, 11, E) and torch.isfinite(out).all()
    if word in HASHES_PADDING:
        return
    x2 = x.clone()
    x2[1, 7:] = 100.0 * torch.randn(4, E, generator=g, dtype=F64)  # garbage in the padded tokens
    out2 = m(x2, key_padding_mask=pad)
    assert_close(out2[1, :7], out[1, :7])
    assert_close(out2[0], out[0])


@pytest.mark.parametrize("word", sorted(SPECS))
def test_cross_attention_with_context_padding(word):
    spec = SPECS[word]
    m = _module(spec, kdim=12, vdim=12) if not spec.shares_qk else _module(spec)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, E, generator=g, dtype=F64)
    ctx = torch.randn(2, 9, m.kdim, generator=g, dtype=F64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    if not spec.cross:
        with pytest.raises(ValueError, match="self-attention only"):
            m(x, context=ctx, key_padding_mask=pad)
        return
    out = m(x, context=ctx, key_padding_mask=pad)
    assert out.shape == (2, 5, E)
    ctx2 = ctx.clone()
    ctx2[0, 6:] = 50.0
    assert_close(m(x, context=ctx2, key_padding_mask=pad), out)
    if word not in SEGMENTS_SEE_LENGTH:
        assert_close(m(x[:1], context=ctx[:1, :6]), out[:1])  # padded context == the unpadded one


def _causal_spec(spec):
    try:
        return spec.causal_version()
    except ValueError:
        return None


@pytest.mark.parametrize("word", sorted(SPECS))
def test_cached_decoding_equals_the_full_pass(word):
    spec = _causal_spec(SPECS[word])
    if spec is None:  # non-causal by construction: it says so, and a layer refuses to make a cache
        with pytest.raises(ValueError, match="non-causal by construction"):
            SPECS[word].causal_version()
        with pytest.raises(ValueError, match="cannot decode"):
            _module(SPECS[word]).make_cache(1, 8)
        return
    m = _module(spec)
    if spec.decode_reason() is not None:
        with pytest.raises(ValueError, match="cannot decode"):
            m.make_cache(1, 8)
        return
    x = torch.randn(2, 10, E, generator=torch.Generator().manual_seed(3), dtype=F64)
    full = m(x)
    cache = m.make_cache(2, 10)
    outs, i = [], 0
    for n in (3, 1, 4, 2):
        outs.append(m(x[:, i:i + n], cache=cache))
        i += n
    assert cache.length == 10
    assert_close(torch.cat(outs, dim=1), full)


@pytest.mark.parametrize("word", sorted(SPECS))
def test_errors_name_the_argument(word):
    spec = SPECS[word]
    m = _module(spec)
    x = torch.randn(2, 6, E, dtype=F64)
    with pytest.raises(ValueError, match=r"x has shape \(2, 6, 17\), expected \(B, N, 16\)"):
        m(torch.randn(2, 6, E + 1, dtype=F64))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 5\), expected \(2, 6\)"):
        m(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"x has dtype torch.float32 but the module's weights are torch.float64"):
        m(x.float())
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        m(torch.zeros(2, 6, E, dtype=torch.long))
    if spec.cross:
        with pytest.raises(ValueError, match=r"context has shape \(2, 3, 15\), expected \(2, N, 16\)"):
            m(x, context=torch.randn(2, 3, E - 1, dtype=F64))
        with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 6\), expected \(2, 3\).*context"):
            m(x, context=torch.randn(2, 3, E, dtype=F64), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
