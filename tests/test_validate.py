"""Error messages: bad inputs to attnkit.attention name the argument, what it got and what was expected.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import biases as Bi
from attnkit import masks as M
from attnkit.backends import BACKENDS
from attnkit.dispatch import NoBackendError
from tests.strategies import Shape, make_qkv

SHAPE = Shape(2, 4, 2, 3, 5, 6, 7)  # B, Hq, Hk, Nq, Nk, D, Dv


def qkv():
    return make_qkv(SHAPE, requires_grad=False)


def r(*s, dtype=torch.float64):
    return torch.randn(*s, dtype=dtype)


@pytest.mark.parametrize("args, exc, match", [
    # rank != 4
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dimensions \(B, Hq, Nq, D\), got 3: shape \(4, 3, 6\)"),
    (lambda q, k, v: (q, k[..., None], v), ValueError, r"k must have 4 dimensions \(B, Hk, Nk, D\), got 5"),
    (lambda q, k, v: (q, k, v[0, 0]), ValueError, r"v must have 4 dimensions \(B, Hk, Nk, Dv\), got 2: shape \(5, 7\)"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, r"q must be a torch.Tensor of shape \(B, Hq, Nq, D\), got ndarray"),
    # dtypes
    (lambda q, k, v: (q.long(), k, v), TypeError, "q must be a floating-point tensor, got dtype torch.int64"),
    (lambda q, k, v: (q, k.float(), v), TypeError, "q, k, v must share a dtype, got torch.float64, torch.float32, torch.float64"),
    # head counts that do not divide
    (lambda q, k, v: (r(2, 3, 3, 6), k, v), ValueError, r"query heads Hq=3 must be a multiple of key/value heads Hk=2"),
    (lambda q, k, v: (q, r(2, 3, 5, 6), r(2, 3, 5, 7)), ValueError, r"Hq=4 must be a multiple of key/value heads Hk=3"),
    # D mismatch
    (lambda q, k, v: (q, r(2, 2, 5, 4), v), ValueError, r"head dim of q \(6\) must equal head dim of k \(4\): q \(2, 4, 3, 6\), k \(2, 2, 5, 4\)"),
    # batch / length mismatches
    (lambda q, k, v: (q, r(1, 2, 5, 6), v), ValueError, r"batch sizes differ: q \(2, 4, 3, 6\), k \(1, 2, 5, 6\)"),
    (lambda q, k, v: (q, k, r(2, 2, 4, 7)), ValueError, r"k \(2, 2, 5, 6\) and v \(2, 2, 4, 7\) must agree in heads and length"),
    (lambda q, k, v: (q, r(2, 2, 0, 6), r(2, 2, 0, 7)), ValueError, r"k has no keys \(Nk=0\)"),
    # issue 10: D=0 was a ZeroDivisionError
    (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, r"q and k have head dim D=0: q \(2, 4, 3, 0\)"),
])
def test_qkv_errors(args, exc, match):
    q, k, v = args(*qkv())
    with pytest.raises(exc, match=match):
        attnkit.attention(q, k, v)


@pytest.mark.parametrize("kw, exc, match", [
    # mask of wrong shape or dtype
    ({"mask": torch.ones(2, 4, 3, 4, dtype=torch.bool)}, ValueError,
     r"mask of shape \(2, 4, 3, 4\) does not broadcast to \(B, Hq, Nq, Nk\) = \(2, 4, 3, 5\)"),
    ({"mask": torch.ones(3, 1, 3, 5, dtype=torch.bool)}, ValueError, r"mask of shape \(3, 1, 3, 5\) does not broadcast"),
    ({"mask": torch.ones(1, 2, 4, 3, 5, dtype=torch.bool)}, ValueError,
     r"mask must have 2 to 4 dimensions broadcastable to \(B, Hq, Nq, Nk\) = \(2, 4, 3, 5\), got shape \(1, 2, 4, 3, 5\)"),
    ({"mask": torch.ones(5, dtype=torch.bool)}, ValueError, r"mask must have 2 to 4 dimensions .* got shape \(5,\)"),
    ({"mask": torch.ones(3, 5)}, TypeError, r"mask must be a bool tensor \(True = may attend\), got dtype torch.float32"),
    ({"mask": [[True]]}, TypeError, "mask must be None, a bool tensor or an attnkit.masks spec, got list"),
    # mask specs whose data does not fit the input
    ({"mask": M.key_padding(torch.tensor([5, 5, 5]))}, ValueError, "key_padding: lengths has 3 entries, expected batch size B=2"),
    ({"mask": M.document(torch.zeros(4, dtype=torch.long))}, ValueError, "document: ids covers 4 keys/positions but the input has Nk=5"),
    ({"mask": M.causal() | M.block_sparse(torch.ones(3, 2, 2, dtype=torch.bool), 3)}, ValueError,
     r"block_sparse: layout \(3, 2, 2\) has 3 heads, expected 1 \(shared\) or Hq=4"),
    # bias of wrong shape or dtype
    ({"bias": r(2, 4, 5, 5)}, ValueError, r"bias of shape \(2, 4, 5, 5\) does not broadcast to \(B, Hq, Nq, Nk\) = \(2, 4, 3, 5\)"),
    ({"bias": torch.zeros(3, 5, dtype=torch.bool)}, TypeError, "bias must be a floating-point tensor, got dtype torch.bool"),
    ({"bias": torch.zeros(3, 5, dtype=torch.long)}, TypeError, "bias must be a floating-point tensor, got dtype torch.int64"),
    ({"bias": 0.5}, TypeError, "bias must be None, a float tensor or an attnkit.biases spec, got float"),
    # scale, softcap, dropout
    ({"scale": 0.0}, ValueError, "scale must be a finite number > 0, got 0.0"),
    ({"scale": -1}, ValueError, "scale must be a finite number > 0, got -1"),
    ({"scale": float("nan")}, ValueError, "scale must be a finite number > 0, got nan"),
    ({"scale": torch.tensor(1.0)}, TypeError, "scale must be a Python float, got Tensor"),
    ({"scale": True}, TypeError, "scale must be a Python float, got bool"),
    ({"softcap": 0}, ValueError, r"softcap must be a finite number > 0 \(or None\), got 0"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a float in \[0, 1\), got 1.0"),
    ({"dropout_p": -0.1}, ValueError, r"dropout_p must be a float in \[0, 1\), got -0.1"),
    ({"dropout_p": "0.1"}, TypeError, r"dropout_p must be a float in \[0, 1\), got str"),
    ({"dropout_p": 0.1, "dropout_seed": 1.5}, TypeError, "dropout_seed must be an int or None, got float"),
    # backends
    ({"backend": "nope"}, ValueError, r"backend must be 'auto' or one of \[.*'reference'.*'sdpa'.*\], got 'nope'"),
    ({"backend": "sdpa", "softcap": 2.0}, NoBackendError, r"backend 'sdpa' cannot run this call \(q \(2, 4, 3, 6\), .*\): sdpa has no softcap"),
    ({"backend": "sdpa", "return_weights": True}, NoBackendError, "sdpa does not return attention weights"),
    ({"backend": "sdpa", "mask": M.key_padding(torch.tensor([5, 0]))}, NoBackendError, "fully masked query rows"),
    # issue 10: accepted silently before (NaN, True, a seed reduced mod 2^32, deep torch errors)
    ({"bias": torch.tensor([[0.0] * 4 + [float("inf")]] * 3, dtype=torch.float64)}, ValueError,
     r"bias has 3 entries equal to \+inf, which make the softmax NaN"),
    ({"return_weights": "no"}, TypeError, "return_weights must be True or False, got 'no'"),
    ({"return_weights": 1}, TypeError, "return_weights must be True or False, got 1"),
    ({"dropout_p": 0.1, "dropout_seed": -1}, ValueError, r"dropout_seed must be an int in \[0, 2\*\*64\), got -1"),
    ({"dropout_p": 0.1, "dropout_seed": 2**64}, ValueError, r"dropout_seed must be an int in \[0, 2\*\*64\)"),
    ({"mask": M.key_padding(torch.tensor([6, 5]))}, ValueError, r"key_padding: lengths \[6, 5\] exceed the number of keys Nk=5"),
    ({"mask": M.from_function(lambda b, h, i, j: torch.ones(3, 5, 7, dtype=torch.bool), name="own_size")}, ValueError,
     r"mask function own_size returned shape \(3, 5, 7\), which does not broadcast to the shape of its index tensors"),
    ({"mask": M.from_function(lambda b, h, i, j: (i - j).float(), name="floaty")}, TypeError,
     "mask function floaty must return a bool tensor, got torch.float32"),
    ({"bias": Bi.from_function(lambda b, h, i, j: torch.zeros(4, 4, 4, 4, 4), name="own_size")}, ValueError,
     r"bias function own_size returned shape \(4, 4, 4, 4, 4\), which does not broadcast"),
])
def test_argument_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        attnkit.attention(*qkv(), **kw)


def test_mask_on_another_device_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="mask is on meta but q is on cpu"):
        attnkit.attention(q, k, v, mask=torch.ones(3, 5, dtype=torch.bool, device="meta"))


def test_no_backend_fits_lists_every_backend(monkeypatch):
    # Every backend but sdpa refuses for this test; sdpa refuses softcap by itself.
    for name, backend in BACKENDS.items():
        if name != "sdpa":
            monkeypatch.setattr(backend, "static_reasons", lambda call, name=name: [f"{name} refused for this test"])
    with pytest.raises(NoBackendError) as info:
        attnkit.attention(*qkv(), softcap=2.0)
    msg = str(info.value)
    assert msg.startswith("no backend can run this call (q (2, 4, 3, 6), k (2, 2, 5, 6), v (2, 2, 5, 7), torch.float64")
    assert "  - sdpa: sdpa has no softcap" in msg
    for name in BACKENDS:
        assert f"  - {name}: " in msg
        if name != "sdpa":
            assert f"{name} refused for this test" in msg


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_dropout_seeds_use_all_64_bits(backend):
    """7 and 7 + 2^32 gave the same dropout pattern (the seed was reduced mod 2^32 silently)."""
    q, k, v = qkv()
    a, b, c = (attnkit.attention(q, k, v, dropout_p=0.5, dropout_seed=s, backend=backend) for s in (7, 7 + 2**32, 7))
    assert not torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_wrong_shaped_function_specs_fail_with_a_clear_error_on_every_backend(backend):
    """A function spec that ignores its index tensors used to die deep in torch (an expand/broadcast
    error naming internal shapes); it is probed on a tiny grid before any backend runs."""
    q, k, v = qkv()
    bias = Bi.from_function(lambda b, h, i, j: torch.zeros(3, 5), name="table")  # (Nq, Nk) of its own
    with pytest.raises(ValueError, match=r"bias function table returned shape \(3, 5\)"):
        attnkit.attention(q, k, v, bias=bias, backend=backend)
