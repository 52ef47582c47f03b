"""Pre-norm Transformer blocks and embeddings shared by the reference models.

Legend: B batch, N tokens, E d_model, F d_ff, V vocab size, Nc context (encoder) length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.mha import MultiHeadAttention
from ..positions import absolute as A
from .config import LayerSpec, TransformerConfig


def check_token_ids(name: str, tokens: torch.Tensor, vocab_size: int) -> None:
    """Token ids must lie in [0, vocab_size) (an embedding lookup would raise an IndexError)."""
    if tokens.numel():
        lo, hi = (int(x) for x in torch.aminmax(tokens))
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size}) "
                             f"(vocab_size={vocab_size})")


class Embedder(nn.Module):
    """Token embedding (V, E) plus an optional absolute position embedding at ``offset``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.pos = None
        if cfg.abs_position is not None:
            self.pos = (A.LearnedPositionalEmbedding(cfg.max_len, cfg.d_model) if cfg.abs_position == "learned"
                        else A.SinusoidalPositionalEmbedding(cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor (B, N), got {got}")
        check_token_ids("tokens", tokens, self.tok.num_embeddings)
        h = self.tok(tokens)  # (B, N, E)
        if self.pos is not None:
            h = self.pos(h, offset=offset, positions=positions)
        return self.drop(h)


class FeedForward(nn.Sequential):
    def __init__(self, cfg: TransformerConfig):
        super().__init__(nn.Linear(cfg.d_model, cfg.ff_dim), nn.GELU(), nn.Linear(cfg.ff_dim, cfg.d_model),
                         nn.Dropout(cfg.dropout))


class Block(nn.Module):
    """x + attn(ln(x)) [+ cross(ln(x), context)] + ffn(ln(x)); pre-norm (GPT-2 / T5 style)."""

    def __init__(self, cfg: TransformerConfig, spec: LayerSpec, *, cross=None):
        super().__init__()
        E, H = cfg.d_model, cfg.num_heads
        self.ln1 = nn.LayerNorm(E)
        self.attn = MultiHeadAttention(E, H, num_kv_heads=cfg.num_kv_heads, attention=spec.attention,
                                       position=spec.position)
        self.cross = None
        if cross is not None:
            self.ln_c = nn.LayerNorm(E)
            self.cross = MultiHeadAttention(E, H, num_kv_heads=cfg.num_kv_heads, attention=cross)
        self.ln2 = nn.LayerNorm(E)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, *, key_padding_mask=None, cache=None, context=None, context_padding_mask=None,
                cross_cache=None, context_parallel=None):
        x = x + self.drop(self.attn(self.ln1(x), key_padding_mask=key_padding_mask, cache=cache,
                                    context_parallel=context_parallel))  # (B, N, E)
        if self.cross is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass context (the encoder output)")
            x = x + self.drop(self.cross(self.ln_c(x), context=context, key_padding_mask=context_padding_mask,
                                         cache=cross_cache))
        return x + self.ffn(self.ln2(x))


def check_sampling(temperature, top_k) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Next token (B,) from logits (B, V): greedy when temperature == 0, else top-k sampling."""
    check_sampling(temperature, top_k)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_generate_args(max_new_tokens, temperature, top_k) -> None:
    """The arguments every ``generate`` shares, checked before any work."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k)


__all__ = ["Embedder", "FeedForward", "Block", "sample_next", "check_token_ids", "check_generate_args"]
