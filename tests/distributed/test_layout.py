"""Sequence layouts: shards cover the sequence once, zigzag balances causal work, clear errors."""

import pytest
import torch

from attnkit import masks as M
from attnkit.distributed import shard_sequence
from attnkit.distributed.layout import local_positions, segments


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_partition_the_sequence_at_their_positions(layout, world):
    x = torch.arange(3 * 24).view(3, 24)
    seen = []
    for r in range(world):
        s = shard_sequence(x, 1, layout=layout, rank=r, world_size=world)
        pos = local_positions(layout, 24 // world, r, world)
        assert torch.equal(s, x[:, pos])
        seen += pos.tolist()
    assert sorted(seen) == list(range(24))


def test_zigzag_chunks_and_causal_balance():
    assert [(s.start, s.local, s.length) for s in segments("zigzag", 6, 1, 4)] == [(3, 0, 3), (18, 3, 3)]
    causal = M.causal().to_dense(32, 32)[0, 0]
    work = lambda layout: [int(causal[local_positions(layout, 8, r, 4)].sum()) for r in range(4)]
    assert len(set(work("zigzag"))) == 1  # every rank the same number of allowed pairs
    assert work("contiguous") == [36, 100, 164, 228]


def test_layout_errors_name_the_problem():
    x = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="divisible by 8"):
        shard_sequence(x, 1, layout="zigzag", rank=0, world_size=4)
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_sequence(x, 1, layout="striped", rank=0, world_size=2)
    with pytest.raises(ValueError, match="must be even"):
        segments("zigzag", 5, 0, 2)
    with pytest.raises(RuntimeError, match="not initialised"):
        shard_sequence(x, 1)
