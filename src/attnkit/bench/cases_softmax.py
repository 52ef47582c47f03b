"""Bench cases, family "softmax": exact attention on the same masks through attnkit and peers.

Legend: B batch, H heads, N sequence length (Nq = Nk), D head dim (from BenchShape).

Variants (what is computed; the same mask/bias for every impl):
- dense, causal: no mask / the causal mask.
- swa256: causal sliding window, 256 keys back (``sliding_window(256)``: 257 keys incl. itself).
- docmask: packed documents (lengths cycling 512, 1536, 1024, 768, 1280) & causal.
- blocksparse: 128-blocks, tridiagonal + first column + 5% random blocks (seeded), bidirectional.
- float_bias: a dense (1, 1, N, N) float bias tensor (no mask).
- causal_biasspec: causal + ``biases.from_function(-0.01 * (i - j))`` (an ALiBi-like bias spec).

Impls: attnkit.auto / attnkit.blockwise / attnkit.reference (``attnkit.attention`` with that
backend), sdpa (torch's F.scaled_dot_product_attention: is_causal for causal, otherwise the
equivalent dense bool mask / float bias, built outside the timed step), flex (torch's
create_block_mask(_compile=True) + torch.compile(flex_attention) with plain mask_mod / score_mod
functions on index tensors, as flex's docs write them (``flex_mods``); the first call's compile is
reported separately as "first call"), local-attention (lucidrains' LocalAttention, exact 256-key
causal window) for swa256.

Modes: "fwd" = forward under no_grad; "bwd" = forward + backward of out.sum().
Useful FLOPs: 4 * B * H * D * (allowed pairs) forward; 3.5x that for forward + backward.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .. import biases, masks
from ..functional import attention
from .registry import BenchCase, BenchShape, make_step, random_qkv, register

FAMILY = "softmax"
DENSE_LIMIT_BYTES = 6 << 30  # skip impls that would materialise more than this


# -- workloads ----------------------------------------------------------------------------------


def _doc_ids(N: int) -> torch.Tensor:
    lengths, ids, pos, d = (512, 1536, 1024, 768, 1280), [], 0, 0
    while pos < N:
        n = min(lengths[d % len(lengths)], N - pos)
        ids += [d] * n
        pos, d = pos + n, d + 1
    return torch.tensor(ids)


def _layout(N: int, bs: int = 128) -> torch.Tensor:
    T = -(-N // bs)
    g = torch.Generator().manual_seed(0)
    i = torch.arange(T)
    lay = ((i.view(-1, 1) - i.view(1, -1)).abs() <= 1) | (i.view(1, -1) == 0)
    return lay | (torch.rand(T, T, generator=g) < 0.05)


@functools.lru_cache(maxsize=8)
def specs(variant: str, N: int):
    """(mask spec or None, bias spec or None) of a variant at length N."""
    if variant == "dense":
        return None, None
    if variant == "causal":
        return masks.causal(), None
    if variant == "swa256":
        return masks.sliding_window(256), None
    if variant == "docmask":
        return masks.document(_doc_ids(N)) & masks.causal(), None
    if variant == "blocksparse":
        return masks.block_sparse(_layout(N), 128), None
    if variant == "causal_biasspec":
        return masks.causal(), biases.from_function(lambda b, h, i, j: -0.01 * (i - j).float(), name="linear_decay")
    if variant == "float_bias":
        return None, None
    raise ValueError(f"unknown softmax bench variant {variant!r}")


def allowed_pairs(variant: str, N: int) -> float:
    if variant in ("dense", "float_bias"):
        return float(N * N)
    if variant in ("causal", "causal_biasspec"):
        return N * (N + 1) / 2
    if variant == "swa256":
        w = min(257, N)
        return float(N * w - w * (w - 1) / 2)
    if variant == "docmask":
        counts = torch.bincount(_doc_ids(N)).double()
        return float((counts * (counts + 1) / 2).sum())
    if variant == "blocksparse":
        return float(masks.block_sparse(_layout(N), 128).to_dense(N).sum())
    raise ValueError(variant)


def _flops(variant):
    def f(shape: BenchShape, mode: str) -> float:
        fwd = 4.0 * shape.B * shape.H * shape.D * allowed_pairs(variant, shape.N)
        return fwd * (3.5 if mode == "bwd" else 1.0)
    return f


def _float_bias(shape: BenchShape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 1, shape.N, shape.N, generator=g).to(shape.dtype)


# -- attnkit ------------------------------------------------------------------------------------


def _make_attnkit(variant: str, backend: str):
    def make(shape: BenchShape, mode: str):
        q, k, v = random_qkv(shape, mode == "bwd")
        mask, bias = specs(variant, shape.N)
        if variant == "float_bias":
            bias = _float_bias(shape)
        return make_step(lambda: attention(q, k, v, mask=mask, bias=bias, backend=backend), (q, k, v), mode)
    return make


def _reference_available(shape: BenchShape, mode: str):
    need = shape.B * shape.H * shape.N * shape.N * 4 * (3 if mode == "fwd" else 6)
    if need > DENSE_LIMIT_BYTES:
        return f"skipped: materialises ~{need / 2**30:.0f} GiB"
    return None


# -- torch SDPA ---------------------------------------------------------------------------------


def _sdpa_available(variant):
    def avail(shape: BenchShape, mode: str):
        if variant in ("dense", "causal"):
            return None
        per = 1 if variant in ("swa256", "docmask", "blocksparse") else 4  # bool vs float mask bytes
        need = shape.N * shape.N * per * (1 if mode == "fwd" else 3)
        if need > DENSE_LIMIT_BYTES:
            return f"skipped: the dense mask/bias needs ~{need / 2**30:.0f} GiB"
        return None
    return avail


def _make_sdpa(variant: str):
    def make(shape: BenchShape, mode: str):
        F = torch.nn.functional
        q, k, v = random_qkv(shape, mode == "bwd")
        N = shape.N
        kwargs = {}
        if variant == "causal":
            kwargs["is_causal"] = True
        elif variant == "float_bias":
            kwargs["attn_mask"] = _float_bias(shape)
        elif variant == "causal_biasspec":
            mask, bias = specs(variant, N)
            dense = bias.to_dense(N, N, dtype=shape.dtype)
            kwargs["attn_mask"] = dense.masked_fill(~mask.to_dense(N, N), float("-inf"))
        elif variant != "dense":
            kwargs["attn_mask"] = specs(variant, N)[0].to_dense(N, N)  # (1, 1, N, N) bool
        return make_step(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs), (q, k, v), mode)
    return make


# -- compiled flex ------------------------------------------------------------------------------


def _flex_available(shape: BenchShape, mode: str):
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return "not installed (torch without flex_attention)"
    if mode == "bwd" and not torch.cuda.is_available():
        return "no CPU backward"
    return None


def flex_mods(variant: str, N: int, dtype=torch.float32):
    """(mask_mod or None, score_mod or None) written the way flex's docs do: plain functions of
    the index tensors (b, h, q_idx, kv_idx), reading only plain tensors (document ids, the block
    layout, the bias matrix), never attnkit's specs."""
    mask_mod = score_mod = None
    if variant in ("causal", "causal_biasspec"):
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    elif variant == "swa256":
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= 256)
    elif variant == "docmask":
        doc = _doc_ids(N)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    elif variant == "blocksparse":
        layout = _layout(N)

        def mask_mod(b, h, q_idx, kv_idx):
            return layout[q_idx // 128, kv_idx // 128]
    if variant == "causal_biasspec":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score - 0.01 * (q_idx - kv_idx)
    elif variant == "float_bias":
        t = _float_bias(BenchShape(N=N, dtype=dtype))[0, 0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + t[q_idx, kv_idx]
    return mask_mod, score_mod


def _make_flex(variant: str):
    def make(shape: BenchShape, mode: str):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = random_qkv(shape, mode == "bwd")
        mask_mod, score_mod = flex_mods(variant, shape.N, shape.dtype)
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, None, None, shape.N, shape.N, device=q.device, _compile=True)
        fn = torch.compile(flex_attention, dynamic=False)
        return make_step(lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask), (q, k, v), mode)
    return make


# -- lucidrains local-attention -----------------------------------------------------------------


def _local_available(shape: BenchShape, mode: str):
    if importlib.util.find_spec("local_attention") is None:
        return "not installed (pip install local-attention)"
    return None


def _make_local(shape: BenchShape, mode: str):
    from local_attention import LocalAttention

    q, k, v = random_qkv(shape, mode == "bwd")
    # exact_windowsize: keys with 0 <= i - j <= 256, i.e. attnkit's sliding_window(256).
    mod = LocalAttention(window_size=256, causal=True, look_backward=1, look_forward=0, exact_windowsize=True,
                         use_rotary_pos_emb=False, autopad=True, dim=shape.D)
    return make_step(lambda: mod(q, k, v), (q, k, v), mode)


# -- registration -------------------------------------------------------------------------------

VARIANTS = ("dense", "causal", "swa256", "docmask", "blocksparse", "float_bias", "causal_biasspec")

for _v in VARIANTS:
    for _b in ("auto", "blockwise"):
        register(BenchCase(FAMILY, _v, f"attnkit.{_b}", _make_attnkit(_v, _b), flops=_flops(_v)))
    register(BenchCase(FAMILY, _v, "sdpa", _make_sdpa(_v), available=_sdpa_available(_v), flops=_flops(_v)))
    register(BenchCase(FAMILY, _v, "flex", _make_flex(_v), available=_flex_available, flops=_flops(_v)))
for _v in ("dense", "causal"):
    register(BenchCase(FAMILY, _v, "attnkit.reference", _make_attnkit(_v, "reference"),
                       available=_reference_available, flops=_flops(_v)))
register(BenchCase(FAMILY, "swa256", "local-attention", _make_local, available=_local_available,
                   flops=_flops("swa256")))
