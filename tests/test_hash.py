"""attnkit._hash: the counter-based hash behind dropout and BigBird's random blocks.

Statistical checks use fixed seeds (so they are deterministic) and bounds of 6 standard
deviations of the statistic under the ideal uniform model.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit._hash import dropout_keep, hash_coords, mix32, uniform

M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32, in Python integers (no overflow)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def test_mix32_matches_python_lowbias32_including_int64_wraparound():
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64)
    xs = torch.cat([xs, torch.tensor([0, 1, 2**31 - 1, 2**31, M32, 0xDEADBEEF])])
    got = mix32(xs)
    assert got.dtype == torch.int64 and int(got.min()) >= 0 and int(got.max()) <= M32
    assert got.tolist() == [lowbias32(x) for x in xs.tolist()]


def test_mix32_is_a_bijection_on_a_range():
    x = torch.arange(1 << 16, dtype=torch.int64) * 7919  # spread-out inputs
    assert torch.unique(mix32(x)).numel() == x.numel()


def test_hash_coords_broadcasts_and_is_deterministic():
    a = torch.arange(3).view(3, 1)
    b = torch.arange(4).view(1, 4)
    h1, h2 = hash_coords(5, a, b, 2), hash_coords(5, a, b, 2)
    assert h1.shape == (3, 4) and torch.equal(h1, h2)
    assert torch.unique(h1).numel() == 12
    # Each element equals the scalar hash of its own coordinates.
    assert int(h1[2, 3]) == int(hash_coords(5, 2, 3, 2))
    # Seed, coordinate order and negative coordinates all matter and work.
    assert not torch.equal(hash_coords(6, a, b, 2), h1)
    assert int(hash_coords(5, 1, 2)) != int(hash_coords(5, 2, 1))
    assert int(hash_coords(5, -1)) != int(hash_coords(5, 1))



def test_seeds_use_all_64_bits_and_out_of_range_seeds_raise():
    """Issue 10: seeds were reduced mod 2^32 without a word (7 and 7 + 2^32 gave the same pattern)."""
    assert int(hash_coords(7, 0)) != int(hash_coords(7 + 2**32, 0))
    assert int(hash_coords(7, 0)) != int(hash_coords(7 + 2**63, 0))
    for bad in (-3, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            hash_coords(bad, 0)


def test_uniform_range_and_moments():
    n = 200_000
    u = uniform(123, torch.arange(n))
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # mean 1/2 with sd sqrt(1/12 / n); variance 1/12 with sd sqrt(1/180 / n) (uniform 4th moment)
    assert abs(float(u.double().mean()) - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert abs(float(u.double().var()) - 1 / 12) < 6 * math.sqrt(1 / 180 / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_is_one_minus_p(p):
    b, h = torch.arange(2).view(-1, 1, 1, 1), torch.arange(3).view(1, -1, 1, 1)
    q, k = torch.arange(64).view(1, 1, -1, 1), torch.arange(128).view(1, 1, 1, -1)
    keep = dropout_keep(11, p, b, h, q, k)
    n = keep.numel()
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 64, 128)
    assert abs(float(keep.double().mean()) - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)


def test_dropout_keep_neighbours_uncorrelated_and_seeds_independent():
    q, k = torch.arange(256).view(-1, 1), torch.arange(256).view(1, -1)
    a = dropout_keep(1, 0.5, 0, 0, q, k).double()
    n = a[:, 1:].numel()
    # Correlation of neighbouring keys / queries / seeds: about N(0, 1/n) if independent.
    for x, y in ((a[:, 1:], a[:, :-1]), (a[1:], a[:-1]), (a, dropout_keep(2, 0.5, 0, 0, q, k).double())):
        r = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
        assert abs(float(r)) < 6 / math.sqrt(n)


def test_dropout_keep_batch_and_head_indices_matter():
    """Patterns at different (b, h) agree on about half the positions at p = 1/2 (independent),
    not on all of them: every sequence and every head gets its own pattern."""
    q, k = torch.arange(64).view(-1, 1), torch.arange(128).view(1, -1)
    base = dropout_keep(7, 0.5, 0, 0, q, k)
    n = base.numel()
    for b, h in ((1, 0), (0, 1), (5, 0), (0, 7), (3, 2), (1, 1)):
        agree = float((dropout_keep(7, 0.5, b, h, q, k) == base).double().mean())
        assert abs(agree - 0.5) < 6 * math.sqrt(0.25 / n), (b, h, agree)
    # broadcasting over b and h gives the same bits as scalar coordinates
    grid = dropout_keep(7, 0.5, torch.arange(2).view(-1, 1, 1, 1), torch.arange(3).view(1, -1, 1, 1), q, k)
    assert torch.equal(grid[1, 2], dropout_keep(7, 0.5, 1, 2, q, k))
