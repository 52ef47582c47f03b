"""The sdpa backend, and the reference, against torch.nn.functional.scaled_dot_product_attention.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.

torch's result is compared only where it is defined (no fully masked rows). torch's is_causal is
top-left aligned, ours bottom-right: they agree for Nq == Nk; for Nq != Nk torch gets an explicit
bottom-right bool mask (tril with diagonal Nk - Nq).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit.backends import BACKENDS
from attnkit.backends import sdpa as sdpa_mod
from attnkit.functional import make_call
from tests.strategies import Shape, bool_masks, make_qkv, shapes
from tests.tolerances import tol


def torch_sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


@pytest.mark.parametrize("name", ["reference", "sdpa"])
@settings(max_examples=30, deadline=None, derandomize=True)
@given(shapes(), st.data())
def test_matches_torch_sdpa_float32(name, shape, data):
    B, Hq, _, Nq, Nk = shape[:5]
    q, k, v = make_qkv(shape, dtype=torch.float32, seed=data.draw(st.integers(0, 99)), requires_grad=False)
    kind = data.draw(st.sampled_from(["none", "causal", "bool", "bias", "bias_and_bool"]))
    if kind == "causal" and Nq > Nk:
        kind = "none"  # bottom-right causal leaves rows without keys: torch's result is not defined there
    scale = data.draw(st.sampled_from([None, 0.3]))
    ours, theirs = {"scale": scale}, {"scale": scale}
    if kind == "causal":
        ours["mask"] = M.causal()
        if Nq == Nk:
            theirs["is_causal"] = True
        else:
            theirs["attn_mask"] = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    if kind in ("bool", "bias_and_bool"):
        ours["mask"] = theirs["attn_mask"] = data.draw(bool_masks(shape, allow_empty_rows=False))
    if kind in ("bias", "bias_and_bool"):
        bias = torch.randn(B, 1, Nq, Nk)
        ours["bias"] = bias
        if kind == "bias_and_bool":
            theirs["attn_mask"] = bias.masked_fill(~theirs["attn_mask"], float("-inf"))
        else:
            theirs["attn_mask"] = bias
    out = attnkit.attention(q, k, v, backend=name, **ours)
    torch.testing.assert_close(out, torch_sdpa(q, k, v, **theirs), **tol(torch.float32, name))


def test_sdpa_gradients_match_torch_float32():
    q, k, v = make_qkv(Shape(2, 4, 2, 5, 7, 3, 4), dtype=torch.float32)
    bias = torch.randn(1, 4, 5, 7, requires_grad=True)
    out = attnkit.attention(q, k, v, bias=bias, mask=M.causal(), backend="sdpa")
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, [q, k, v, bias], g)
    causal = torch.ones(5, 7, dtype=torch.bool).tril(2)
    want = torch_sdpa(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf")))
    theirs = torch.autograd.grad(want, [q, k, v, bias], g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol(torch.float32, "sdpa", grad=True))


def record_sdpa_calls(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(sdpa_mod.F, "scaled_dot_product_attention", spy)
    return seen


def test_is_causal_only_for_square_plain_causal(monkeypatch):
    seen = record_sdpa_calls(monkeypatch)
    for nq, nk in ((4, 4), (2, 4)):
        q, k, v = make_qkv(Shape(1, 1, 1, nq, nk, 2, 2), requires_grad=False)
        attnkit.attention(q, k, v, mask=M.causal(), backend="sdpa")
    assert seen[0]["is_causal"] and seen[0]["attn_mask"] is None
    assert not seen[1]["is_causal"]
    assert torch.equal(seen[1]["attn_mask"].expand(1, 1, 2, 4)[0, 0], torch.ones(2, 4, dtype=torch.bool).tril(2))


@pytest.mark.parametrize("kw, reason", [
    ({"softcap": 2.0}, "sdpa has no softcap"),
    ({"dropout_p": 0.1}, "dropout pattern is not reproducible"),
    ({"return_weights": True}, "sdpa does not return attention weights"),
    ({"mask": M.causal()}, "the mask has fully masked query rows"),  # Nq=5 > Nk=3
    ({"mask": M.key_padding(torch.tensor([3, 0]))}, "the mask has fully masked query rows"),
    ({"mask": torch.zeros(5, 3, dtype=torch.bool)}, "the mask has fully masked query rows"),
    ({"bias": torch.full((5, 3), float("-inf"))}, "the bias has infinite entries"),
])
def test_sdpa_refuses_what_it_cannot_do_exactly(kw, reason):
    q, k, v = make_qkv(Shape(2, 2, 1, 5, 3, 2, 2), dtype=torch.float32, requires_grad=False)
    reasons = BACKENDS["sdpa"].not_supported_reasons(make_call(q, k, v, **kw))
    assert any(reason in r for r in reasons), reasons
    assert attnkit.which_backend(q, k, v, **kw) != "sdpa"


def test_sdpa_refuses_huge_dense_masks(monkeypatch):
    monkeypatch.setattr(sdpa_mod, "MAX_DENSE_ELEMENTS", 10)
    q, k, v = make_qkv(Shape(1, 1, 1, 4, 4, 2, 2), requires_grad=False)
    assert BACKENDS["sdpa"].not_supported_reasons(make_call(q, k, v, mask=M.causal())) == []  # is_causal
    reasons = BACKENDS["sdpa"].not_supported_reasons(make_call(q, k, v, mask=M.sliding_window(1)))
    assert reasons and "1x1x4x4 elements" in reasons[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_sdpa_runs_plain_calls_in_every_dtype(dtype, monkeypatch):
    """sdpa accepts these calls in every dtype, really calls torch's sdpa, returns the input dtype
    and matches the float64 reference within the dtype's tolerance."""
    seen = record_sdpa_calls(monkeypatch)
    q, k, v = make_qkv(Shape(2, 4, 2, 5, 6, 4, 3), dtype=dtype, requires_grad=False)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    for kw in ({}, {"mask": M.causal()}, {"mask": M.sliding_window(2) | M.global_tokens(torch.tensor([0]))}):
        assert BACKENDS["sdpa"].not_supported_reasons(make_call(q, k, v, **kw)) == [], kw
        calls = len(seen)
        out = attnkit.attention(q, k, v, backend="sdpa", **kw)
        assert len(seen) == calls + 1, kw
        assert out.dtype == dtype and out.shape == (2, 4, 5, 3)
        ref = attnkit.attention(q64, k64, v64, backend="reference", **kw)
        torch.testing.assert_close(out.double(), ref, **tol(dtype, "sdpa"), msg=lambda m, kw=kw: f"{kw}: {m}")
