"""Bench cases, family "positions": ALiBi (causal) and T5 buckets (bidirectional, scale 1) through
``attnkit.attention`` with backend "auto"; Shaw relative K/V and Transformer-XL (memory = one
segment) through their own chunked functions; and the peers on the same work: compiled flex
attention with the same score_mod, and transformers' T5 (compute_bias + eager attention).

Legend: B batch, H heads, N sequence length, D head dim (from BenchShape). Inputs are built in
make(), outside the timed step. Modes: "fwd" (forward under no_grad) and "bwd" (forward +
backward of out.sum(), including the gradient of T5's table).
"""

from __future__ import annotations

import importlib.util

import torch

from .. import masks
from ..functional import attention, which_backend
from ..positions import ALiBi, T5RelativeBias, alibi_slopes, shaw_attention, t5_relative_bucket, xl_attention
from ..positions.xl import xl_distances, xl_sinusoid
from .registry import BenchCase, BenchShape, make_step, random_qkv, register

FAMILY = "positions"
SHAW_K = 16
REFERENCE_BYTES_LIMIT = 4 << 30  # refuse to time a path that would materialise more than this


# -- attnkit ------------------------------------------------------------------------------------


def _alibi_args(shape: BenchShape):
    return dict(bias=ALiBi(shape.H), mask=masks.causal())


def _make_alibi(shape: BenchShape, mode: str):
    q, k, v = random_qkv(shape, mode == "bwd")
    args = _alibi_args(shape)
    return make_step(lambda: attention(q, k, v, **args), [q, k, v], mode)


def _make_t5(shape: BenchShape, mode: str):
    q, k, v = random_qkv(shape, mode == "bwd")
    t5 = T5RelativeBias(shape.H, init_std=1.0).to(shape.dtype)
    return make_step(lambda: attention(q, k, v, bias=t5.spec(), scale=1.0), [q, k, v, t5.weight], mode)


def _auto_available(args_fn):
    """Refuse (with the reason) when ``auto`` would pick the O(N^2)-memory reference at this size."""
    def available(shape: BenchShape, mode: str) -> str | None:
        q = torch.empty(shape.B, shape.H, shape.N, shape.D, dtype=shape.dtype)
        name = which_backend(q, q, q, **args_fn(shape))
        need = 3 * shape.B * shape.H * shape.N * shape.N * 4
        if name == "reference" and need > REFERENCE_BYTES_LIMIT:
            return f"auto picks the reference backend here (O(N^2) memory, ~{need / 2**30:.0f} GiB)"
        return None
    return available


def _make_shaw(shape: BenchShape, mode: str):
    q, k, v = random_qkv(shape, mode == "bwd")
    g = torch.Generator().manual_seed(1)
    rel = [(0.02 * torch.randn(2 * SHAW_K + 1, shape.D, generator=g)).to(shape.dtype).requires_grad_(mode == "bwd")
           for _ in range(2)]
    return make_step(lambda: shaw_attention(q, k, v, rel[0], rel[1], mask=masks.causal()), [q, k, v, *rel], mode)


def _make_xl(shape: BenchShape, mode: str):
    """Segment of N queries over memory of N plus the segment (Nk = 2N), causal."""
    grad = mode == "bwd"
    q, k, v = random_qkv(shape, grad, nk=2 * shape.N)
    g = torch.Generator().manual_seed(2)
    H, D, N = shape.H, shape.D, shape.N
    w_r = (torch.randn(H * D, H * D, generator=g) / (H * D) ** 0.5).to(shape.dtype).requires_grad_(grad)
    u, vb = ((0.02 * torch.randn(H, D, generator=g)).to(shape.dtype).requires_grad_(grad) for _ in range(2))
    R = xl_sinusoid(xl_distances(N, 2 * N), H * D, dtype=shape.dtype)  # (L, E)

    def run():
        r = (R @ w_r.t()).view(-1, H, D).transpose(0, 1)  # (H, L, D)
        return xl_attention(q, k, v, r, r_w_bias=u, r_r_bias=vb, mask=masks.causal())
    return make_step(run, [q, k, v, w_r, u, vb], mode)


# -- peers --------------------------------------------------------------------------------------


def _flex_available(shape: BenchShape, mode: str) -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return "flex_attention not in this torch"
    if mode == "bwd" and not torch.cuda.is_available():
        return "no CPU backward"
    if shape.dtype != torch.float32:
        return "compiled flex on CPU: float32 only here"
    return None


def _make_flex(kind: str):
    def make(shape: BenchShape, mode: str):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = random_qkv(shape, mode == "bwd")
        N, H = shape.N, shape.H
        if kind == "alibi":
            slopes = alibi_slopes(H)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + slopes[h] * (kv_idx - q_idx)

            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, N, N,
                                           device=str(q.device))
            scale = None
        else:
            table = T5RelativeBias(H, init_std=1.0).weight.detach()
            rel_bucket = t5_relative_bucket(torch.arange(-(N - 1), N))  # bucket of r = k - q, index r + N - 1

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + table[rel_bucket[kv_idx - q_idx + N - 1], h]

            block_mask, scale = None, 1.0
        fn = torch.compile(flex_attention, dynamic=False)
        call = lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
        with torch.no_grad():
            call()  # compile outside the timed step
        return make_step(call, [q, k, v], mode)
    return make


def _t5_peer_available(shape: BenchShape, mode: str) -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "not installed (pip install transformers)"
    need = 3 * shape.B * shape.H * shape.N * shape.N * 4
    if need > REFERENCE_BYTES_LIMIT:
        return f"eager T5 materialises the scores (~{need / 2**30:.0f} GiB)"
    return None


def _make_t5_peer(shape: BenchShape, mode: str):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention, eager_attention_forward

    H, D, N = shape.H, shape.D, shape.N
    cfg = T5Config(d_model=H * D, d_kv=D, num_heads=H, is_decoder=False, dropout_rate=0.0)
    cfg._attn_implementation = "eager"
    mod = T5Attention(cfg, has_relative_attention_bias=True).to(shape.dtype).eval()
    q, k, v = random_qkv(shape, mode == "bwd")

    def run():
        bias = mod.compute_bias(N, N, device=q.device)  # (1, H, N, N)
        return eager_attention_forward(mod, q, k, v, None, scaling=1.0, position_bias=bias)[0]
    return make_step(run, [q, k, v, mod.relative_attention_bias.weight], mode)


def _flops_attention(s: BenchShape, mode: str) -> float:
    """4 N^2 D per head (q.k and w.v); backward counted as 2.5x the forward."""
    f = 4.0 * s.B * s.H * s.N * s.N * s.D
    return f * (3.5 if mode == "bwd" else 1.0)


def _flops_causal(s: BenchShape, mode: str) -> float:
    return _flops_attention(s, mode) / 2


def _flops_shaw(s: BenchShape, mode: str) -> float:
    """Causal attention plus q.aK (2 N R D) and w_r.aV (2 N R D), R = 2K + 1."""
    extra = 4.0 * s.B * s.H * s.N * (2 * SHAW_K + 1) * s.D
    return _flops_causal(s, mode) + extra * (3.5 if mode == "bwd" else 1.0)


def _flops_xl(s: BenchShape, mode: str) -> float:
    """Nq = N over Nk = 2N (causal: about 3/4 of the pairs) plus the (q + v).r term on N + 2N - 1 rows."""
    f = s.B * s.H * s.N * (4.0 * 2 * s.N * s.D * 0.75 + 2.0 * 3 * s.N * s.D)
    return f * (3.5 if mode == "bwd" else 1.0)


CASES = [
    register(BenchCase(FAMILY, "alibi", "attnkit.auto", _make_alibi, available=_auto_available(_alibi_args),
                       flops=_flops_causal)),
    register(BenchCase(FAMILY, "t5bias", "attnkit.auto", _make_t5,
                       available=_auto_available(lambda s: dict(bias=T5RelativeBias(s.H).spec(), scale=1.0)),
                       flops=_flops_attention)),
    register(BenchCase(FAMILY, f"shaw_k{SHAW_K}", "attnkit.shaw", _make_shaw, flops=_flops_shaw)),
    register(BenchCase(FAMILY, "xl_mem", "attnkit.xl", _make_xl, flops=_flops_xl)),
    register(BenchCase(FAMILY, "alibi", "flex", _make_flex("alibi"), available=_flex_available, flops=_flops_causal)),
    register(BenchCase(FAMILY, "t5bias", "flex", _make_flex("t5"), available=_flex_available, flops=_flops_attention)),
    register(BenchCase(FAMILY, "t5bias", "transformers.t5_eager", _make_t5_peer, available=_t5_peer_available,
                       flops=_flops_attention)),
]
