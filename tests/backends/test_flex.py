"""flex backend: values vs the reference on one small compiled shape, its block mask vs the spec's
tiles (which blocks flex visits, and that FULL blocks are all-allowed and inside the key range),
and its reasons. Compiling takes seconds per shape on CPU, so the compiled test is one call."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import biases as Bi
from attnkit import masks as M
from attnkit.backends import BACKENDS
from attnkit.functional import make_call
from tests.strategies import Shape, make_qkv
from tests.tolerances import assert_close

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.usefixtures("flex_compile_budget")
from attnkit.backends.flex import block_mask_for, reset_compile_cache  # noqa: E402


def test_flex_matches_reference_gqa_cross_lengths_bias_softcap():
    """One compile: Nq != Nk, GQA, Dv != D, a composed mask with a function part, a bias spec and
    softcap, and fully masked rows (key padding 0 in batch 1)."""
    reset_compile_cache()  # other tests in this process may have used flex's recompile budget
    shape = Shape(2, 4, 2, 200, 300, 16, 8)
    q, k, v = make_qkv(shape, dtype=torch.float32, seed=0, requires_grad=False)
    lengths = torch.tensor([300, 0])
    mask = ((M.prefix_lm(40) & M.sliding_window(100)) | M.from_function(lambda b, h, i, j: (i + j) % 7 == 0)) \
        & M.key_padding(lengths)
    bias = Bi.from_function(lambda b, h, i, j: -0.01 * (i - j).float() * (h + 1).float(), name="slopes")
    call = make_call(q, k, v, mask=mask, bias=bias, softcap=3.0)
    assert BACKENDS["flex"].not_supported_reasons(call) == []
    out = BACKENDS["flex"].run(call)
    ref = BACKENDS["reference"].run(make_call(q.double(), k.double(), v.double(), mask=mask, bias=bias, softcap=3.0))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, ref, torch.float32, "flex")

    # Issue 10, same compiled kernel: (a) the spec's data edited in place must not reuse a stale
    # block mask (a reused key_padding buffer gave a max error of 0.64); (b) the NaN rule: a NaN
    # query row is NaN, NaN in masked keys' k / v changes nothing.
    def both():
        kw = {"mask": mask, "bias": bias, "softcap": 3.0}
        return (attnkit.attention(q, k, v, backend="flex", **kw),
                attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw))

    lengths.copy_(torch.tensor([130, 257]))
    out, ref = both()
    assert_close(out, ref, torch.float32, "flex")
    with torch.no_grad():
        q[0, 1, 17] = float("nan")
        k[0, 0, 200], v[1, 1, 290, 3] = float("nan"), float("inf")  # keys past each length: masked
    out, ref = both()
    assert torch.equal(out.isnan(), ref.isnan()) and int(out.isnan().any(-1).sum()) == 1
    assert_close(out.nan_to_num(), ref.nan_to_num(), torch.float32, "flex")


@pytest.mark.parametrize("make", [
    lambda: (torch.tensor([300, 120]), M.key_padding),
    lambda: (torch.arange(520) // 100, M.document),
    lambda: (torch.ones(300, 520, dtype=torch.bool).tril(220), lambda t: M.TensorMask(t, 300, 520)),
    lambda: (torch.tensor([7, 400]), lambda t: M.causal() & M.global_tokens(t)),
], ids=["key_padding", "document", "tensor", "global_tokens"])
def test_block_mask_cache_sees_in_place_edits(make):
    """Block masks were cached by the spec's identity: editing its data in place gave stale masks."""
    data, build = make()
    spec = build(data)
    Nq, Nk = 300, 520
    first = block_mask_for(spec, 2, 1, Nq, Nk, "cpu")
    assert block_mask_for(spec, 2, 1, Nq, Nk, "cpu") is first  # unchanged data: cached
    with torch.no_grad():
        if data.dtype == torch.bool:
            data.logical_not_()
        else:
            data.copy_(data // 2)
    fresh = block_mask_for(spec, 2, 1, Nq, Nk, "cpu")
    assert fresh is not first
    rebuilt = block_mask_for(build(data.clone()), 2, 1, Nq, Nk, "cpu")
    assert torch.equal(fresh.to_dense(), rebuilt.to_dense())
    assert not torch.equal(first.to_dense(), fresh.to_dense())


def test_block_masks_of_function_specs_are_never_cached():
    """A function's closure may hold data we cannot see: its tiles are recomputed on every call."""
    table = torch.zeros(520, dtype=torch.bool)
    spec = M.from_function(lambda b, h, i, j: table[j], name="lookup")
    a = block_mask_for(spec, 1, 1, 300, 520, "cpu").to_dense().clone()
    table[:130] = True
    b = block_mask_for(spec, 1, 1, 300, 520, "cpu").to_dense()
    assert a.sum() == 0 and b.sum() > 0


def _blocks(num, idx, Tk):
    """(Tq, Tk) bool from flex's per-row block counts num (Tq,) and indices idx (Tq, Tk)."""
    out = torch.zeros(num.shape[0], Tk, dtype=torch.bool)
    for r in range(num.shape[0]):
        out[r, idx[r, :int(num[r])].long()] = True
    return out


FULL_CASES = {  # name -> mask for Nk keys
    "causal": lambda nk: M.causal(),
    "window": lambda nk: M.sliding_window(130, 7),
    "prefix_lm": lambda nk: M.prefix_lm(200),
    "everything": lambda nk: M.prefix_lm(nk),  # every pair allowed: every in-range block is FULL
    "padding": lambda nk: M.key_padding(torch.tensor([nk - 1])),
}


@pytest.mark.parametrize("case", list(FULL_CASES))
@pytest.mark.parametrize("nk", [520, 512])
def test_block_mask_full_blocks_are_all_allowed_and_inside_nk(case, nk):
    """A FULL block runs without mask_mod, so every pair in it (queries < Nq) must be allowed
    and it must lie inside [0, Nk): a tail key block (Nk not a multiple of 128) is never FULL."""
    Nq = 300
    mask = FULL_CASES[case](nk)
    bm = block_mask_for(mask, 1, 1, Nq, nk, "cpu")
    Tq, Tk = -(-Nq // 128), -(-nk // 128)
    full = _blocks(bm.full_kv_num_blocks[0, 0], bm.full_kv_indices[0, 0], Tk)
    partial = _blocks(bm.kv_num_blocks[0, 0], bm.kv_indices[0, 0], Tk)
    assert not bool((full & partial).any())
    dense = torch.zeros(Tq * 128, Tk * 128, dtype=torch.bool)  # keys past Nk: never allowed
    dense[:Nq, :nk] = mask.to_dense(Nq, nk)[0, 0]
    rows_past_nq = dense.clone()
    rows_past_nq[Nq:] = True  # query rows past Nq do not exist: no constraint on them
    all_allowed = rows_past_nq.view(Tq, 128, Tk, 128).all(dim=3).all(dim=1)
    assert not bool((full & ~all_allowed).any()), f"FULL blocks with blocked pairs: {(full & ~all_allowed).nonzero()}"
    assert torch.equal(full | partial, dense.view(Tq, 128, Tk, 128).any(dim=3).any(dim=1))
    if nk % 128:
        assert not bool(full[:, -1].any()), "the tail key block is marked FULL"
    if case == "everything":  # FULL blocks are used where they are allowed
        assert bool(full[:, :nk // 128].all())


@pytest.mark.parametrize("mask", [M.causal(), M.sliding_window(130, 7), M.prefix_lm(200)], ids=repr)
def test_block_mask_from_tiles_equals_spec(mask):
    Nq, Nk = 300, 520
    bm = block_mask_for(mask, 1, 1, Nq, Nk, "cpu")
    dense = mask.to_dense(Nq, Nk)[0, 0]
    # every allowed pair lies in a block flex visits (partial or full); full blocks are all-allowed
    visited = bm.to_dense()[0, 0].bool()  # (Tq, Tk)
    Tq, Tk = visited.shape
    pad = torch.zeros(Tq * 128, Tk * 128, dtype=torch.bool)
    pad[:Nq, :Nk] = dense
    blocks = pad.view(Tq, 128, Tk, 128)
    assert torch.equal(visited, blocks.any(dim=3).any(dim=1))
    assert bm is block_mask_for(mask, 1, 1, Nq, Nk, "cpu")  # cached per (spec, shape, device)


def test_reasons():
    q, k, v = make_qkv(Shape(1, 2, 2, 8, 8, 4, 4), dtype=torch.float32, requires_grad=True)
    flex = BACKENDS["flex"]
    assert any("no backward on CPU" in r for r in flex.not_supported_reasons(make_call(q, k, v)))
    with torch.no_grad():
        assert any("dropout" in r for r in flex.not_supported_reasons(make_call(q, k, v, dropout_p=0.1)))
        assert any("weights" in r for r in flex.not_supported_reasons(make_call(q, k, v, return_weights=True)))
        q64, k64, v64 = (t.double() for t in (q, k, v))
        assert any("float64" in r for r in flex.not_supported_reasons(make_call(q64, k64, v64)))
        untraceable = M.from_function(lambda b, h, i, j: torch.ones_like(i + j, dtype=torch.bool) if int(i.max()) >= 0
                                      else i > j, name="item")
        assert any("traced" in r for r in flex.not_supported_reasons(make_call(q, k, v, mask=untraceable)))


def test_flex_specialisations_live_on_attnkits_own_frame():
    """torch.compile counts specialisations per compiled function. attnkit compiles its own
    wrapper, so a user's compiled flex_attention calls cannot use up attnkit's recompile budget
    (past it dynamo runs flex unfused: the GPU check saw 53 GB at N=16384)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.nn.attention.flex_attention import flex_attention

    from attnkit.backends import flex as F

    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    out = attnkit.attention(q, k, v, mask=M.causal(), backend="flex")
    ref = attnkit.attention(q.double(), k.double(), v.double(), mask=M.causal(), backend="reference")
    assert_close(out, ref, backend="flex")
    assert len(_debug_get_cache_entry_list(F._flex_call.__code__)) >= 1
    assert len(_debug_get_cache_entry_list(flex_attention.__code__)) == 0


def test_compile_key_tells_grad_mode_apart():
    """Training and no_grad evaluation of one shape are two dynamo specialisations (a grad-mode
    guard), so attnkit's count of them must see two."""
    from attnkit._call import make_call
    from attnkit.backends.flex import _compile_key

    q = torch.randn(1, 2, 40, 16)
    call = make_call(q, q, q, mask=M.causal())
    with torch.no_grad():
        inference = _compile_key(call)
    assert _compile_key(call) != inference


def test_only_learnable_bias_tensors_keep_flex_from_training():
    """Fixed ALiBi slopes are constants in score_mod: a training call (q, k, v need grads) may run
    on flex (CUDA), as the GPU check's ALiBi fwd+bwd row needs. A learnable T5 table is refused:
    attnkit does not route its gradient through score_mod."""
    from attnkit.positions import ALiBi, T5Bias

    flex = BACKENDS["flex"]
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    fixed = ALiBi(2)
    table = torch.zeros(32, 2, requires_grad=True)
    learnable = T5Bias(table, bidirectional=False)
    bias_reason = "bias-spec tensors"
    assert not any(bias_reason in r for r in flex.static_reasons(make_call(q, k, v, bias=fixed)))
    assert any(bias_reason in r for r in flex.static_reasons(make_call(q, k, v, bias=learnable)))
    with torch.no_grad():  # evaluation: nothing to route
        assert not any(bias_reason in r for r in flex.static_reasons(make_call(q, k, v, bias=learnable)))


@pytest.mark.parametrize("nq, heads, want", [(100, (4, 2), True), (100, (2, 2), False), (64, (4, 2), False),
                                             (100, (8, 2), True), (128, (8, 2), False), (1, (8, 1), False)])
def test_short_gqa_cuda_calls_take_the_main_flex_kernel(nq, heads, want):
    """torch <= 2.11 raises NoValidChoicesError for CUDA calls with Nq < 128 whose G query heads
    pack into more than 128 decoding rows (seen on an H200 at Nq=100, G=2, tools/gpu_check.py);
    exactly those take FORCE_USE_FLEX_ATTENTION. CPU calls never get kernel options."""
    from attnkit.backends.flex import _kernel_options

    hq, hk = heads
    got = _kernel_options(torch.device("cuda"), hq, hk, nq)
    assert (got == {"FORCE_USE_FLEX_ATTENTION": True}) if want else got is None
    assert _kernel_options(torch.device("cpu"), hq, hk, nq) is None


def test_spec_probe_runs_once_per_spec_and_shape(monkeypatch):
    """The vmap probe (about 1 ms of Python) is cached per spec and shape; a new spec or shape
    is probed again, and an untraceable spec keeps its reason on every call."""
    from attnkit.backends import flex as F

    calls = []
    real = F._probe_reason
    monkeypatch.setattr(F, "_probe_reason", lambda *a: calls.append(a[0]) or real(*a))
    fx = BACKENDS["flex"]
    q = torch.randn(1, 2, 40, 16)
    window, bias = M.sliding_window(7), Bi.from_function(lambda b, h, i, j: -0.1 * (i - j).float(), name="d")
    with torch.no_grad():
        for _ in range(3):
            assert fx.data_reasons(make_call(q, q, q, mask=window, bias=bias)) == []
        assert len(calls) == 2
        fx.data_reasons(make_call(q[:, :, :20], q, q, mask=window, bias=bias))
        assert len(calls) == 4
        bad = M.from_function(lambda b, h, i, j: (i >= j) if int(i.max()) >= 0 else i > j, name="item")
        for _ in range(2):
            assert any("traced" in r for r in fx.data_reasons(make_call(q, q, q, mask=bad)))
        assert len(calls) == 5
