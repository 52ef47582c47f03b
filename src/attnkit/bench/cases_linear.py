"""Bench cases, family "longrange": additive, linear (elu+1) and Performer FAVOR+, and the peers
performer-pytorch and flash-linear-attention's pure-PyTorch chunked form (``fla.naive_chunk``:
``naive_chunk_linear_attn`` from fla-core, loaded from its file because ``fla.ops`` imports Triton)
on the same shapes and the same elu+1 features.

Legend: B batch, H heads, N sequence length, D head dim (from BenchShape), A = D attention dim
of additive attention, m = 256 random features. Inputs are built in make(), outside the timed step.
Modes: "fwd" (forward) and "bwd" (forward + backward of out.sum()).
"""

from __future__ import annotations

import importlib.util

import torch

from ..variants.additive import additive_attention
from ..variants.linear import linear_attention
from ..variants.performer import draw_favor_projection, performer_attention
from .registry import BenchCase, BenchShape, make_step, random_qkv, register

M_FEATURES = 256
FAMILY = "longrange"


def _make_additive(shape: BenchShape, mode: str):
    q, k, v = random_qkv(shape, mode == "bwd")
    g = torch.Generator().manual_seed(1)
    H, D = shape.H, shape.D
    w_q = (torch.randn(H, D, D, generator=g) / D ** 0.5).to(shape.dtype).requires_grad_(mode == "bwd")
    w_k = (torch.randn(H, D, D, generator=g) / D ** 0.5).to(shape.dtype).requires_grad_(mode == "bwd")
    v_a = (torch.randn(H, D, generator=g) / D ** 0.5).to(shape.dtype).requires_grad_(mode == "bwd")
    return make_step(lambda: additive_attention(q, k, v, w_q, w_k, v_a), [q, k, v, w_q, w_k, v_a], mode)


def _make_linear(causal: bool):
    def make(shape: BenchShape, mode: str):
        q, k, v = random_qkv(shape, mode == "bwd")
        return make_step(lambda: linear_attention(q, k, v, causal=causal), [q, k, v], mode)
    return make


def _projection(shape: BenchShape):
    return draw_favor_projection(M_FEATURES, shape.D, generator=torch.Generator().manual_seed(2))


def _make_performer(causal: bool):
    def make(shape: BenchShape, mode: str):
        q, k, v = random_qkv(shape, mode == "bwd")
        w = _projection(shape)
        return make_step(lambda: performer_attention(q, k, v, projection=w, causal=causal), [q, k, v], mode)
    return make


def _peer_available(shape: BenchShape, mode: str) -> str | None:
    return None if importlib.util.find_spec("performer_pytorch") else "not installed (pip install performer-pytorch)"


def _make_peer_performer(causal: bool):
    def make(shape: BenchShape, mode: str):
        import contextlib
        import io

        from performer_pytorch import FastAttention
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice when its CUDA kernel is missing
            fa = FastAttention(dim_heads=shape.D, nb_features=M_FEATURES, causal=causal)
        fa.projection_matrix.copy_(_projection(shape))
        q, k, v = random_qkv(shape, mode == "bwd")
        return make_step(lambda: fa(q, k, v), [q, k, v], mode)
    return make


def fla_naive_chunk():
    """fla-core's ``naive_chunk_linear_attn`` (pure PyTorch, 64-token chunks), or None when fla-core
    is not installed. Loaded from its file: importing ``fla.ops`` needs Triton, this file does not."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", "linear_attn", "naive.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("attnkit_bench_fla_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.naive_chunk_linear_attn


def _fla_available(shape: BenchShape, mode: str) -> str | None:
    if fla_naive_chunk() is None:
        return "not installed (pip install fla-core)"
    return None if shape.N % 64 == 0 else "fla's naive chunked form needs N % 64 == 0"


def _make_fla_linear(shape: BenchShape, mode: str):
    """Causal elu+1 linear attention through fla's chunked form: the same features as attnkit's
    default (elu(x) + 1, computed in the step), normalize=True; its layout is (B, T, H, D)."""
    from ..variants.linear import elu_plus_one

    fn = fla_naive_chunk()
    q, k, v = random_qkv(shape, mode == "bwd")

    def run():
        pq, pk = (elu_plus_one(x).transpose(1, 2) for x in (q, k))  # (B, N, H, D)
        return fn(pq, pk, v.transpose(1, 2), normalize=True).transpose(1, 2)  # (B, H, N, D)
    return make_step(run, [q, k, v], mode)


def _flops_linear(F: int, causal: bool, projection: bool, chunk: int = 64):
    """Matmul FLOPs: 4 N F Dv (k^T v, q S) + 2 N F (normaliser); causal adds 2 N C (F + Dv) inside
    chunks; Performer adds 4 N D F for W q and W k. Backward counted as twice the forward."""
    def flops(s: BenchShape, mode: str) -> float:
        f = 4 * F * s.D + 2 * F + (2 * chunk * (F + s.D) if causal else 0) + (4 * s.D * F if projection else 0)
        return s.B * s.H * s.N * f * (3.0 if mode == "bwd" else 1.0)
    return flops


def _flops_additive(s: BenchShape, mode: str) -> float:
    """Per (i, j) pair: A adds, A tanh, 2A for v_a, 4 Dv for softmax-weighted values (counting tanh as 1)."""
    f = s.B * s.H * s.N * s.N * (4 * s.D + 4 * s.D)
    return f * (3.5 if mode == "bwd" else 1.0)


CASES = [
    register(BenchCase(FAMILY, "additive", "attnkit.additive", _make_additive, flops=_flops_additive)),
    register(BenchCase(FAMILY, "linear_causal", "attnkit.linear", _make_linear(True),
                       flops=_flops_linear(64, True, False))),
    register(BenchCase(FAMILY, "linear_causal", "fla.naive_chunk", _make_fla_linear, available=_fla_available,
                       flops=_flops_linear(64, True, False))),
    register(BenchCase(FAMILY, "linear_noncausal", "attnkit.linear", _make_linear(False),
                       flops=_flops_linear(64, False, False))),
    register(BenchCase(FAMILY, f"performer_m{M_FEATURES}_causal", "attnkit.performer", _make_performer(True),
                       flops=_flops_linear(M_FEATURES, True, True, chunk=128))),
    register(BenchCase(FAMILY, f"performer_m{M_FEATURES}_noncausal", "attnkit.performer", _make_performer(False),
                       flops=_flops_linear(M_FEATURES, False, True))),
    register(BenchCase(FAMILY, f"performer_m{M_FEATURES}_causal", "performer-pytorch", _make_peer_performer(True),
                       available=_peer_available, flops=_flops_linear(M_FEATURES, True, True, chunk=128))),
    register(BenchCase(FAMILY, f"performer_m{M_FEATURES}_noncausal", "performer-pytorch", _make_peer_performer(False),
                       available=_peer_available, flops=_flops_linear(M_FEATURES, False, True))),
]
