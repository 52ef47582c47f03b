"""attnkit.attention: every registered backend against the float64 reference, dropout, weights, dispatch.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.

The cross-backend tests iterate over ``attnkit.backends.BACKENDS`` so that a backend registered
later is covered without editing this file. A call a backend reports it cannot run is skipped
with its reasons shown (deterministic cases) or checked to raise those reasons when the backend
is named (hypothesis cases); EXPECTED_SUPPORT pins the cases reference and sdpa must run, so a
wrong reason cannot hide a failure.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import biases as Bi
from attnkit import masks as M
from attnkit._hash import dropout_keep
from attnkit.backends import BACKENDS
from attnkit.dispatch import NoBackendError
from attnkit.functional import make_call
from tests.strategies import Shape, bool_masks, make_qkv, mask_specs, positions, shapes
from tests.tolerances import tol

NAMES = sorted(BACKENDS)
# Every flex case compiles and runs: no refusal at torch.compile's recompile limit (conftest).
pytestmark = pytest.mark.usefixtures("flex_compile_budget")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def slope_bias(hq: int, seed: int = 0):
    """A learnable bias spec (ALiBi-like, per-head slopes), returned with its leaf tensor."""
    slopes = torch.rand(hq, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()
    spec = Bi.from_function(lambda b, h, q, k: -slopes[h] * (q - k).abs().to(slopes.dtype), tensors=[slopes],
                            name="slopes")
    return spec, slopes


def forward_backward(q, k, v, leaves, *, backend, seed=0, **kw):
    """Output and grads of <out, g> w.r.t. q, k, v and the bias leaves (None if unused)."""
    out = attnkit.attention(q, k, v, backend=backend, **kw)
    if isinstance(out, tuple):
        out = out[0]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad(out, [q, k, v, *leaves], g.to(out.dtype), allow_unused=True)
    return out, grads


def empty_rows(q, k, v, mask) -> torch.Tensor:
    """(B, Hq, Nq) bool: query rows with no allowed key."""
    call = make_call(q, k, v, mask=mask)
    B, Hq, _, Nq, Nk, _ = call.shape
    if call.mask is None:
        return torch.zeros(B, Hq, Nq, dtype=torch.bool)
    return ~call.mask.to_dense(Nq, Nk, batch=B, heads=Hq).any(-1)


def check_against_reference(name, q, k, v, leaves, *, dtype=torch.float64, **kw):
    """Run backend ``name`` and the float64 reference; compare outputs and all gradients."""
    ref_in = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    out_ref, g_ref = forward_backward(*ref_in, leaves, backend="reference", **kw)
    out, grads = forward_backward(q, k, v, leaves, backend=name, **kw)
    assert out.dtype == q.dtype and out.shape == out_ref.shape
    assert bool(torch.isfinite(out).all()), f"{name}: non-finite output"
    torch.testing.assert_close(out.double(), out_ref, **tol(dtype, name), msg=lambda m: f"{name} output: {m}")
    for label, g, gr in zip(["q", "k", "v"] + [f"bias leaf {i}" for i in range(len(leaves))], grads, g_ref):
        assert (g is None) == (gr is None), f"{name}: grad of {label} missing"
        if g is not None:
            assert bool(torch.isfinite(g).all()), f"{name}: non-finite grad of {label}"
            torch.testing.assert_close(g.double(), gr.double(), **tol(dtype, name, grad=True),
                                       msg=lambda m, label=label: f"{name} grad {label}: {m}")
    # Fully masked rows: zeros and zero gradient, exactly.
    rows = empty_rows(q, k, v, kw.get("mask"))
    if rows.any():
        assert bool((out[rows] == 0).all()), f"{name}: fully masked rows are not zero"
        assert bool((grads[0][rows] == 0).all()), f"{name}: fully masked rows get a q gradient"
    return out, out_ref


def _detached(kw, dtype):
    """kwargs for a forward-only run: bias tensors detached and cast to ``dtype``."""
    out = dict(kw)
    if isinstance(kw.get("bias"), torch.Tensor):
        out["bias"] = kw["bias"].detach().to(dtype)
    return out


def verify_backend(name, q, k, v, *, must_support=False, **kw):
    """Check backend ``name`` on this call against the float64 reference, as far as it can run.

    1. Forward and backward in q's dtype (float64 in most tests), if the backend supports it.
    2. Otherwise forward only (no grad), in float32 for float64 inputs (flex on CPU, for
       example, has no backward and no float64): outputs vs the float64 reference.
    Returns "grad" or "forward", or the list of reasons when neither mode is supported.
    ``must_support`` asserts that mode 1 is supported.
    """
    reasons = BACKENDS[name].not_supported_reasons(make_call(q, k, v, **kw))
    if must_support:
        assert not reasons, f"{name} must support this call, but says: {reasons}"
    if not reasons:
        check_against_reference(name, q, k, v, leaves_of(kw), dtype=q.dtype, **kw)
        return "grad"
    dt = torch.float32 if q.dtype == torch.float64 else q.dtype
    q2, k2, v2 = (t.detach().to(dt) for t in (q, k, v))
    kw2 = _detached(kw, dt)
    with torch.no_grad():
        fwd_reasons = BACKENDS[name].not_supported_reasons(make_call(q2, k2, v2, **kw2))
        if fwd_reasons:
            return reasons + [r for r in fwd_reasons if r not in reasons]
        out = attnkit.attention(q2, k2, v2, backend=name, **kw2)
        ref = attnkit.attention(*(t.detach().double() for t in (q, k, v)), backend="reference",
                                **_detached(kw, torch.float64))
    assert out.dtype == dt and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), ref, **tol(dt, name), msg=lambda m: f"{name} forward-only: {m}")
    rows = empty_rows(q2, k2, v2, kw2.get("mask"))
    assert bool((out[rows] == 0).all()), f"{name}: fully masked rows are not zero"
    return "forward"


def skip_unless_ran(name, what, result):
    if isinstance(result, list):
        assert not any("recompile limit" in r for r in result), f"{name} hit the recompile limit: {result}"
        pytest.skip(f"{name} does not support {what}: {'; '.join(result)}")


# ---------------------------------------------------------------------------------------------
# Deterministic cases: each backend runs them or shows why not; reference and sdpa must run some
# ---------------------------------------------------------------------------------------------


def _pad_lengths(lengths):
    return M.key_padding(torch.tensor(lengths))


CASES = {
    # name: (shape, kwargs builder)
    "dense": (Shape(2, 4, 2, 5, 7, 3, 4), lambda s: {}),
    "causal_square": (Shape(1, 2, 2, 6, 6, 4, 4), lambda s: {"mask": M.causal()}),
    "causal_kv_cache": (Shape(2, 2, 1, 3, 8, 4, 3), lambda s: {"mask": M.causal()}),
    "decode_mqa": (Shape(2, 3, 1, 1, 9, 4, 5), lambda s: {"mask": M.causal()}),
    "bool_mask": (Shape(2, 2, 2, 5, 6, 3, 3), lambda s: {"mask": (torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(1)) < 0.5) | torch.eye(5, 6, dtype=torch.bool)}),
    "bias_tensor": (Shape(2, 2, 1, 4, 5, 3, 2), lambda s: {"bias": torch.randn(1, 2, 4, 5, dtype=torch.float64).requires_grad_()}),
    "bias_spec": (Shape(1, 3, 3, 5, 5, 2, 2), lambda s: {"bias": slope_bias(3)[0]}),
    "window_and_padding": (Shape(2, 2, 2, 7, 7, 3, 3), lambda s: {"mask": M.sliding_window(2) & _pad_lengths([7, 5])}),
    "scale": (Shape(1, 1, 1, 3, 4, 2, 2), lambda s: {"scale": 0.3}),
    "padding_empty_rows": (Shape(2, 2, 1, 4, 5, 3, 3), lambda s: {"mask": _pad_lengths([5, 0])}),
    "causal_nq_gt_nk": (Shape(1, 2, 2, 6, 3, 3, 3), lambda s: {"mask": M.causal()}),
    "softcap": (Shape(1, 2, 1, 4, 4, 3, 3), lambda s: {"softcap": 2.0, "mask": M.causal()}),
    "dropout": (Shape(1, 2, 1, 4, 6, 3, 3), lambda s: {"dropout_p": 0.3, "dropout_seed": 5}),
}
# Cases a backend must support (so that a wrong "not supported" reason cannot hide a failure).
EXPECTED_SUPPORT = {
    "reference": set(CASES),
    "sdpa": {"dense", "causal_square", "causal_kv_cache", "decode_mqa", "bool_mask", "bias_tensor",
             "bias_spec", "window_and_padding", "scale"},
}


def leaves_of(kw):
    bias = kw.get("bias")
    if isinstance(bias, torch.Tensor):
        return [bias]
    return list(bias.tensors()) if bias is not None else []


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_backend_matches_reference_on_cases(name, case):
    shape, build = CASES[case]
    torch.manual_seed(0)
    kw = build(shape)
    q, k, v = make_qkv(shape, seed=3)
    result = verify_backend(name, q, k, v, must_support=case in EXPECTED_SUPPORT.get(name, ()), **kw)
    skip_unless_ran(name, case, result)


def test_cases_cover_what_the_issue_asks():
    assert any(s.Nq == 1 for s, _ in CASES.values()) and any(s.Hq != s.Hk for s, _ in CASES.values())
    assert any(s.D != s.Dv for s, _ in CASES.values()) and any(s.Nq > s.Nk for s, _ in CASES.values())
    assert "reference" in BACKENDS and "sdpa" in BACKENDS


def mask_zoo() -> dict:
    """One of every mask spec (and compositions) for ZOO_SHAPE (B=2, Hq=4, Nq=7, Nk=11)."""
    g = torch.Generator().manual_seed(0)
    docs = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [0] * 2 + [1] * 9])
    return {
        "causal": M.causal(),
        "sliding_window": M.sliding_window(3, 1),
        "dilated": M.dilated(2, 2),
        "dilated_bidirectional": M.dilated(2, 3, causal=False),
        "child_strided": M.sliding_window(2) | M.strided(3),
        "child_fixed": M.fixed(3, 1),
        "fixed_bidirectional": M.fixed(4, 2, causal=False),
        "block_sparse": M.block_sparse(torch.rand(4, 4, generator=g) < 0.5, 3),
        "block_sparse_per_head": M.block_sparse(torch.rand(4, 6, 6, generator=g) < 0.5, 2),
        "longformer": M.sliding_window(1, 1) | M.global_tokens(torch.tensor([0, 5])),
        "global_flags": M.global_tokens(torch.rand(2, 11, generator=g) < 0.2),
        "bigbird": M.bigbird(2, 3, 1, 1, seed=3),
        "key_padding": M.key_padding(torch.tensor([11, 4])),
        "key_padding_empty_sequence": M.key_padding(torch.tensor([11, 0])),  # fully masked rows
        "key_padding_bool": M.key_padding_from_bool(torch.rand(2, 11, generator=g) < 0.3),
        "document": M.document(docs),
        "document_causal": M.document(docs) & M.causal(),
        "prefix_lm": M.prefix_lm(6),
        "prefix_lm_per_batch": M.prefix_lm(torch.tensor([2, 7])),
        "causal_and_padding": M.causal() & M.key_padding(torch.tensor([9, 11])),
        "window_or_prefix": M.sliding_window(1) | M.prefix_lm(3),
        "nested": (M.causal() & M.document(docs)) | M.global_tokens(torch.tensor([1])),
        "function": M.from_function(lambda b, h, q, k: (q + k + h) % 3 != 0, name="mod3"),
        "bool_tensor": torch.rand(2, 1, 7, 11, generator=g) < 0.4,
    }


ZOO_SHAPE = Shape(2, 4, 2, 7, 11, 5, 3)


@pytest.mark.parametrize("kind", list(mask_zoo()))
@pytest.mark.parametrize("name", NAMES)
def test_backend_matches_reference_for_every_mask_spec(name, kind):
    mask = mask_zoo()[kind]
    q, k, v = make_qkv(ZOO_SHAPE, seed=2)
    bias = torch.randn(1, 4, 7, 11, dtype=torch.float64, requires_grad=True)
    has_empty_rows = bool(empty_rows(q, k, v, mask).any())
    if name == "sdpa" and has_empty_rows:
        reasons = BACKENDS[name].not_supported_reasons(make_call(q, k, v, mask=mask, bias=bias))
        assert any("fully masked" in r for r in reasons), reasons
    must = name == "reference" or (name == "sdpa" and not has_empty_rows)
    result = verify_backend(name, q, k, v, must_support=must, mask=mask, bias=bias)
    skip_unless_ran(name, kind, result)


@pytest.mark.parametrize("name", NAMES)
def test_backend_accepts_non_contiguous_inputs(name):
    """Modules hand over (B, N, H, D) projections transposed to (B, H, N, D): strided views."""
    B, N, Hq, Hk, D = 2, 6, 4, 2, 3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64).transpose(1, 2)  # (B, Hq, N, D)
    kv = torch.randn(B, N, 2, Hk, D, generator=g, dtype=torch.float64)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, Hk, N, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    result = verify_backend(name, q, k, v, must_support=name in EXPECTED_SUPPORT, mask=M.causal())
    skip_unless_ran(name, "non-contiguous inputs", result)


# ---------------------------------------------------------------------------------------------
# Hypothesis: random shapes, masks, biases, scales
# ---------------------------------------------------------------------------------------------


@st.composite
def calls(draw):
    shape = draw(shapes())
    B, Hq, _, Nq, Nk = shape[:5]
    mask = draw(st.one_of(st.none(), mask_specs(shape), bool_masks(shape)))
    bias_kind = draw(st.sampled_from(["none", "tensor", "spec"]))
    kw = {"mask": mask}
    if bias_kind == "tensor":
        size = draw(st.sampled_from([(Nq, Nk), (1, Hq, Nq, Nk), (B, 1, Nq, Nk), (B, Hq, Nq, Nk)]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
        kw["bias"] = torch.randn(*size, generator=g, dtype=torch.float64).requires_grad_()
    elif bias_kind == "spec":
        kw["bias"] = slope_bias(Hq, draw(st.integers(0, 1000)))[0]
    if draw(st.integers(0, 3)) == 0:
        kw["softcap"] = draw(st.sampled_from([0.5, 3.0]))
    if draw(st.integers(0, 3)) == 0:
        kw["scale"] = draw(st.floats(0.05, 3.0))
    if draw(st.integers(0, 4)) == 0:
        kw["dropout_p"], kw["dropout_seed"] = draw(st.sampled_from([0.2, 0.6])), draw(st.integers(0, 99))
    return shape, kw, draw(st.integers(0, 1000))


# Examples per backend. flex on CPU runs eagerly (unfused) and builds a block mask per call
# (about a second per example), so it gets fewer to keep the suite within its time budget.
HYPOTHESIS_EXAMPLES = {"flex": 8}


@pytest.mark.parametrize("name", NAMES)
def test_backend_matches_reference_hypothesis(name):
    ran = []

    @settings(max_examples=HYPOTHESIS_EXAMPLES.get(name, 40), deadline=None, derandomize=True)
    @given(calls())
    def check(drawn):
        shape, kw, seed = drawn
        q, k, v = make_qkv(shape, seed=seed)
        result = verify_backend(name, q, k, v, **kw)
        ran.append(not isinstance(result, list))
        if isinstance(result, list):  # neither mode runs: naming the backend must raise these reasons
            assert not any("recompile limit" in r for r in result), f"{name} hit the recompile limit: {result}"
            event(f"{name} unsupported: {result[0]}")
            reasons = BACKENDS[name].not_supported_reasons(make_call(q, k, v, **kw))
            with pytest.raises(NoBackendError) as info:
                attnkit.attention(q, k, v, backend=name, **kw)
            assert all(r in str(info.value) for r in reasons)
        else:
            event(f"{name} ran ({result})")

    check()
    least = len(ran) // 2 if name == "flex" else 1  # flex refuses only dropout and untraceable specs
    assert sum(ran) >= least, f"{name} ran only {sum(ran)} of {len(ran)} examples"


def offset_bias(hq: int):
    """A float32 bias spec with a large constant offset: exact in float32, but its values are
    not representable in bfloat16/float16 (spacing 0.5 / 0.06 near 100), so a backend that rounds
    the bias to the input dtype before adding it no longer matches the float32-accumulating spec."""
    slopes = (0.1 + torch.arange(hq, dtype=torch.float32) / hq).requires_grad_()
    return Bi.from_function(lambda b, h, q, k: 100.0 - slopes[h] * (q - k).abs().float(), tensors=[slopes],
                            name="offset")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bias_kind", ["tensor", "spec"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_float64(name, dtype, bias_kind):
    shape = Shape(2, 4, 2, 7, 9, 8, 6)
    q, k, v = make_qkv(shape, seed=1, dtype=dtype)
    bias = (torch.randn(1, 4, 7, 9, dtype=torch.float64).to(dtype).requires_grad_() if bias_kind == "tensor"
            else offset_bias(4))
    kw = {"mask": M.causal() & M.key_padding(torch.tensor([9, 6])), "bias": bias}
    must = name in EXPECTED_SUPPORT and dtype == torch.bfloat16
    skip_unless_ran(name, dtype, verify_backend(name, q, k, v, must_support=must, **kw))


# ---------------------------------------------------------------------------------------------
# Conventions
# ---------------------------------------------------------------------------------------------


def test_default_scale_and_formula():
    q, k, v = make_qkv(Shape(1, 1, 1, 3, 4, 5, 2), requires_grad=False)
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(5), -1) @ v
    torch.testing.assert_close(attnkit.attention(q, k, v, backend="reference"), want, **tol(torch.float64))


def test_gqa_query_head_reads_kv_head_h_div_groups():
    q, k, v = make_qkv(Shape(1, 6, 2, 3, 4, 3, 3), requires_grad=False)
    out = attnkit.attention(q, k, v, backend="reference")
    for h in range(6):
        one = attnkit.attention(q[:, h:h + 1], k[:, h // 3:h // 3 + 1], v[:, h // 3:h // 3 + 1], backend="reference")
        torch.testing.assert_close(out[:, h:h + 1], one, **tol(torch.float64))


def test_causal_decoding_matches_full_pass():
    """Bottom-right causal: the last query alone (Nq=1) equals the last row of the full pass."""
    q, k, v = make_qkv(Shape(1, 2, 2, 6, 6, 3, 3), requires_grad=False)
    full = attnkit.attention(q, k, v, mask=M.causal(), backend="reference")
    for t in range(1, 7):
        step = attnkit.attention(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t], mask=M.causal(), backend="reference")
        torch.testing.assert_close(step, full[:, :, t - 1:t], **tol(torch.float64))


def test_fully_masked_rows_zero_output_zero_grad_no_nan():
    q, k, v = make_qkv(Shape(2, 2, 2, 3, 4, 3, 3))
    mask = torch.ones(2, 1, 3, 4, dtype=torch.bool)
    mask[0, :, 1] = False
    out = attnkit.attention(q, k, v, mask=mask)
    out.sum().backward()
    assert bool((out[0, :, 1] == 0).all()) and bool((q.grad[0, :, 1] == 0).all())
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


def test_dropout_same_seed_same_output_different_seed_different():
    q, k, v = make_qkv(Shape(1, 2, 2, 5, 6, 3, 3), requires_grad=False)
    a = attnkit.attention(q, k, v, dropout_p=0.4, dropout_seed=1)
    assert torch.equal(a, attnkit.attention(q, k, v, dropout_p=0.4, dropout_seed=1))
    assert not torch.allclose(a, attnkit.attention(q, k, v, dropout_p=0.4, dropout_seed=2))
    assert not torch.allclose(a, attnkit.attention(q, k, v))
    torch.manual_seed(3)  # dropout_seed=None draws from torch's global generator
    c = attnkit.attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    assert torch.equal(c, attnkit.attention(q, k, v, dropout_p=0.4))


def test_dropout_weights_are_after_dropout_and_pattern_is_the_hash():
    shape = Shape(2, 2, 1, 3, 5, 4, 3)
    q, k, v = make_qkv(shape, requires_grad=False)
    p, seed = 0.5, 9
    out, w = attnkit.attention(q, k, v, mask=M.causal(), dropout_p=p, dropout_seed=seed, return_weights=True)
    _, w0 = attnkit.attention(q, k, v, mask=M.causal(), return_weights=True)
    b, h = torch.arange(2).view(-1, 1, 1, 1), torch.arange(2).view(1, -1, 1, 1)
    qpos = torch.tensor(positions(3, 5)).view(1, 1, -1, 1)  # dropout coordinates in key positions
    keep = dropout_keep(seed, p, b, h, qpos, torch.arange(5).view(1, 1, 1, -1))
    torch.testing.assert_close(w, w0 * keep / (1 - p), **tol(torch.float64))
    torch.testing.assert_close(out, w @ v.repeat_interleave(2, dim=1), **tol(torch.float64))


def test_dropout_pattern_differs_across_batch_and_heads():
    """Identical inputs in every (batch, head): without dropout every slice has the same output;
    with it each slice has its own pattern, in every backend that runs dropout."""
    one = make_qkv(Shape(1, 1, 1, 6, 8, 4, 4), requires_grad=False)
    q, k, v = (t.expand(2, 3, -1, -1).contiguous() for t in one)  # (2, 3, N, D), all slices equal
    kw = {"dropout_p": 0.5, "dropout_seed": 3}
    ran = []
    for name in NAMES:
        if BACKENDS[name].not_supported_reasons(make_call(q, k, v, **kw)):
            continue
        plain = attnkit.attention(q, k, v, backend=name).flatten(0, 1)  # (6, Nq, Dv)
        out = attnkit.attention(q, k, v, backend=name, **kw).flatten(0, 1)
        for a in range(6):
            torch.testing.assert_close(plain[a], plain[0], **tol(torch.float64, name))
            for b in range(a):
                assert (out[a] - out[b]).abs().max() > 1e-3, f"{name}: slices {a} and {b} share a dropout pattern"
        ran.append(name)
    assert {"reference", "blockwise"} <= set(ran), ran


def test_dropout_preserves_expected_value():
    """Mean over S seeds vs the no-dropout output, within 6 standard errors per element.

    out_d = sum_j w_j keep_j / (1 - p) v_jd has mean sum_j w_j v_jd and variance
    p / (1 - p) * sum_j w_j^2 v_jd^2 (independent Bernoulli(1 - p) keeps).
    """
    q, k, v = make_qkv(Shape(1, 1, 1, 4, 6, 3, 3), requires_grad=False)
    p, S = 0.3, 400
    base, w = attnkit.attention(q, k, v, return_weights=True)
    mean = torch.stack([attnkit.attention(q, k, v, dropout_p=p, dropout_seed=s) for s in range(S)]).mean(0)
    var = p / (1 - p) * (w.pow(2) @ v.pow(2))  # (1, 1, Nq, Dv)
    bound = 6 * (var / S).sqrt() + 1e-12
    assert bool(((mean - base).abs() <= bound).all()), ((mean - base).abs() / bound).max()


def test_dropout_keep_rate_close_to_one_minus_p():
    q, k, v = make_qkv(Shape(2, 4, 4, 32, 48, 2, 2), requires_grad=False)
    p = 0.25
    _, w = attnkit.attention(q, k, v, dropout_p=p, dropout_seed=0, return_weights=True)
    n = w.numel()
    rate = float((w != 0).double().mean())
    assert abs(rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------------------------
# return_weights and dispatch
# ---------------------------------------------------------------------------------------------


def test_return_weights_through_auto_falls_back_and_logs(caplog):
    q, k, v = make_qkv(Shape(2, 2, 1, 4, 5, 3, 3), requires_grad=False)
    mask = M.causal() & M.key_padding(torch.tensor([5, 2]))
    with caplog.at_level(logging.DEBUG, logger="attnkit"):
        out, w = attnkit.attention(q, k, v, mask=mask, return_weights=True)
    ran = [r.getMessage() for r in caplog.records if r.name == "attnkit"]
    assert ran and "reference" in ran[-1], ran
    assert w.shape == (2, 2, 4, 5)
    dense = mask.to_dense(4, 5, batch=2, heads=2)
    assert bool((w[~dense] == 0).all())
    torch.testing.assert_close(w.sum(-1), dense.any(-1).double(), **tol(torch.float64))
    torch.testing.assert_close(out, w @ v.repeat_interleave(2, dim=1), **tol(torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_return_weights_from_named_backend(name):
    q, k, v = make_qkv(Shape(1, 2, 2, 3, 4, 2, 2), requires_grad=False)
    call = make_call(q, k, v, mask=M.causal(), return_weights=True)
    reasons = BACKENDS[name].not_supported_reasons(call)
    if name == "reference":
        assert not reasons
    if reasons:
        with pytest.raises(NoBackendError, match="cannot run this call"):
            attnkit.attention(q, k, v, mask=M.causal(), return_weights=True, backend=name)
        return
    out, w = attnkit.attention(q, k, v, mask=M.causal(), return_weights=True, backend=name)
    # the formula: softmax of q k^T / sqrt(D) over the bottom-right causal keys (Nk - Nq = 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(2)
    want = torch.softmax(s.masked_fill(~torch.ones(3, 4, dtype=torch.bool).tril(1), float("-inf")), -1)
    torch.testing.assert_close(w, want, **tol(torch.float64, name))
    torch.testing.assert_close(out, want @ v, **tol(torch.float64, name))


def test_auto_logs_the_backend_that_ran(caplog):
    q, k, v = make_qkv(Shape(1, 1, 1, 3, 3, 2, 2), requires_grad=False)
    with caplog.at_level(logging.DEBUG, logger="attnkit"):
        attnkit.attention(q, k, v, mask=M.causal())
    want = attnkit.which_backend(q, k, v, mask=M.causal())
    assert any(want in r.getMessage() for r in caplog.records if r.name == "attnkit")


def test_auto_avoids_sdpa_for_fully_masked_rows():
    q, k, v = make_qkv(Shape(1, 1, 1, 4, 2, 2, 2), requires_grad=False)
    assert BACKENDS["sdpa"].not_supported_reasons(make_call(q, k, v)) == []
    name = attnkit.which_backend(q, k, v, mask=M.causal())  # Nq > Nk: rows 0, 1 see no key
    assert "fully masked" in "; ".join(BACKENDS["sdpa"].not_supported_reasons(make_call(q, k, v, mask=M.causal())))
    assert name != "sdpa"
