"""Reference models: logits and greedy generation (cached and recomputed) equal an independent
reference (tests/references.py: every layer by explicit formulas), sampling follows
softmax(logits / temperature) over the top_k tokens, padding is respected, configs mix per-layer
variants and positions."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import masks as M
from attnkit.models import (
    DecoderLM,
    LayerSpec,
    Seq2Seq,
    SequenceClassifier,
    TokenTagger,
    TransformerConfig,
    causal_variant,
)
from attnkit.nn import (
    T5,
    XL,
    Additive,
    Alibi,
    KVCache,
    Linear,
    Linformer,
    Nystrom,
    Performer,
    Rope,
    Shaw,
    SlidingWindowCache,
    Softmax,
)
from tests.references import lm_reference
from tests.tolerances import assert_close

F64 = torch.float64


def _window_with_globals(i):
    return LayerSpec(Softmax(mask=M.sliding_window(3)) if i % 2 == 0 else Softmax(), Rope())


LM_CONFIGS = {
    "softmax_rope": dict(layers=LayerSpec(Softmax(), Rope())),
    "mixed_window_global": dict(layers=_window_with_globals, num_layers=3),
    "alibi_gqa": dict(layers=LayerSpec(Softmax(), Alibi()), num_kv_heads=2),
    "t5_learned_abs": dict(layers=LayerSpec(Softmax(), T5(num_buckets=8, max_distance=16)), abs_position="learned"),
    "shaw_sinusoidal": dict(layers=LayerSpec(Softmax(), Shaw(max_distance=4)), abs_position="sinusoidal"),
    "xl": dict(layers=LayerSpec(Softmax(mask=M.causal()), XL(mem_len=64))),
    "linear_performer_mix": dict(layers=(LayerSpec(Linear(), Rope()), LayerSpec(Performer(num_features=16), None))),
}


def _lm(kw, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{"vocab_size": 11, "d_model": 16, "num_heads": 4, "max_len": 32, **kw})
    model = DecoderLM(cfg).to(F64).eval()
    with torch.no_grad():  # larger embeddings so that greedy choices are far from ties
        model.embed.tok.weight.normal_(0, 1.0)
    return model


def _greedy_reference(model, prompt, steps):
    out = prompt
    for _ in range(steps):
        out = torch.cat([out, lm_reference(model, out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("name", sorted(LM_CONFIGS))
def test_generate_with_cache_equals_recomputation(name):
    model = _lm(LM_CONFIGS[name])
    prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    want = _greedy_reference(model, prompt, 7)
    cached = model.generate(prompt, 7, temperature=0, use_cache=True)
    full = model.generate(prompt, 7, temperature=0, use_cache=False)
    assert cached.shape == (2, 12) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, want) and torch.equal(full, want)
    # the logits themselves: prefill + steps == the reference on the whole sequence
    ref = lm_reference(model, want[:, :11])
    assert_close(model(want[:, :11]), ref)
    caches = model.make_caches(2, 12)
    step_logits = [model(want[:, :5], caches=caches)]
    step_logits += [model(want[:, t:t + 1], caches=caches) for t in range(5, 11)]
    assert_close(torch.cat(step_logits, 1), ref)
    # sampling with the same generator seed picks the same tokens too
    s1 = model.generate(prompt, 4, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    s2 = model.generate(prompt, 4, temperature=0.8, top_k=5, use_cache=False,
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (2.0, None), (1.0, None), (0.7, 4)])
def test_sampling_follows_softmax_of_logits_over_temperature(temperature, top_k):
    """n draws of the first new token: each token's frequency is within 6 standard deviations
    (plus 1/n) of softmax(logits / temperature) restricted to the top_k logits, from the
    reference logits; tokens outside the top k are never drawn."""
    model = _lm(LM_CONFIGS["softmax_rope"])
    with torch.no_grad():  # logits spread over a few units: every token has some probability
        model.embed.tok.weight.mul_(0.2)
    prompt = torch.tensor([[3, 1, 4, 1]])
    with torch.no_grad():
        raw = lm_reference(model, prompt)[0, -1]  # (V,)
    logits = raw / temperature
    if top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    p = torch.softmax(logits, -1)
    n = 20000
    drawn = model.generate(prompt.expand(n, -1), 1, temperature=temperature, top_k=top_k,
                           generator=torch.Generator().manual_seed(0))[:, -1]
    freq = torch.bincount(drawn, minlength=11).double() / n
    bound = 6 * (p * (1 - p) / n).sqrt() + 1.0 / n
    assert bool(((freq - p).abs() <= bound).all()), (freq, p)
    assert bool((freq[p == 0] == 0).all())
    assert float(p.max()) < 1 - 1e-3 and float((p > 1e-3).sum()) >= 3  # not degenerate: the test can fail
    # the scale of the check: a temperature off by a factor 2 moves some token's frequency well past the bound
    for other in (temperature * 2, temperature / 2):
        q = torch.softmax(raw / other, -1)
        if top_k is None:
            assert bool(((q - p).abs() > 2 * bound).any()), other
    assert math.isclose(float(p.sum()), 1.0)


def test_decoder_picks_cache_kinds_per_layer():
    model = _lm(LM_CONFIGS["mixed_window_global"])
    kinds = [type(c) for c in model.make_caches(1, 16)]
    assert kinds == [SlidingWindowCache, KVCache, SlidingWindowCache]


def test_top_k_one_is_greedy_and_arguments_are_checked():
    model = _lm(LM_CONFIGS["softmax_rope"])
    prompt = torch.randint(0, 11, (1, 3))
    assert torch.equal(model.generate(prompt, 4, temperature=1.0, top_k=1), model.generate(prompt, 4, temperature=0))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="max_len=4"):
        caches = model.make_caches(1, 4)
        model(torch.randint(0, 11, (1, 5)), caches=caches)


@pytest.mark.parametrize("cross", [Softmax(), Additive(attn_dim=8)])
def test_seq2seq_cross_attention_ignores_padded_source_tokens(cross):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=13, d_model=16, num_heads=2, num_layers=2, cross_attention=cross,
                            abs_position="learned", max_len=16)
    model = Seq2Seq(cfg).to(F64).eval()
    g = torch.Generator().manual_seed(2)
    src = torch.randint(0, 13, (3, 7), generator=g)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    tgt = torch.randint(0, 13, (3, 5), generator=g)
    out = model(src, tgt, src_padding_mask=pad)
    src2 = torch.where(pad, torch.randint(0, 13, (3, 7), generator=g), src)
    assert not torch.equal(src, src2)
    torch.testing.assert_close(model(src2, tgt, src_padding_mask=pad), out, atol=1e-12, rtol=0)
    # ... while a real source token does matter
    src3 = src.clone()
    src3[1, 0] = (src[1, 0] + 1) % 13
    assert not torch.allclose(model(src3, tgt, src_padding_mask=pad)[1], out[1])
    # without the padding mask the padded tokens do change the output (the test can fail)
    assert not torch.allclose(model(src2, tgt), model(src, tgt))
    # cached greedy decoding equals recomputation
    a = model.generate(src, 6, bos_id=1, src_padding_mask=pad)
    b = model.generate(src, 6, bos_id=1, src_padding_mask=pad, use_cache=False)
    assert torch.equal(a, b)


def test_encoder_heads_and_padding():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=9, d_model=16, num_heads=2, abs_position="learned", max_len=8,
                            layers=(LayerSpec(Nystrom(num_landmarks=2)), LayerSpec(Linformer(max_len=8, proj_dim=4))))
    clf = SequenceClassifier(cfg, 3).to(F64).eval()
    tag = TokenTagger(cfg, 5).to(F64).eval()
    x = torch.randint(0, 9, (2, 6))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    assert clf(x, padding_mask=pad).shape == (2, 3) and tag(x, padding_mask=pad).shape == (2, 6, 5)
    x2 = torch.where(pad, (x + 1) % 9, x)
    torch.testing.assert_close(clf(x2, padding_mask=pad), clf(x, padding_mask=pad), atol=1e-12, rtol=0)


def test_config_per_layer_choice_and_errors():
    cfg = TransformerConfig(vocab_size=5, num_layers=3, layers=_window_with_globals)
    assert cfg.layer(0).attention.mask is not None and cfg.layer(1).attention == Softmax()
    assert cfg.decoder_layer(1).attention.causal and not cfg.layer(1).attention.causal
    assert repr(cfg.decoder_layer(0).attention.mask) == "sliding_window(3, 0)"  # already causal: not wrapped
    with pytest.raises(ValueError, match="num_layers=3"):
        TransformerConfig(vocab_size=5, num_layers=3, layers=(LayerSpec(), LayerSpec()))
    with pytest.raises(ValueError, match="never forms"):
        TransformerConfig(vocab_size=5, layers=LayerSpec(Linear(), Alibi()))
    with pytest.raises(TypeError, match="LayerSpec"):
        TransformerConfig(vocab_size=5, layers=lambda i: Softmax())
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(vocab_size=5, d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="cannot be a decoder"):
        DecoderLM(TransformerConfig(vocab_size=5, layers=LayerSpec(Linformer(max_len=8))))
    assert causal_variant(Linear()).causal and causal_variant(Performer()).causal
    assert causal_variant(Additive()).mask is not None


def _tiny_lm(**kw):
    torch.manual_seed(0)
    return DecoderLM(TransformerConfig(vocab_size=11, d_model=16, num_heads=2, num_layers=1, max_len=32, **kw)).eval()


@pytest.mark.parametrize("tokens", [[[1, 11]], [[1, -1]], [[99]]])
def test_token_ids_outside_the_vocabulary_are_named(tokens):
    """Used to be an IndexError from the embedding ("index out of range in self")."""
    with pytest.raises(ValueError, match=r"tokens holds token id -?\d+, outside the vocabulary \[0, 11\)"):
        _tiny_lm()(torch.tensor(tokens))


@pytest.mark.parametrize("kw, match", [
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0 \(0 = greedy\), got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"temperature": "1"}, "temperature must be a finite number >= 0"),
    ({"top_k": True}, "top_k must be None or an int >= 1, got True"),
])
def test_generate_checks_its_arguments_before_any_work(kw, match):
    lm = _tiny_lm()
    with pytest.raises(ValueError, match=match):
        lm.generate(torch.tensor([[1, 2]]), 3, **kw)
    with pytest.raises(ValueError, match=match):
        Seq2Seq(lm.cfg).generate(torch.tensor([[1, 2]]), 3, bos_id=1, **kw)


def test_generate_defaults_are_greedy_for_both_models():
    """DecoderLM.generate sampled by default (temperature 1.0) while Seq2Seq.generate was greedy."""
    import inspect

    lm = _tiny_lm()
    for fn in (DecoderLM.generate, Seq2Seq.generate):
        assert inspect.signature(fn).parameters["temperature"].default == 0.0
        assert inspect.signature(fn).parameters["temperature"].kind is inspect.Parameter.KEYWORD_ONLY
    p = torch.tensor([[1, 2, 3]])
    assert torch.equal(lm.generate(p, 5), lm.generate(p, 5, temperature=0))
    s2s = Seq2Seq(lm.cfg).eval()
    assert torch.equal(s2s.generate(p, 4, bos_id=1), s2s.generate(p, 4, bos_id=1, temperature=0))


def test_seq2seq_errors_name_the_argument():
    s2s = Seq2Seq(TransformerConfig(vocab_size=11, d_model=16, num_heads=2, num_layers=1)).eval()
    src = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"bos_id must be a token id in \[0, 11\) \(vocab_size=11\), got 99"):
        s2s.generate(src, 3, bos_id=99)  # was an IndexError
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        s2s.generate(src, -1, bos_id=1)
    with pytest.raises(ValueError, match=r"src and tgt must have the same batch size: .* has batch 1, tgt \(2, 2\) has batch 2"):
        s2s(src, torch.tensor([[1, 2], [3, 4]]))  # was reported as a "context" shape error


def test_generate_under_cpu_autocast_just_works():
    """Under torch.autocast("cpu", bfloat16) the float32 caches received bf16 keys: TypeError."""
    lm = _tiny_lm(layers=LayerSpec(Softmax(), Rope()))
    p = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.autocast("cpu", torch.bfloat16):
        cached = lm.generate(p, 6)
        full = lm.generate(p, 6, use_cache=False)
    assert cached.shape == (2, 9) and torch.equal(cached, full)
