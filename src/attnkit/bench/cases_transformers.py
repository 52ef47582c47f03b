"""Bench cases, family "transformers": a padded prefill through a Hugging Face model.

Legend: B batch, N prompt length, H query heads, D head dim (from BenchShape); the model has
hidden size E = H * D, H / 4 key/value heads, 2 layers, MLP width 8E/3 rounded to 64, vocabulary
1024, random init from config (nothing is downloaded).

Variants (the same batch for every impl): B prompts of N tokens, the last row left-padded by 25%
(N / 4 pad tokens), position ids from the mask as ``generate`` makes them.
- llama_pad: Llama (full causal attention).
- mistral_swa4096_pad: Mistral with sliding_window=4096 (``masks.sliding_window(4095)`` in attnkit).

Impls: ``attn_implementation`` of the same model: attnkit.auto (``attnkit.integrations.
transformers.register()``, backend auto), sdpa (HF builds a (B, 1, N, N) bool mask and passes it
to torch's SDPA), eager (HF's matmul + softmax: B x H x N x N float32 scores).

Modes: "fwd" = the prefill, ``model(ids, attention_mask=, position_ids=, logits_to_keep=1)``
under no_grad (a DynamicCache is filled, as generate's first step does); "bwd" = forward without
cache and backward of the last logits' sum. Peak RSS is the whole process (weights, libraries, the
step); each task runs in its own process (``attnkit bench`` does that).
"""

from __future__ import annotations

import importlib.util

import torch

from .registry import BenchCase, BenchShape, make_step, register

FAMILY = "transformers"
VARIANTS = ("llama_pad", "mistral_swa4096_pad")
IMPLS = {"attnkit.auto": "attnkit", "sdpa": "sdpa", "eager": "eager"}
LAYERS = 2
DENSE_LIMIT_BYTES = 6 << 30  # eager and sdpa are skipped above this many bytes of N x N tensors


def _available(impl: str):
    def avail(shape: BenchShape, mode: str) -> str | None:
        if importlib.util.find_spec("transformers") is None:
            return "not installed (pip install 'attnkit[transformers]')"
        n2 = shape.B * shape.N * shape.N
        if impl == "eager":  # scores, softmax in float32 and its cast, per layer alive at once
            need = n2 * shape.H * 4 * (2 if mode == "fwd" else 4) + n2 * 4
            if need > DENSE_LIMIT_BYTES:
                return f"skipped: eager materialises B x H x N x N float32 scores, ~{need / 2**30:.0f} GiB"
        if impl == "sdpa":  # HF's (B, 1, N, N) bool mask and torch's float copy of it
            need = n2 * (1 + 4)
            if need > DENSE_LIMIT_BYTES:
                return f"skipped: the (B, 1, N, N) mask and its float copy need ~{need / 2**30:.0f} GiB"
        return None
    return avail


def build_model(variant: str, shape: BenchShape, impl: str):
    """The random-init model of a variant, in shape.dtype, eval mode."""
    import transformers

    if IMPLS[impl] == "attnkit":
        from ..integrations.transformers import register

        register()
    E = shape.H * shape.D
    common = dict(vocab_size=1024, hidden_size=E, intermediate_size=(8 * E // 3 + 63) // 64 * 64,
                  num_hidden_layers=LAYERS, num_attention_heads=shape.H, num_key_value_heads=max(1, shape.H // 4),
                  max_position_embeddings=max(shape.N, 4096))
    if variant == "llama_pad":
        cfg = transformers.LlamaConfig(**common)
    elif variant == "mistral_swa4096_pad":
        cfg = transformers.MistralConfig(**common, sliding_window=4096)
    else:
        raise ValueError(f"unknown transformers bench variant {variant!r}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=IMPLS[impl])
    return model.to(shape.dtype).eval()


def padded_batch(shape: BenchShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, N), attention_mask (B, N) with the last row 25% left-padded, position_ids (B, N)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1024, (shape.B, shape.N), generator=g)
    am = torch.ones(shape.B, shape.N, dtype=torch.long)
    am[-1, : shape.N // 4] = 0
    ids[am == 0] = 0
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    return ids, am, pos


def _make(variant: str, impl: str):
    def make(shape: BenchShape, mode: str):
        model = build_model(variant, shape, impl)
        ids, am, pos = padded_batch(shape)
        params = [p for p in model.parameters()]
        if mode == "fwd":
            return make_step(lambda: model(ids, attention_mask=am, position_ids=pos, logits_to_keep=1).logits,
                             params, mode)
        return make_step(lambda: model(ids, attention_mask=am, position_ids=pos, logits_to_keep=1,
                                       use_cache=False).logits, params, mode)
    return make


for _v in VARIANTS:
    for _impl in IMPLS:
        register(BenchCase(FAMILY, _v, _impl, _make(_v, _impl), available=_available(_impl)))
