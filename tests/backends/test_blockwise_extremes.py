"""Blockwise at the edges small tests miss: float32 scores past exp's overflow (about 88), in
both engines, and N = 16384 against sdpa for every structured mask, forward and backward (slow:
runs in CI).

Only the public entry points are used (``attnkit.attention(..., backend="blockwise")`` and
``blockwise_attention(..., options=BlockwiseOptions(fused=False))`` for the tile-math engine,
which the default CPU call no longer reaches), so a rewrite of the kernels keeps these tests.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit.backends.blockwise import BlockwiseOptions, blockwise_attention
from tests.tolerances import tol

F32, F64 = torch.float32, torch.float64


def _rows_with_norm(g, shape, norm):
    x = torch.randn(*shape, generator=g, dtype=F64)
    return (x / x.norm(dim=-1, keepdim=True) * norm).to(F32)


ENGINES = {  # the default call (torch's CPU flash kernel on rectangles) and the tile math
    "fused": lambda q, k, v, mask: attnkit.attention(q, k, v, mask=mask, backend="blockwise"),
    "tiles": lambda q, k, v, mask: blockwise_attention(q, k, v, mask=mask, options=BlockwiseOptions(fused=False)),
}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("mask", [None, M.causal(), M.sliding_window(40, 5)], ids=repr)
@pytest.mark.parametrize("peak", [60.0, 150.0, 280.0])
def test_float32_scores_beyond_exp_overflow(peak, mask, engine):
    """|scale q.k| reaches ``peak`` (exp(88.7) overflows float32): blockwise must shift by the
    row max there (the tile math's shift-free path is only for bounds <= 30), and match the
    float64 reference in output and gradients."""
    g = torch.Generator().manual_seed(int(peak))
    B, H, N, D = 1, 2, 300, 8
    scale = D ** -0.5
    q = _rows_with_norm(g, (B, H, N, D), (peak / scale) ** 0.5).requires_grad_()
    k = _rows_with_norm(g, (B, H, N, D), (peak / scale) ** 0.5).requires_grad_()
    v = torch.randn(B, H, N, D, generator=g).requires_grad_()
    s = (q.detach().double() @ k.detach().double().transpose(-1, -2)) * scale
    assert float(s.abs().max()) > 0.8 * peak  # the scores really are that large
    out = ENGINES[engine](q, k, v, mask)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attnkit.attention(*ref_in, mask=mask, backend="reference")
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), ref, **tol(F32, "blockwise"))
    dout = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, ref_in, dout.double())):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.double(), b, **tol(F32, "blockwise", grad=True))


# ---------------------------------------------------------------------------------------------
# N = 16384 (the benchmark's largest N) against torch's sdpa, every structured mask
# ---------------------------------------------------------------------------------------------

N_LARGE = 16384


def _bench_doc_ids(n: int) -> torch.Tensor:
    from attnkit.bench.cases_softmax import _doc_ids

    return _doc_ids(n)


def _large_masks() -> dict:
    g = torch.Generator().manual_seed(0)
    nb = N_LARGE // 128
    layout = (torch.rand(nb, nb, generator=g) < 0.05) | torch.eye(nb, dtype=torch.bool)
    docs = torch.sort(torch.randint(0, 12, (N_LARGE,), generator=g)).values  # packed sequences
    return {
        "causal": M.causal(),
        "sliding_window": M.sliding_window(256),
        "longformer": M.sliding_window(64, 64) | M.global_tokens(torch.tensor([0, 5000, 16383])),
        "dilated": M.dilated(64, 4),
        "child_strided": M.sliding_window(128) | M.strided(128),
        "child_fixed": M.fixed(128, 16),
        "block_sparse": M.block_sparse(layout, 128),
        "bigbird": M.bigbird(64, 3, 2, 2, seed=1),
        "document_causal": M.document(docs) & M.causal(),
        "document_bench": M.document(_bench_doc_ids(N_LARGE)) & M.causal(),  # equal documents batched
        "prefix_lm": M.prefix_lm(3000),
        "causal_and_padding": M.causal() & M.key_padding(torch.tensor([12000])),
    }


def _dense_rows(mask, n: int, rows: int = 512) -> torch.Tensor:
    """(n, n) bool from the spec's vectorised ``allows``, built in row blocks (the whole index
    grid at once would need several GiB)."""
    out = torch.empty(n, n, dtype=torch.bool)
    z = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    k = torch.arange(n).view(1, 1, 1, -1)
    for r0 in range(0, n, rows):
        q = torch.arange(r0, min(n, r0 + rows)).view(1, 1, -1, 1)
        allowed = mask.allows(z, z, q, k, num_keys=n)
        out[r0:r0 + q.shape[2]] = torch.broadcast_to(allowed, (1, 1, q.shape[2], n))[0, 0]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(_large_masks()))
def test_blockwise_equals_sdpa_at_n16384(kind):
    """Forward and backward at N = 16384 (one head, float32) against
    torch.nn.functional.scaled_dot_product_attention with the dense mask (is_causal for plain
    causal). Bugs that need many tiles per row (index overflow, tile sorting) only show here."""
    mask = _large_masks()[kind]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, N_LARGE, 16, generator=g).requires_grad_() for _ in range(3))
    out = attnkit.attention(q, k, v, mask=mask, backend="blockwise")
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    if kind == "causal":
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        dense = _dense_rows(mask, N_LARGE)
        assert bool(dense.any(-1).all())  # no fully masked rows: torch's result is defined everywhere
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        del dense
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    tb, ts = tol(F32, "blockwise"), tol(F32, "sdpa")  # two float32 results: their errors add
    both = {"atol": tb["atol"] + ts["atol"], "rtol": tb["rtol"] + ts["rtol"]}
    tbg, tsg = tol(F32, "blockwise", grad=True), tol(F32, "sdpa", grad=True)
    both_g = {"atol": tbg["atol"] + tsg["atol"], "rtol": tbg["rtol"] + tsg["rtol"]}
    torch.testing.assert_close(out, want, **both, msg=lambda m: f"{kind} output: {m}")
    for name, a, b in zip("qkv", grads, want_grads):
        torch.testing.assert_close(a, b, **both_g, msg=lambda m, name=name: f"{kind} grad {name}: {m}")
