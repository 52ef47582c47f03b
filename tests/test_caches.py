"""Caches and incremental decoding (float64): chunked cached passes equal an independent
reference (tests/references.py: explicit formulas on the layer's weights) and the full pass;
what a cache keeps (the newest tokens and their padding flags) is checked against the same
reference on sequences longer than the cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import masks as M
from attnkit.nn import (
    T5,
    XL,
    Additive,
    Alibi,
    KVCache,
    Linear,
    MultiHeadAttention,
    Performer,
    RecurrentState,
    Rope,
    SegmentMemory,
    Shaw,
    SlidingWindowCache,
    Softmax,
    StaticKV,
)
from tests.references import mha_reference
from tests.tolerances import assert_close

F64 = torch.float64
CAUSAL = Softmax(mask=M.causal())
# name -> (attention, position, num_kv_heads)
CONFIGS = {
    "causal": (CAUSAL, None, None),
    "causal_gqa": (CAUSAL, None, 2),
    "causal_mqa_rope": (CAUSAL, Rope(), 1),
    "window": (Softmax(mask=M.sliding_window(3)), None, None),
    "window_rope_gqa": (Softmax(mask=M.sliding_window(2)), Rope(interleaved=True), 2),
    "window_and_doc_free": (Softmax(mask=M.causal() & M.sliding_window(4)), Alibi(), None),
    "rope": (CAUSAL, Rope(), None),
    "rope_partial": (CAUSAL, Rope(rotary_dim=2, base=100.0), None),
    "alibi": (CAUSAL, Alibi(), None),
    "t5": (CAUSAL, T5(num_buckets=8, max_distance=16), None),
    "shaw": (CAUSAL, Shaw(max_distance=3), None),
    "xl": (CAUSAL, XL(mem_len=64), None),
    "softcap": (Softmax(mask=M.causal(), softcap=2.0), None, None),
    "additive": (Additive(attn_dim=5, mask=M.causal()), None, None),
    "linear": (Linear(causal=True), None, None),
    "linear_rope_gqa": (Linear(causal=True), Rope(), 2),
    "performer": (Performer(num_features=16, causal=True), None, None),
    "performer_gqa": (Performer(num_features=8, causal=True), None, 2),
}


def _module(name, seed=0):
    att, pos, hk = CONFIGS[name]
    torch.manual_seed(seed)
    m = MultiHeadAttention(16, 4, num_kv_heads=hk, attention=att, position=pos, dtype=F64).eval()
    if pos is not None:  # learned position tables start small; make them matter
        with torch.no_grad():
            for p in m.pos.parameters():
                p.normal_(0, 0.5)
    return m


def _chunks(n, sizes):
    out, i, j = [], 0, 0
    while i < n:
        c = min(sizes[j % len(sizes)], n - i)
        out.append((i, i + c))
        i, j = i + c, j + 1
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=6, deadline=None, derandomize=True)
@given(n=st.integers(1, 13), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_chunked_decoding_equals_full_pass(name, n, sizes, seed):
    m = _module(name)
    x = torch.randn(2, n, 16, dtype=F64, generator=torch.Generator().manual_seed(seed))
    want = mha_reference(m, x)
    assert_close(m(x), want, msg=f"{name} full pass")
    for chunking in ([(i, i + 1) for i in range(n)], _chunks(n, sizes)):
        cache = m.make_cache(2, 16)
        parts = [m(x[:, a:b], cache=cache) for a, b in chunking]
        assert cache.length == n
        assert_close(torch.cat(parts, dim=1), want, msg=f"{name} chunks {chunking}")


def test_make_cache_kinds():
    assert isinstance(_module("causal").make_cache(1, 8), KVCache)
    assert isinstance(_module("window").make_cache(1, 8), SlidingWindowCache)
    assert _module("window").make_cache(1, 8).window == 3
    assert isinstance(_module("window").make_cache(1, 2), KVCache)  # window >= max_len: plain cache
    assert isinstance(_module("linear").make_cache(1, 8), RecurrentState)
    assert isinstance(_module("performer").make_cache(1, 8), RecurrentState)
    assert isinstance(_module("xl").make_cache(1, 8), SegmentMemory)


def test_sliding_window_cache_with_a_plain_kv_cache_too():
    m = _module("window")
    x = torch.randn(1, 9, 16, dtype=F64)
    cache = KVCache(1, 9, 4, 4, F64)
    out = torch.cat([m(x[:, i:i + 1], cache=cache) for i in range(9)], dim=1)
    assert_close(out, m(x))


def test_sliding_window_ring_keeps_last_window_in_order():
    c = SlidingWindowCache(1, 3, 1, 1, F64)
    for t in range(5):
        k, _, valid = c.update(torch.full((1, 1, 1, 1), float(t), dtype=F64), torch.zeros(1, 1, 1, 1, dtype=F64))
        assert valid is None
        assert k.flatten().tolist() == [float(s) for s in range(max(0, t - 3), t + 1)]
    k, _, _ = c.update(torch.tensor([5.0, 6.0], dtype=F64).view(1, 1, 2, 1), torch.zeros(1, 1, 2, 1, dtype=F64))
    assert k.flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert sorted(c.k.flatten().tolist()) == [4.0, 5.0, 6.0] and c.length == 7


def test_window_cache_too_small_for_the_mask_raises():
    m = _module("window")  # sliding_window(3)
    with pytest.raises(ValueError, match="window=2"):
        m(torch.randn(1, 1, 16, dtype=F64), cache=SlidingWindowCache(1, 2, 4, 4, F64))
    full = MultiHeadAttention(16, 4, attention=CAUSAL, dtype=F64)
    with pytest.raises(ValueError, match="unboundedly far"):
        full(torch.randn(1, 1, 16, dtype=F64), cache=SlidingWindowCache(1, 8, 4, 4, F64))


def test_full_kv_cache_raises_naming_max_len_and_writes_nothing():
    m = _module("causal")
    cache = m.make_cache(1, 4)
    m(torch.randn(1, 3, 16, dtype=F64), cache=cache)
    before = cache.k.clone()
    with pytest.raises(ValueError, match="max_len=4"):
        m(torch.randn(1, 2, 16, dtype=F64), cache=cache)
    assert cache.length == 3 and torch.equal(cache.k, before)
    m(torch.randn(1, 1, 16, dtype=F64), cache=cache)  # exactly fills it
    with pytest.raises(ValueError, match="max_len=4"):
        m(torch.randn(1, 1, 16, dtype=F64), cache=cache)
    cache.reset()
    assert cache.length == 0


def test_kv_cache_checks_shapes_batch_dtype():
    c = KVCache(2, 8, 2, 4, F64)
    with pytest.raises(ValueError, match="max_batch=2"):
        c.update(torch.zeros(3, 2, 1, 4, dtype=F64), torch.zeros(3, 2, 1, 4, dtype=F64))
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        c.update(torch.zeros(1, 3, 1, 4, dtype=F64), torch.zeros(1, 3, 1, 4, dtype=F64))
    with pytest.raises(TypeError, match="floating point"):
        c.update(torch.zeros(1, 2, 1, 4, dtype=torch.long), torch.zeros(1, 2, 1, 4, dtype=torch.long))
    k, _, _ = c.update(torch.full((1, 2, 1, 4), 0.5, dtype=torch.bfloat16), torch.zeros(1, 2, 1, 4))  # cast on write
    assert k.dtype == F64 and k[0, 0, 0, 0] == 0.5
    c.reset()
    c.update(torch.zeros(1, 2, 1, 4, dtype=F64), torch.zeros(1, 2, 1, 4, dtype=F64))
    with pytest.raises(ValueError, match="differs from the batch 1"):
        c.update(torch.zeros(2, 2, 1, 4, dtype=F64), torch.zeros(2, 2, 1, 4, dtype=F64))
    with pytest.raises(ValueError, match="max_len must be an int"):
        KVCache(1, 0, 1, 1)


@pytest.mark.parametrize("name", ["causal", "window", "rope", "alibi", "linear", "performer"])
def test_cached_decoding_with_key_padding_equals_full_pass(name):
    m = _module(name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 16, dtype=F64, generator=g)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, :2] = True  # left-padded prompt
    pad[1, 4] = True
    want = mha_reference(m, x, pad)
    assert_close(m(x, key_padding_mask=pad), want)
    cache = m.make_cache(2, 8)
    parts = [m(x[:, a:b], key_padding_mask=pad[:, a:b], cache=cache) for a, b in [(0, 3), (3, 4), (4, 7)]]
    assert_close(torch.cat(parts, dim=1), want)


@pytest.mark.parametrize("chunking", [[(0, 7), (7, 8), (8, 9), (9, 10)], [(0, 5), (5, 10)], [(0, 4), (4, 10)]],
                         ids=["prefill7_steps", "two_long_chunks", "short_then_long"])
def test_window_cache_keeps_the_padding_flags_of_the_newest_tokens(chunking):
    """Chunks longer than the window (3): the ring keeps the last 3 tokens and their flags."""
    m = _module("window")
    assert isinstance(m.make_cache(2, 16), SlidingWindowCache) and m.make_cache(2, 16).window == 3
    x = torch.randn(2, 10, 16, dtype=F64, generator=torch.Generator().manual_seed(4))
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, :3] = True  # left-padded prompt: the first tokens are padding, the window's are real
    pad[1, [4, 6, 9]] = True  # padding inside the window of a long chunk
    want = mha_reference(m, x, pad)
    cache = m.make_cache(2, 16)
    parts = [m(x[:, a:b], key_padding_mask=pad[:, a:b], cache=cache) for a, b in chunking]
    assert_close(torch.cat(parts, dim=1), want)


def test_window_cache_update_returns_the_newest_flags():
    c = SlidingWindowCache(1, 3, 1, 1, F64)
    vals = torch.arange(6, dtype=F64).view(1, 1, 6, 1)
    valid = torch.tensor([[False, False, True, True, False, True]])
    k, _, got = c.update(vals, vals, valid)
    assert torch.equal(got, valid) and k.flatten().tolist() == list(range(6))
    k, _, got = c.update(torch.full((1, 1, 1, 1), 6.0, dtype=F64), torch.zeros(1, 1, 1, 1, dtype=F64))
    assert k.flatten().tolist() == [3.0, 4.0, 5.0, 6.0]
    assert got.tolist() == [[True, False, True, True]]


def test_static_kv_cross_attention_reuses_context():
    m = MultiHeadAttention(16, 4, kdim=6, vdim=5, dtype=F64).eval()
    ctx, val = torch.randn(2, 9, 6, dtype=F64), torch.randn(2, 9, 5, dtype=F64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    x = torch.randn(2, 4, 16, dtype=F64)
    full = m(x, context=ctx, value=val, key_padding_mask=pad)
    cache = StaticKV()
    first = m(x[:, :2], context=ctx, value=val, key_padding_mask=pad, cache=cache)
    assert cache.filled and cache.length == 9
    second = m(x[:, 2:], context=torch.zeros_like(ctx), value=torch.zeros_like(val), cache=cache)
    assert_close(torch.cat([first, second], dim=1), full)


@pytest.mark.parametrize("mem_len, segments", [(3, [5, 2, 4]), (4, [4, 4, 4]), (2, [1, 6, 3])])
def test_xl_memory_keeps_the_newest_tokens(mem_len, segments):
    """Segments longer than the memory: segment s (positions p..p+n-1) attends the last mem_len
    tokens before p and itself, by the reference on the whole sequence with older keys masked."""
    m = _module("xl")
    N = sum(segments)
    x = torch.randn(2, N, 16, dtype=F64, generator=torch.Generator().manual_seed(5))
    mem = SegmentMemory(mem_len)
    p = 0
    for n in segments:
        out = m(x[:, p:p + n], cache=mem)
        old = torch.zeros(2, p + n, dtype=torch.bool)
        old[:, :max(0, p - mem_len)] = True  # keys that have left the memory
        assert_close(out, mha_reference(m, x[:, :p + n], old)[:, p:], msg=f"segment at {p}")
        p += n
        assert mem.length == p and mem.memory[0].shape[2] == min(mem_len, p)


def test_segment_memory_after_keeps_the_last_mem_len():
    mem = SegmentMemory(3)
    k = torch.arange(5, dtype=F64).view(1, 1, 5, 1)
    mem.after(k, -k, 5)
    assert mem.memory[0].flatten().tolist() == [2.0, 3.0, 4.0] and mem.memory[1].flatten().tolist() == [-2.0, -3.0, -4.0]


def test_xl_memory_is_detached_and_bounded():
    m = _module("xl")
    mem = SegmentMemory(3)
    x = torch.randn(1, 5, 16, dtype=F64, requires_grad=True)
    m(x, cache=mem)
    assert mem.memory[0].shape[2] == 3 and not mem.memory[0].requires_grad and mem.length == 5
    y = m(torch.randn(1, 2, 16, dtype=F64), cache=mem)
    y.sum().backward()  # no gradient into the first segment through the memory
    assert x.grad is None


def test_cache_type_errors():
    causal = _module("causal")
    with pytest.raises(TypeError, match="RecurrentState"):
        _module("linear")(torch.randn(1, 2, 16, dtype=F64), cache=KVCache(1, 4, 4, 4, F64))
    with pytest.raises(TypeError, match="got StaticKV for self-attention"):
        causal(torch.randn(1, 2, 16, dtype=F64), cache=StaticKV())
    with pytest.raises(TypeError, match="StaticKV"):
        causal(torch.randn(1, 2, 16, dtype=F64), context=torch.randn(1, 3, 16, dtype=F64), cache=KVCache(1, 4, 4, 4, F64))


@pytest.mark.parametrize("make", [lambda: KVCache(2, 8, 1, 4, F64), lambda: SlidingWindowCache(2, 3, 1, 4, F64)],
                         ids=["kv", "window"])
def test_caches_tag_what_they_return_so_the_nan_rule_needs_no_rescan(make):
    """The NaN rule (attnkit._nonfinite) scans q, k, v once per call; a decoding step would rescan
    the whole cache. Caches check each token on write and tag what they return; the tag dies
    with any in-place edit (the version counter), and a NaN written anywhere is still seen."""
    import attnkit
    from attnkit._nonfinite import tensor_stats

    g = torch.Generator().manual_seed(0)
    cache = make()
    q = torch.randn(2, 1, 1, 4, generator=g, dtype=F64)
    k, v, _ = cache.update(torch.randn(2, 1, 2, 4, generator=g, dtype=F64), torch.randn(2, 1, 2, 4, generator=g, dtype=F64))
    assert k._attnkit_stats[1:] == (True, k.abs().max().item())
    assert tensor_stats(k)[0] == (True, k.abs().max().item())
    # a NaN key in a padded slot is harmless; in a real slot it makes the rows that read it NaN
    bad = torch.randn(2, 1, 1, 4, generator=g, dtype=F64)
    bad[0, 0, 0, 1] = float("nan")
    k, v, valid = cache.update(bad, torch.randn(2, 1, 1, 4, generator=g, dtype=F64),
                               torch.tensor([[False], [True]]))
    assert k._attnkit_stats[1] is False
    out = attnkit.attention(q, k, v, mask=M.key_padding_from_bool(~valid))
    assert torch.isfinite(out).all()
    k, v, valid = cache.update(bad, torch.randn(2, 1, 1, 4, generator=g, dtype=F64), torch.tensor([[True], [True]]))
    out = attnkit.attention(q, k, v, mask=M.key_padding_from_bool(~valid))
    assert out[0].isnan().all() and torch.isfinite(out[1]).all()
    # a tag never outlives an in-place edit of what it describes
    cache.reset()
    k, v, _ = cache.update(torch.randn(2, 1, 2, 4, generator=g, dtype=F64), torch.randn(2, 1, 2, 4, generator=g, dtype=F64))
    k[1, 0, 0, 0] = float("nan")
    assert tensor_stats(k)[0][0] is False
    assert attnkit.attention(q, k, v)[1].isnan().all()


def test_cache_tags_under_inference_mode():
    """Inference tensors have no version counter: decoding under torch.inference_mode must work
    (it raised when tagging), and a NaN written into the cache is still seen on write."""
    import attnkit

    with torch.inference_mode():
        cache = KVCache(1, 4, 1, 4, F64)
        k, v, _ = cache.update(torch.ones(1, 1, 2, 4, dtype=F64), torch.ones(1, 1, 2, 4, dtype=F64))
        q = torch.ones(1, 1, 1, 4, dtype=F64)
        assert torch.isfinite(attnkit.attention(q, k, v)).all()
        bad = torch.ones(1, 1, 1, 4, dtype=F64)
        bad[0, 0, 0, 2] = float("inf")
        k, v, _ = cache.update(torch.ones(1, 1, 1, 4, dtype=F64), bad)
        assert attnkit.attention(q, k, v).isnan().all()
