"""attnkit as a transformers attention backend: same numbers as HF's own sdpa / eager paths.

Tiny random models from config (hidden 64, 2 layers, 4 heads, 2 kv heads; sliding window 4 so
that 12-token prompts cross it), batches left-padded by 0, 4 and 7 tokens. The reference is
``sdpa``, or ``eager`` for Gemma 2 (sdpa refuses softcap). Tolerances are the issue's acceptance
bounds: fp32 logits 1e-5 (about 100 u of float32 on logits of size ~1), fp64 attention outputs
1e-12 and fp64 training 1e-10 (both within float64's table entry, attnkit.tolerances).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
import transformers.masking_utils as MU  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import attnkit  # noqa: E402
import attnkit.integrations.transformers as akt  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

MODELS = ("llama", "mistral", "qwen2", "gemma2", "gemma3")
W = 4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    akt.register()


def config(name: str, **over):
    T = transformers
    if name == "llama":
        return T.LlamaConfig(**COMMON, **over)
    if name == "mistral":  # every layer slides
        return T.MistralConfig(**COMMON, sliding_window=W, **over)
    if name == "qwen2":  # layer 0 full, layer 1 sliding
        return T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=W, max_window_layers=1, **over)
    if name == "gemma2":  # softcap 2 so that tanh bends the tiny model's scores
        over = {"attn_logit_softcapping": 2.0, **over}
        return T.Gemma2Config(**COMMON, head_dim=16, sliding_window=W, **over)
    if name == "gemma3":  # alternating sliding / full layers
        return T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=W,
                                  layer_types=["sliding_attention", "full_attention"], **over)
    raise ValueError(name)


def reference(name: str) -> str:
    return "eager" if name == "gemma2" else "sdpa"


def build(name: str, dtype=torch.float32, impl: str = "attnkit", **over):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(name, **over), attn_implementation=impl)
    return model.to(dtype).eval()


def padded_batch(n: int = 12, pads=(0, 4, 7)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (len(pads), n), generator=g)
    am = torch.ones(len(pads), n, dtype=torch.long)
    for b, p in enumerate(pads):
        am[b, :p] = 0
        ids[b, :p] = 0
    return ids, am


def logits(model, impl, *args, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(*args, **kwargs).logits


# -- registration and imports ------------------------------------------------------------------


def test_importing_attnkit_does_not_import_transformers():
    code = ("import sys, attnkit, attnkit.integrations, attnkit.nn, attnkit.models; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    env = dict(os.environ, PYTHONPATH=str(Path(akt.__file__).parents[2]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_register_registers_both_interfaces_idempotently():
    akt.register()
    akt.register()
    assert AttentionInterface._global_mapping["attnkit"] is akt.attention_forward
    assert MU.AttentionMaskInterface._global_mapping["attnkit"] is akt.mask_spec


def test_without_the_mask_function_padding_is_silently_ignored():
    # What register() prevents: an attention function registered alone gets attention_mask=None.
    seen = []

    def attention_only(module, q, k, v, attention_mask, **kw):
        seen.append(attention_mask)
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register("attnkit_test_attention_only", attention_only)
    model = build("llama")
    ids, am = padded_batch()
    alone = logits(model, "attnkit_test_attention_only", ids, attention_mask=am)
    assert seen and all(m is None for m in seen)
    row = ids[1:2, 4:]  # the second row's real tokens, unpadded
    truth = logits(model, "sdpa", row)
    assert (alone[1, 4:] - truth[0]).abs().max() > 1e-3  # the pad tokens were attended
    assert (logits(model, "attnkit", ids, attention_mask=am)[1, 4:] - truth[0]).abs().max() <= 1e-5
    # attnkit's own attention function refuses to run unmasked under a name with no mask function.
    AttentionInterface.register("attnkit_test_attention_only", akt.attention_forward)
    with pytest.raises(ValueError, match="no registered mask function.*register\\(\\)"):
        logits(model, "attnkit_test_attention_only", ids, attention_mask=am)


# -- the model's numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_reference_on_real_tokens(name):
    model = build(name)
    ids, am = padded_batch()
    want = logits(model, reference(name), ids, attention_mask=am)
    got = logits(model, "attnkit", ids, attention_mask=am)
    real = am.bool()
    assert got.isfinite().all()
    assert (got - want)[real].abs().max() <= 1e-5


def test_softcap_reaches_attnkit():
    ids, am = padded_batch()
    capped = logits(build("gemma2"), "attnkit", ids, attention_mask=am)
    uncapped = logits(build("gemma2", attn_logit_softcapping=None), "attnkit", ids, attention_mask=am)
    assert (capped - uncapped)[am.bool()].abs().max() > 1e-3


@contextlib.contextmanager
def eager_in_float64(name: str):
    """HF's eager path computes softmax with dtype=float32, which also *down*casts float64 inputs
    (about 1e-7 error, and NaN on fully padded rows where -finfo(float64).max becomes -inf). For the
    float64 comparisons against eager (Gemma 2) the softmax keeps float64; nothing else changes."""
    if reference(name) != "eager":
        yield
        return
    softmax = torch.nn.functional.softmax

    def keep_float64(x, dim=None, dtype=None, **kw):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw)

    torch.nn.functional.softmax = keep_float64
    try:
        yield
    finally:
        torch.nn.functional.softmax = softmax


@contextlib.contextmanager
def recording():
    """Run a model under 'attnkit_test_record': attnkit, with every mask and attention call kept."""
    calls, made = [], []

    def mask_fn(**kw):
        hm = akt.mask_spec(**kw)
        if not any(h is hm for h, _ in made):  # (a static cache's q_offset is a tensor it mutates: copy)
            made.append((hm, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}))
        return hm

    def attn_fn(module, q, k, v, attention_mask, **kw):
        calls.append((module, q.detach().clone(), k.detach().clone(), v.detach().clone(), attention_mask, kw))
        return akt.attention_forward(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register("attnkit_test_record", attn_fn)
    MU.AttentionMaskInterface.register("attnkit_test_record", mask_fn)
    yield calls, made


def check_calls_against_hf(name, calls, made, tol):
    """Each recorded call: attnkit vs HF's own attention function and mask on the same q, k, v."""
    eager = reference(name) == "eager"
    assert calls
    for module, q, k, v, hm, kw in calls:
        mask_kw = next(m for h, m in made if h is hm)
        if eager:
            ref_fn = sys.modules[type(module).__module__].eager_attention_forward
            ref_mask = MU.eager_mask(**mask_kw)
        else:
            ref_fn, ref_mask = sdpa_attention_forward, MU.sdpa_mask(**mask_kw)
        with eager_in_float64(name):
            want, _ = ref_fn(module, q, k, v, ref_mask, **kw)   # (B, Nq, Hq, D)
        got, _ = akt.attention_forward(module, q, k, v, hm, **kw)
        am, q0, nq = mask_kw.get("attention_mask"), int(mask_kw["q_offset"]), q.shape[2]
        real = torch.ones(q.shape[0], nq, dtype=torch.bool) if am is None else am[:, q0:q0 + nq].bool()
        assert got.isfinite().all()
        assert (got - want)[real].abs().max() <= tol, (name, tuple(q.shape), tuple(k.shape), hm)


@pytest.mark.parametrize("name", MODELS)
def test_float64_attention_outputs_match_on_every_call(name):
    # Prefill of a padded batch, then decode steps with a dynamic and a static cache: each
    # attention call (Nq = 1, static-cache prefill with Nk > Nq, cropped sliding caches) is
    # compared with HF's attention function on the very same inputs.
    model = build(name, torch.float64)
    ids, am = padded_batch()
    with recording() as (calls, made):
        logits(model, "attnkit_test_record", ids, attention_mask=am)
        for cache in ("dynamic", "static"):
            model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False, cache_implementation=cache,
                           pad_token_id=0)
    assert all(c[2].shape[1] == 2 and c[1].shape[1] == 4 for c in calls)  # k, v reach attnkit un-repeated (GQA)
    assert any(c[1].shape[2] == 1 for c in calls)  # decode steps
    if name != "mistral":  # a static-cache prefill (Mistral's sliding-only static cache holds 12 = Nq keys)
        assert any(c[2].shape[2] > c[1].shape[2] > 1 for c in calls)
    check_calls_against_hf(name, calls, made, tol=1e-12)


@pytest.mark.parametrize("cache", ("dynamic", "static"))
@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_gives_identical_tokens(name, cache):
    model = build(name)
    ids, am = padded_batch()
    out = {}
    for impl in (reference(name), "attnkit"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False,
                                   cache_implementation=cache, pad_token_id=0)
    assert torch.equal(out["attnkit"], out[reference(name)])


@pytest.mark.parametrize("name", MODELS)
def test_training_step_gives_the_same_loss_and_gradients(name):
    model = build(name, torch.float64).train()
    ids, am = padded_batch()
    # Logits at position t predict token t + 1: the last pad position would predict the first real
    # token, from a fully masked row (zeros in attnkit and sdpa, uniform weights in eager). No label there.
    follows_pad = torch.nn.functional.pad(am[:, :-1] == 0, (1, 0), value=False)
    labels = ids.masked_fill((am == 0) | follows_pad, -100)
    res = {}
    for impl in (reference(name), "attnkit"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        with eager_in_float64(name) if impl == "eager" else contextlib.nullcontext():
            out = model(ids, attention_mask=am, labels=labels)
            out.loss.backward()
        res[impl] = out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (l_ref, g_ref), (l_ak, g_ak) = res[reference(name)], res["attnkit"]
    assert abs(l_ref - l_ak) <= 1e-10
    for n in g_ref:
        assert (g_ref[n] - g_ak[n]).abs().max() <= 1e-10, n


@pytest.mark.parametrize("name", MODELS)
def test_packed_sequences_equal_separate_runs(name):
    model = build(name)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(1, 128, (1, 5), generator=g), torch.randint(1, 128, (1, 7), generator=g)
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).view(1, -1)
    got = logits(model, "attnkit", packed, position_ids=pos, use_cache=False)
    want = torch.cat([logits(model, "attnkit", a, use_cache=False), logits(model, "attnkit", b, use_cache=False)], 1)
    assert (got - want).abs().max() <= 1e-5
    assert (got - logits(model, reference(name), packed, position_ids=pos, use_cache=False)).abs().max() <= 1e-5


def test_output_attentions_returns_eager_weights():
    model = build("mistral")
    ids, am = padded_batch()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(ids, attention_mask=am, output_attentions=True).attentions
        model.set_attn_implementation("attnkit")
        got = model(ids, attention_mask=am, output_attentions=True).attentions
    real = am.bool()
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape  # (B, Hq, Nq, Nk)
        assert_close(g.transpose(1, 2)[real], w.transpose(1, 2)[real], dtype=torch.float32)


def test_dropout_is_applied_in_training_only():
    model = build("llama", attention_dropout=0.3)
    ids, am = padded_batch()
    real = am.bool()
    model.set_attn_implementation("attnkit")
    model.train()
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)  # attnkit's dropout seed is drawn from torch's generator
        with torch.no_grad():
            runs.append(model(ids, attention_mask=am).logits)
    model.eval()
    plain = logits(model, "attnkit", ids, attention_mask=am)
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - runs[2])[real].abs().max() > 1e-3 and (runs[0] - plain)[real].abs().max() > 1e-3
    assert (plain - logits(model, "sdpa", ids, attention_mask=am))[real].abs().max() <= 1e-5


# -- the attention function on its own ---------------------------------------------------------


def attention_module(name="llama"):
    return build(name).model.layers[0].self_attn


def qkv(nq, nk, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, nq, 16, generator=g), torch.randn(B, 2, nk, 16, generator=g),
            torch.randn(B, 2, nk, 16, generator=g))


@pytest.mark.parametrize("nq,nk,is_causal", [(6, 6, None), (1, 9, None), (4, 9, None), (5, 5, False)])
def test_no_mask_means_what_sdpa_means(nq, nk, is_causal):
    # A module called on its own: is_causal (kwarg or module.is_causal) as in HF's sdpa path,
    # including its crop of an empty static cache (Nk > Nq > 1).
    module = attention_module()
    q, k, v = qkv(nq, nk)
    got, _ = akt.attention_forward(module, q, k, v, None, scaling=0.25, is_causal=is_causal)
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=is_causal)
    assert_close(got, want, dtype=torch.float32)


def test_prepared_4d_masks_are_used_as_given():
    module = attention_module()
    q, k, v = qkv(5, 7)
    allowed = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(3)) < 0.6
    allowed[..., 0] = True  # no fully masked row (sdpa gives NaN there)
    additive = torch.zeros(2, 1, 5, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    want, _ = sdpa_attention_forward(module, q, k, v, allowed, scaling=0.25)
    for m in (allowed, additive):
        got, _ = akt.attention_forward(module, q, k, v, m, scaling=0.25)
        assert_close(got, want, dtype=torch.float32)


def test_bad_calls_are_refused_with_clear_errors():
    module = attention_module()
    q, k, v = qkv(3, 5)
    hm = akt.mask_spec(batch_size=2, q_length=3, kv_length=6, q_offset=3, mask_function=MU.causal_mask_function)
    with pytest.raises(ValueError, match=r"mask is for \(Nq, Nk\) = \(3, 6\) but the layer got query \(2, 4, 3, 16\)"):
        akt.attention_forward(module, q, k, v, hm)
    with pytest.raises(ValueError, match="attention sinks"):
        akt.attention_forward(module, q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="HFMask, None or a 4-D tensor"):
        akt.attention_forward(module, q, k, v, torch.ones(2, 5))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(2, 9), st.integers(0, 6), st.integers(0, 4), st.sampled_from((None, 1, 3, 6)),
       st.data())
def test_left_padded_rows_without_their_padding_equal_the_masked_call(B, nq, past, extra, window, data):
    # Prefill / chunked prefill over a static cache with left padding: the per-row unpadded path
    # equals one masked call (fp64, every row; rows that see only padding give zeros in both).
    nk = past + nq + extra
    pads = [data.draw(st.integers(0, past + nq)) for _ in range(B)]
    am = torch.stack([(torch.arange(nk) >= p).long() for p in pads])
    fn = MU.causal_mask_function if window is None else MU.sliding_window_causal_mask_function(window)
    hm = akt.mask_spec(batch_size=B, q_length=nq, kv_length=nk, q_offset=past, mask_function=fn, attention_mask=am)
    q, k, v = (t.double() for t in qkv(nq, nk, B=B, seed=nq + nk))
    got, _ = akt.attention_forward(None, q, k, v, hm, scaling=0.3)
    assert hm.left_pad is not None or not any(pads[:B])
    want = attnkit.attention(q, k[:, :, :hm.keep], v[:, :, :hm.keep], mask=hm.mask, scale=0.3, backend="reference")
    assert_close(got, want.transpose(1, 2))
