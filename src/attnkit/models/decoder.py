"""Decoder-only language model (GPT-like, pre-norm) with cached incremental generation.

Legend: B batch, N tokens this call, P prompt length, T new tokens, E d_model, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block, Embedder, check_generate_args, sample_next
from .config import TransformerConfig


class DecoderLM(nn.Module):
    """L causal blocks (``cfg.decoder_layer(i)``: each layer's variant made causal) + LM head.

    forward(tokens (B, N), *, caches=None, padding_mask=None) -> logits (B, N, V). With
    ``caches`` (from ``make_caches``) the tokens continue the cached sequence: positions start
    at the caches' length, and the caches are updated. With ``context_parallel=`` (an
    ``attnkit.distributed.ContextParallel``) tokens are this rank's shard of the sequence and the
    logits are the shard's (training and scoring; no caches, no padding mask).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg, cfg.decoder_layer(i)) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.tok.weight

    def make_caches(self, batch: int, max_len: int | None = None) -> list:
        """One cache per layer (KVCache, SlidingWindowCache, RecurrentState or SegmentMemory)."""
        max_len = self.cfg.max_len if max_len is None else max_len
        return [blk.attn.make_cache(batch, max_len) for blk in self.blocks]

    def forward(self, tokens: torch.Tensor, *, caches: list | None = None,
                padding_mask: torch.Tensor | None = None, context_parallel=None) -> torch.Tensor:
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches has {len(caches)} entries, expected one per layer ({len(self.blocks)})")
        cp, positions = context_parallel, None
        if cp is not None:
            if caches is not None or padding_mask is not None:
                raise ValueError("context_parallel: caches and padding_mask are not supported (train or score "
                                 "whole sequences; decode on one process)")
            positions = cp.positions(tokens.shape[1], device=tokens.device)  # the shard's global positions
        offset = 0 if caches is None else caches[0].length
        h = self.embed(tokens, offset, positions)  # (B, N, E)
        for i, blk in enumerate(self.blocks):
            h = blk(h, key_padding_mask=padding_mask, cache=None if caches is None else caches[i],
                    context_parallel=cp)
        return self.head(self.norm(h))  # (B, N, V)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``prompt`` (B, P) by ``max_new_tokens``: returns (B, P + T).

        Greedy by default (temperature=0, like ``Seq2Seq.generate``); temperature > 0 samples
        from softmax(logits / temperature) over the top_k tokens.
        use_cache=True prefills the caches with the prompt and then feeds one token per step;
        use_cache=False recomputes the whole sequence every step (same tokens, O(T^2) work).
        """
        check_generate_args(max_new_tokens, temperature, top_k)
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] == 0 \
                or prompt.is_floating_point() or prompt.dtype == torch.bool:
            got = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(f"prompt must be a non-empty (B, P) integer tensor, got {got}")
        out = prompt
        if max_new_tokens == 0:
            return out
        if use_cache:
            caches = self.make_caches(prompt.shape[0], prompt.shape[1] + max_new_tokens)
            logits = self(prompt, caches=caches)[:, -1]  # (B, V)
        else:
            logits = self(prompt)[:, -1]
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)  # (B,)
            out = torch.cat([out, nxt[:, None]], dim=1)  # (B, P + step + 1)
            if step + 1 == max_new_tokens:
                break
            logits = (self(nxt[:, None], caches=caches) if use_cache else self(out))[:, -1]
        return out


__all__ = ["DecoderLM"]
