"""Bench cases, family "longrange": Linformer (k=256), Nystromformer (m=256), Reformer LSH (8 rounds,
chunk 64), ours and the peers that implement the same thing.

Legend: B batch, H heads, N sequence, D head dim (BenchShape). Ours time the attention core on
(B, H, N, D) inputs. Peers: ``linformer`` and ``nystrom-attention`` only expose whole attention
layers, so their rows include the q/k/v/out linear maps (E = H * D; about 2 * 4 * N * E^2 FLOPs,
~8% of the step at N=16384); ``reformer-pytorch`` times ``LSHAttention`` on (B * H, N, D).
FLOPs count the matmuls of the attention core; "bwd" (forward + backward) counts 3x forward.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from ..variants.linformer import linformer_attention
from ..variants.lsh import lsh_attention
from ..variants.nystrom import nystrom_attention
from .registry import BenchCase, BenchShape, make_step, random_qkv, register

K_PROJ, LANDMARKS, HASHES, CHUNK = 256, 256, 8, 64


def _missing(module: str):
    return lambda shape, mode: None if importlib.util.find_spec(module) else f"{module} not installed"


def _mult(mode: str) -> float:
    return 3.0 if mode == "bwd" else 1.0


# --------------------------------------------------------------------------------------------- ours


def _make_linformer(shape: BenchShape, mode: str):
    q, k, v = random_qkv(shape, mode == "bwd")
    g = torch.Generator().manual_seed(1)
    b = 1.0 / math.sqrt(K_PROJ)  # the module's (and the peer's) init
    e, f = ((torch.rand(K_PROJ, shape.N, generator=g, dtype=shape.dtype) * 2 - 1) * b for _ in range(2))
    return make_step(lambda: linformer_attention(q, k, v, e, f), (), mode)


def _linformer_flops(shape: BenchShape, mode: str) -> float:
    B, H, N, D = shape.B, shape.H, shape.N, shape.D
    return _mult(mode) * B * H * (2 * 2 * K_PROJ * N * D + 2 * 2 * N * K_PROJ * D)


def _make_nystrom(shape: BenchShape, mode: str):
    q, k, v = random_qkv(shape, mode == "bwd")
    conv = torch.randn(shape.H, 33, generator=torch.Generator().manual_seed(1), dtype=shape.dtype) / 33  # peer's residual
    return make_step(lambda: nystrom_attention(q, k, v, num_landmarks=LANDMARKS, conv_kernel=conv), (), mode)


def _nystrom_flops(shape: BenchShape, mode: str) -> float:
    B, H, N, D, m = shape.B, shape.H, shape.N, shape.D, LANDMARKS
    core = 2 * N * m * D * 4 + 2 * m * m * D * 2 + 6 * 4 * 2 * m ** 3
    return _mult(mode) * B * H * core


def _lsh_maker(causal: bool):
    def make(shape: BenchShape, mode: str):
        qk, v = random_qkv(shape, mode == "bwd", n=2)
        return make_step(lambda: lsh_attention(qk, v, n_hashes=HASHES, bucket_size=CHUNK, causal=causal, seed=0), (), mode)
    return make


def _lsh_flops(shape: BenchShape, mode: str) -> float:
    B, H, N, D = shape.B, shape.H, shape.N, shape.D
    return _mult(mode) * B * H * HASHES * N * 2 * CHUNK * D * 2 * 2


def _needs_n(shape: BenchShape, n_min: int) -> str | None:
    return None if shape.N >= n_min else f"needs N >= {n_min}, got {shape.N}"


register(BenchCase("longrange", "linformer_k256", "attnkit.linformer", _make_linformer,
                   flops=_linformer_flops))
register(BenchCase("longrange", "nystrom_m256", "attnkit.nystrom", _make_nystrom,
                   available=lambda s, m: _needs_n(s, LANDMARKS), flops=_nystrom_flops))
register(BenchCase("longrange", "lsh_r8_c64", "attnkit.lsh", _lsh_maker(False), flops=_lsh_flops))
register(BenchCase("longrange", "lsh_causal_r8_c64", "attnkit.lsh", _lsh_maker(True), flops=_lsh_flops))


# -------------------------------------------------------------------------------------------- peers


def _x(shape: BenchShape, mode: str):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape.B, shape.N, shape.H * shape.D, generator=g, dtype=shape.dtype).requires_grad_(mode == "bwd")


def _make_peer_linformer(shape: BenchShape, mode: str):
    from linformer import LinformerSelfAttention

    mod = LinformerSelfAttention(shape.H * shape.D, shape.N, k=K_PROJ, heads=shape.H).to(shape.dtype)
    x = _x(shape, mode)
    return make_step(lambda: mod(x), (), mode)


def _make_peer_nystrom(shape: BenchShape, mode: str):
    from nystrom_attention import NystromAttention

    mod = NystromAttention(shape.H * shape.D, dim_head=shape.D, heads=shape.H, num_landmarks=LANDMARKS,
                           pinv_iterations=6, residual=True).to(shape.dtype)
    x = _x(shape, mode)
    return make_step(lambda: mod(x), (), mode)


def _peer_lsh_maker(causal: bool):
    def make(shape: BenchShape, mode: str):
        from reformer_pytorch.reformer_pytorch import LSHAttention

        mod = LSHAttention(bucket_size=CHUNK, n_hashes=HASHES, causal=causal)
        qk, v = (t.reshape(shape.B * shape.H, shape.N, shape.D) for t in random_qkv(shape, False, n=2))
        qk, v = qk.requires_grad_(mode == "bwd"), v.requires_grad_(mode == "bwd")
        return make_step(lambda: mod(qk, v)[0], (), mode)
    return make


def _peer_lsh_available(shape: BenchShape, mode: str) -> str | None:
    if importlib.util.find_spec("reformer_pytorch") is None:
        return "reformer_pytorch not installed"
    if shape.N % (2 * CHUNK):
        return f"reformer-pytorch needs N divisible by 2 * bucket_size = {2 * CHUNK}, got {shape.N}"
    return None


register(BenchCase("longrange", "linformer_k256", "linformer", _make_peer_linformer,
                   available=_missing("linformer"), flops=_linformer_flops))
register(BenchCase("longrange", "nystrom_m256", "nystrom-attention", _make_peer_nystrom,
                   available=lambda s, m: _missing("nystrom_attention")(s, m) or _needs_n(s, LANDMARKS),
                   flops=_nystrom_flops))
register(BenchCase("longrange", "lsh_r8_c64", "reformer-pytorch", _peer_lsh_maker(False),
                   available=_peer_lsh_available, flops=_lsh_flops))
register(BenchCase("longrange", "lsh_causal_r8_c64", "reformer-pytorch", _peer_lsh_maker(True),
                   available=_peer_lsh_available, flops=_lsh_flops))
