"""``ContextParallel``: what a module needs to run on its shard of a sequence.

Legend: B batch, H heads, N global length, n = N / P positions per rank, E model width.

Modules (``MultiHeadAttention``, ``DecoderLM``) take ``context_parallel=ContextParallel(group)``
in forward: their inputs are then this rank's shard (B, n, E) of the global sequence in
``layout``; they ask it for the shard's global positions (RoPE, absolute embeddings) and run
softmax attention through ``attention`` (``ring_attention``) instead of ``attnkit.attention``.
Everything else in a Transformer (projections, norms, feed-forward, the loss) acts per token,
so it runs on the shard unchanged. Parameter gradients are this rank's share: sum them over the
group (DDP / FSDP over the same ranks, or ``all_reduce``) as for any data-parallel step; the
loss is the sum of the ranks' token losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import layout as L
from .ring import RingOptions, ring_attention


@dataclass(frozen=True)
class ContextParallel:
    """group: the process group (None = default); layout: "zigzag" or "contiguous"; options:
    ``RingOptions`` (timeout, block tile sizes)."""

    group: object = None
    layout: str = "zigzag"
    options: RingOptions | None = None

    def __post_init__(self):
        L.check_layout(self.layout)

    def positions(self, n_local: int, device=None) -> torch.Tensor:
        """Global position ids (n_local,) of this rank's shard."""
        return L.shard_positions(n_local, group=self.group, layout=self.layout, device=device)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's shard of the whole sequence ``x`` along ``dim``."""
        return L.shard_sequence(x, dim, group=self.group, layout=self.layout)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence from every rank's shard (no autograd)."""
        return L.gather_sequence(x, dim, group=self.group, layout=self.layout)

    def attention(self, q, k, v, *, mask=None, bias=None, scale=None, softcap=None) -> torch.Tensor:
        """This rank's shard of exact softmax attention over the whole sequence (``ring_attention``)."""
        return ring_attention(q, k, v, group=self.group, mask=mask, bias=bias, scale=scale, softcap=softcap,
                              layout=self.layout, options=self.options)
