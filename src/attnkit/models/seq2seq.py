"""Encoder-decoder Transformer with cross-attention (softmax or Bahdanau additive).

Legend: B batch, S source length, N target tokens this call, E d_model, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from ..caches import StaticKV
from .blocks import Block, Embedder, check_generate_args, sample_next
from .config import TransformerConfig
from .encoder import TransformerEncoder


class Seq2Seq(nn.Module):
    """Encoder (``cfg.layer(i)``) + decoder (``cfg.decoder_layer(i)``, causal) with cross-attention
    ``cfg.cross_attention`` (``Softmax()`` or ``Additive()`` for Bahdanau-style attention).

    forward(src (B, S), tgt (B, N), *, src_padding_mask=None (True = padding)) -> logits (B, N, V).
    Padded source tokens are masked in the encoder and in every cross-attention.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = TransformerEncoder(cfg)
        self.embed = Embedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg, cfg.decoder_layer(i), cross=cfg.cross_attention)
                                    for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.tok.weight

    def encode(self, src: torch.Tensor, *, src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(src, padding_mask=src_padding_mask)  # (B, S, E)

    def make_caches(self, batch: int, max_len: int | None = None) -> list:
        """Per layer: (self-attention cache, StaticKV for the cross-attention)."""
        max_len = self.cfg.max_len if max_len is None else max_len
        return [(blk.attn.make_cache(batch, max_len), StaticKV()) for blk in self.blocks]

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, *, src_padding_mask: torch.Tensor | None = None,
               caches: list | None = None) -> torch.Tensor:
        if isinstance(tgt, torch.Tensor) and isinstance(memory, torch.Tensor) and tgt.dim() == 2 and memory.dim() == 3 \
                and tgt.shape[0] != memory.shape[0]:
            raise ValueError(f"src and tgt must have the same batch size: the source (memory {tuple(memory.shape)}) "
                             f"has batch {memory.shape[0]}, tgt {tuple(tgt.shape)} has batch {tgt.shape[0]}")
        offset = 0 if caches is None else caches[0][0].length
        h = self.embed(tgt, offset)  # (B, N, E)
        for i, blk in enumerate(self.blocks):
            c = (None, None) if caches is None else caches[i]
            h = blk(h, cache=c[0], context=memory, context_padding_mask=src_padding_mask, cross_cache=c[1])
        return self.head(self.norm(h))  # (B, N, V)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, *, src_padding_mask: torch.Tensor | None = None):
        memory = self.encode(src, src_padding_mask=src_padding_mask)
        return self.decode(tgt, memory, src_padding_mask=src_padding_mask)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, bos_id: int, *, src_padding_mask=None,
                 temperature: float = 0.0, top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode from ``bos_id``: returns (B, 1 + max_new_tokens) target tokens.

        Greedy by default (temperature=0, like ``DecoderLM.generate``); temperature > 0 samples
        from softmax(logits / temperature) over the top_k tokens."""
        check_generate_args(max_new_tokens, temperature, top_k)
        V = self.cfg.vocab_size
        if not isinstance(bos_id, int) or isinstance(bos_id, bool) or not 0 <= bos_id < V:
            raise ValueError(f"bos_id must be a token id in [0, {V}) (vocab_size={V}), got {bos_id!r}")
        memory = self.encode(src, src_padding_mask=src_padding_mask)
        B = src.shape[0]
        out = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        caches = self.make_caches(B, max_new_tokens + 1) if use_cache else None
        logits = self.decode(out, memory, src_padding_mask=src_padding_mask, caches=caches)[:, -1]
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if step + 1 == max_new_tokens:
                break
            inp = nxt[:, None] if use_cache else out
            logits = self.decode(inp, memory, src_padding_mask=src_padding_mask, caches=caches)[:, -1]
        return out


__all__ = ["Seq2Seq"]
