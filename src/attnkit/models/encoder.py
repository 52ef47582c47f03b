"""Encoder-only Transformer (BERT-like, pre-norm) with classification and tagging heads.

Legend: B batch, N tokens, E d_model, V vocab, C classes / tags.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block, Embedder
from .config import TransformerConfig


class TransformerEncoder(nn.Module):
    """Embeddings + L blocks (each layer's attention/position from ``cfg.layer(i)``) + final norm.

    forward(tokens (B, N), *, padding_mask=None (B, N) True = padding) -> hidden (B, N, E).
    Padded positions are never attended; their own hidden states are computed but meaningless.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg, cfg.layer(i)) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, tokens: torch.Tensor, *, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(tokens)  # (B, N, E)
        for blk in self.blocks:
            h = blk(h, key_padding_mask=padding_mask)
        return self.norm(h)


def _check_count(cls: str, name: str, val) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{cls}: {name} must be an int >= 1, got {val!r}")
    return val


class SequenceClassifier(nn.Module):
    """Mean of the non-padded hidden states -> linear: logits (B, C)."""

    def __init__(self, cfg: TransformerConfig, num_classes: int):
        super().__init__()
        _check_count("SequenceClassifier", "num_classes", num_classes)
        self.encoder = TransformerEncoder(cfg)
        self.head = nn.Linear(cfg.d_model, num_classes)

    def forward(self, tokens: torch.Tensor, *, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(tokens, padding_mask=padding_mask)  # (B, N, E)
        keep = torch.ones_like(tokens, dtype=h.dtype) if padding_mask is None else (~padding_mask).to(h.dtype)
        pooled = (h * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)  # (B, E)
        return self.head(pooled)


class TokenTagger(nn.Module):
    """Per-token tags: logits (B, N, C)."""

    def __init__(self, cfg: TransformerConfig, num_tags: int):
        super().__init__()
        _check_count("TokenTagger", "num_tags", num_tags)
        self.encoder = TransformerEncoder(cfg)
        self.head = nn.Linear(cfg.d_model, num_tags)

    def forward(self, tokens: torch.Tensor, *, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(tokens, padding_mask=padding_mask))  # (B, N, C)


__all__ = ["TransformerEncoder", "SequenceClassifier", "TokenTagger"]
