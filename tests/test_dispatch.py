"""The dispatch point: static reasons before data reasons, the dense mask built once per call,
and a NoBackendError that names the call."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit.backends import BACKENDS
from attnkit.dispatch import NoBackendError, choose
from attnkit.functional import make_call


def test_the_dense_mask_is_built_once_per_call(monkeypatch):
    """A small structured call: sdpa checks its rows for fully masked ones and then runs with the
    same dense tensor; the spec is evaluated densely once."""
    calls = []
    spec = M.sliding_window(3) & M.key_padding(torch.tensor([9, 6]))
    original = type(spec).to_dense

    def counting(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(type(spec), "to_dense", counting)
    q, k, v = (torch.randn(2, 2, 9, 4) for _ in range(3))
    call = make_call(q, k, v, mask=spec)
    assert choose(call, "auto") == "sdpa"
    BACKENDS["sdpa"].run(call)
    assert len(calls) == 1


def test_static_reasons_are_asked_before_anything_is_materialised(monkeypatch):
    """A call with softcap: sdpa refuses statically, so its data check (which materialises the
    mask) never runs."""
    monkeypatch.setattr(BACKENDS["sdpa"], "data_reasons", lambda call: pytest.fail("data reasons asked"))
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    out = attnkit.attention(q, k, v, mask=M.sliding_window(3), softcap=5.0)
    assert out.shape == (1, 2, 9, 4)


def test_no_backend_error_names_the_call():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    with pytest.raises(NoBackendError) as info:
        attnkit.attention(q, k, v, mask=M.causal(), softcap=3.0, backend="sdpa")
    msg = str(info.value)
    assert "q (1, 2, 9, 4), k (1, 2, 9, 4), v (1, 2, 9, 4), torch.float64 on cpu, mask=causal(), no bias, " \
           "softcap=3.0" in msg
    assert msg.endswith("sdpa has no softcap")


def _cuda_call(**kw):
    """A stand-in call on a CUDA device (the CUDA column cannot be reached on a CPU machine)."""
    from types import SimpleNamespace

    q = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    base = dict(q=q, return_weights=False, shape=(1, 8, 8, 16384, 16384, 64), softcap=None, dropout_p=0.0,
                mask=None, mask_tensor=None, plain_causal=False, bias=None, bias_tensor=None)
    return SimpleNamespace(**{**base, **kw})


def test_cuda_column_of_the_decision_table():
    """Measured on an H200 (docs/performance.md, CUDA): flex first for structured masks, then sdpa
    with a materialised mask (blockwise's tile math is 8-300x sdpa there), blockwise last."""
    from attnkit.dispatch import auto_order

    window = M.sliding_window(255)
    assert auto_order(_cuda_call(mask=window))[:3] == ["flex", "sdpa", "blockwise"]
    assert auto_order(_cuda_call(mask=window, softcap=30.0))[:2] == ["flex", "blockwise"]
    assert auto_order(_cuda_call(mask=M.causal(), plain_causal=True))[0] == "sdpa"
    assert auto_order(_cuda_call(mask=window, shape=(1, 1, 1, 16, 16, 8)))[:2] == ["sdpa", "flex"]
    assert auto_order(_cuda_call(return_weights=True)) == ["reference"]
