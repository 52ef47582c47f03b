"""Sequence layouts of context parallelism: which global positions each rank holds.

Legend: P ranks in the process group, r this rank, N global sequence length, n = N / P positions
per rank, c = N / (2P) positions per zigzag chunk.

- ``contiguous``: rank r holds positions [r n, (r + 1) n).
- ``zigzag``: the sequence is cut into 2P chunks of c positions; rank r holds chunk r followed by
  chunk 2P - 1 - r. Under a causal mask every rank then has the same number of allowed
  (query, key) pairs, where the contiguous layout gives rank P-1 P times the work of rank 0
  (the load balance of Llama 3's context parallelism, Dubey et al. 2024, section 3.3.2, and of
  ring-flash-attn's zigzag ring).

A shard is described by its segments: maximal runs of consecutive global positions, each a
(global start, local start, length) triple. Everything here is pure index arithmetic, except
``gather_sequence`` (one all-gather) and the group helpers that ask torch.distributed for the
rank and size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Segment:
    """``length`` consecutive positions: global ``start`` .. start+length-1 at local ``local`` .."""

    start: int
    local: int
    length: int

    @property
    def rows(self) -> slice:
        """The local slice of this segment."""
        return slice(self.local, self.local + self.length)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_local_length(layout: str, n_local: int, what: str = "the local sequence length") -> None:
    """zigzag needs an even shard (two chunks); contiguous any length >= 1."""
    check_layout(layout)
    if n_local < 1:
        raise ValueError(f"{what} must be >= 1, got {n_local}")
    if layout == "zigzag" and n_local % 2:
        raise ValueError(
            f"layout='zigzag' splits each rank's shard into 2 chunks, so {what} must be even, got {n_local} "
            "(make N divisible by 2 * world_size, or use layout='contiguous')"
        )


def segments(layout: str, n_local: int, rank: int, world: int) -> tuple[Segment, ...]:
    """The segments of ``rank``'s shard of length ``n_local`` (global length world * n_local)."""
    check_local_length(layout, n_local)
    if layout == "contiguous" or world == 1:
        return (Segment(rank * n_local, 0, n_local),)
    c = n_local // 2
    return Segment(rank * c, 0, c), Segment((2 * world - 1 - rank) * c, c, c)


def local_positions(layout: str, n_local: int, rank: int, world: int, device=None) -> torch.Tensor:
    """Global position of each local index, int64 (n_local,)."""
    parts = [torch.arange(s.start, s.start + s.length, device=device) for s in segments(layout, n_local, rank, world)]
    return torch.cat(parts)


def group_rank_size(group=None) -> tuple[int, int]:
    """(rank in the group, group size); needs an initialised default process group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(torchrun sets the environment) before using attnkit.distributed with group=None"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: torch.Tensor, dim: int, *, group=None, layout: str = "zigzag", rank: int | None = None,
                   world_size: int | None = None) -> torch.Tensor:
    """This rank's shard of the whole sequence ``x`` along ``dim`` (a copy, length N / P).

    ``rank`` / ``world_size`` default to the group's. N must be divisible by P (contiguous) or by
    2P (zigzag); otherwise a ValueError says so.
    """
    if rank is None or world_size is None:
        r, p = group_rank_size(group)
        rank = r if rank is None else rank
        world_size = p if world_size is None else world_size
    check_layout(layout)
    n = x.shape[dim]
    need = world_size * (2 if layout == "zigzag" else 1)
    if n % need:
        raise ValueError(
            f"shard_sequence: length {n} of dim {dim} must be divisible by {need} "
            f"(world_size={world_size}, layout={layout!r})"
        )
    n_local = n // world_size
    parts = [x.narrow(dim, s.start, s.length) for s in segments(layout, n_local, rank, world_size)]
    return torch.cat(parts, dim=dim)


def gather_sequence(x: torch.Tensor, dim: int, *, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` (inverse of ``shard_sequence``).

    One all-gather of equal-shaped shards; the result is not differentiable (use it for outputs,
    logging and tests).
    """
    import torch.distributed as dist

    rank, world = group_rank_size(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    n_local = x.shape[dim]
    pieces = {}
    for r, shard in enumerate(shards):
        for s in segments(layout, n_local, r, world):
            pieces[s.start] = shard.narrow(dim, s.local, s.length)
    return torch.cat([pieces[k] for k in sorted(pieces)], dim=dim)


def shard_positions(n_local: int, *, group=None, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global position ids (n_local,) of this rank's shard, e.g. for RoPE's ``positions=``."""
    rank, world = group_rank_size(group)
    return local_positions(layout, n_local, rank, world, device=device)
