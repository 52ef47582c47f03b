"""The NaN/inf rule (attnkit._nonfinite), the same on every backend, and the score-range check.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.

Rule: a row reads q_i and the k_j, v_j, bias[i, j] of the keys j its mask allows; a non-finite
entry it reads makes the whole row NaN; masked keys never contribute; a row with no allowed key
is zeros. Each case below failed on some backend before issue 10 (sdpa turned a NaN query row
into zeros and let a NaN in a padded key poison every row; every backend let a NaN value of a
masked key poison the rows that do not read it, through 0 * NaN in p @ v).
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit.backends.blockwise import BlockwiseOptions, blockwise_attention
from attnkit.dispatch import NoBackendError
from tests.strategies import Shape, make_qkv
from tests.tolerances import assert_close

NAN, INF = float("nan"), float("inf")
SHAPE = Shape(2, 4, 2, 7, 9, 5, 3)  # B, Hq, Hk (GQA), Nq != Nk, D, Dv
BACKENDS = ["reference", "sdpa", "blockwise"]


def _expected(q, k, v, allowed):
    """Float64 result of the rule from its statement: the reference on finite inputs (NaN entries
    replaced by 0), then NaN on rows that read a non-finite entry. allowed (B|1, Hq|1, Nq, Nk)."""
    B, Hq, Nq, _ = q.shape
    G = Hq // k.shape[1]
    fin = [torch.where(torch.isfinite(t), t, 0.0) for t in (q, k, v)]
    out = attnkit.attention(*fin, mask=allowed, backend="reference")
    bad_q = ~torch.isfinite(q).all(-1)  # (B, Hq, Nq)
    bad_kv = (~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))).repeat_interleave(G, dim=1)  # (B, Hq, Nk)
    allowed = torch.broadcast_to(allowed, (B, Hq, Nq, k.shape[2]))
    reads = (bad_q & allowed.any(-1)) | (allowed & bad_kv[:, :, None, :]).any(-1)
    return out.masked_fill(reads.unsqueeze(-1), NAN), reads


# (name, mask, where to put the non-finite values: list of (tensor, index, value))
CASES = [
    ("nan_query_row_no_mask", None, [("q", (0, 1, 3), NAN)]),
    ("nan_query_row_causal", M.causal(), [("q", (1, 2, 6), NAN)]),
    ("inf_query_row", M.causal(), [("q", (0, 0, 4, 2), INF)]),
    ("nan_query_fully_masked_row", M.key_padding(torch.tensor([9, 0])), [("q", (1, 3, 2), NAN)]),
    ("nan_k_padded_key", M.key_padding(torch.tensor([6, 9])), [("k", (0, 1, 7), NAN)]),
    ("inf_k_padded_key", M.key_padding(torch.tensor([6, 9])), [("k", (0, 0, 8), -INF)]),
    ("nan_v_padded_key", M.key_padding(torch.tensor([6, 9])), [("v", (0, 1, 6), NAN)]),
    ("inf_v_padded_key", M.key_padding(torch.tensor([6, 9])), [("v", (0, 0, 8, 1), INF)]),
    ("nan_v_key_later_rows_read", M.causal(), [("v", (0, 1, 5), NAN)]),
    ("nan_k_key_in_window", M.sliding_window(2), [("k", (1, 0, 4), NAN)]),
    ("nan_everywhere_masked_bool", torch.tensor([[True] * 5 + [False] * 4]), [("k", (0, 0, 7), NAN),
                                                                            ("v", (1, 1, 8), NAN)]),
    ("mixed", M.causal() & M.key_padding(torch.tensor([8, 5])), [("q", (0, 2, 1), NAN), ("v", (1, 0, 6), INF),
                                                               ("k", (0, 1, 3, 0), NAN)]),
]


def _inputs(case, dtype=torch.float64):
    q, k, v = make_qkv(SHAPE, dtype=dtype, requires_grad=False)
    t = {"q": q, "k": k, "v": v}
    for name, idx, val in case[2]:
        t[name][idx] = val
    return q, k, v


def _dense(mask):
    B, Hq, Hk, Nq, Nk, D, Dv = SHAPE
    if mask is None:
        return torch.ones(1, 1, Nq, Nk, dtype=torch.bool)
    if isinstance(mask, torch.Tensor):
        return torch.broadcast_to(mask, (1, 1, Nq, Nk))
    return mask.to_dense(Nq, Nk, batch=B, heads=Hq)


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_backend_follows_the_rule(case, backend):
    q, k, v = _inputs(case)
    allowed = _dense(case[1])
    want, reads = _expected(q, k, v, allowed)
    assert not reads.all()  # some rows must stay finite: the rule is about which rows
    if backend == "sdpa" and not allowed.any(-1).all():
        with pytest.raises(NoBackendError, match="fully masked query rows"):  # sdpa refuses these
            attnkit.attention(q, k, v, mask=case[1], backend=backend)
        return
    got = attnkit.attention(q, k, v, mask=case[1], backend=backend)
    assert torch.equal(got.isnan(), want.isnan()), f"NaN rows differ on {backend}"
    assert_close(got.nan_to_num(), want.nan_to_num(), torch.float64, backend)


def test_rule_in_float32_gradients_and_weights():
    """Rows that read nothing bad keep their values and gradients; the NaN rows carry NaN into the
    loss (so nothing is silently zeroed); return_weights marks the same rows."""
    case = CASES[-1]
    q, k, v = _inputs(case, dtype=torch.float32)
    want, reads = _expected(q.double(), k.double(), v.double(), _dense(case[1]))
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attnkit.attention(*leaves, mask=case[1], backend=backend)
        assert torch.equal(out.isnan(), want.isnan())
        assert_close(out.nan_to_num(), want.nan_to_num(), torch.float32, backend)
        ok = ~reads.unsqueeze(-1)  # only finite rows enter the loss: their gradients are finite
        (out * ok).nan_to_num().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in leaves), backend
    out, w = attnkit.attention(q, k, v, mask=case[1], return_weights=True)
    assert torch.equal(w.isnan().any(-1), reads) and torch.equal(out.isnan().any(-1), reads)


def test_blockwise_attention_function_and_small_tiles_follow_the_rule():
    case = CASES[-1]
    q, k, v = _inputs(case)
    want, _ = _expected(q, k, v, _dense(case[1]))
    got = blockwise_attention(q, k, v, mask=case[1], options=BlockwiseOptions(block_q=2, block_k=3))
    assert torch.equal(got.isnan(), want.isnan())
    assert_close(got.nan_to_num(), want.nan_to_num(), torch.float64, "blockwise")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_bias_propagates_only_where_read(backend):
    q, k, v = make_qkv(SHAPE, requires_grad=False)
    bias = torch.zeros(7, 9, dtype=torch.float64)
    bias[1, 8] = NAN   # row 1 sits at key position 3: key 8 is masked by causal -> ignored
    bias[4, 2] = NAN   # row 4 reads key 2 -> NaN row
    out = attnkit.attention(q, k, v, mask=M.causal(), bias=bias, backend=backend)
    assert torch.equal(out.isnan().any(-1)[0, 0], torch.tensor([False] * 4 + [True] + [False] * 2))


def test_finite_inputs_take_the_plain_path():
    """The rule costs one min/max pass on finite inputs: the backend sees the caller's tensors."""
    q, k, v = make_qkv(SHAPE, requires_grad=False)
    call = attnkit.functional.make_call(q, k, v)
    assert call.inputs_finite and call.q is q
    q[0, 0, 0, 0] = NAN
    assert not attnkit.functional.make_call(q, k, v).inputs_finite


@pytest.mark.parametrize("dtype, scale, big, match", [
    (torch.float32, 1e38, 1.0, r"scale=1e\+38 can overflow the scores in torch.float32"),
    (torch.float32, None, 1e19, r"the inputs \(scale=0.447214\) can overflow the scores in torch.float32"),
    (torch.bfloat16, 3e37, 1.0, r"scale=3e\+37 can overflow the scores in torch.float32"),
])
def test_scores_that_would_overflow_raise(dtype, scale, big, match):
    """scale=1e38 used to give NaN silently."""
    q, k, v = make_qkv(SHAPE, dtype=dtype, requires_grad=False, scale=big)
    with pytest.raises(ValueError, match=match):
        attnkit.attention(q, k, v, scale=scale)


def test_large_but_safe_scale_runs_in_float64():
    q, k, v = make_qkv(SHAPE, requires_grad=False)
    assert torch.isfinite(attnkit.attention(q, k, v, scale=1e38)).all()  # fits float64
