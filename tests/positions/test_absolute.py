"""Absolute position embeddings: the Vaswani formula in float64, offsets for decoding, learned tables."""

import math

import pytest
import torch

from attnkit.positions import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding, sinusoidal_table
from tests.tolerances import tol


def test_sinusoidal_table_equals_paper_formula():
    n, d = 50, 10
    got = sinusoidal_table(n, d, dtype=torch.float64)
    want = torch.empty(n, d, dtype=torch.float64)
    for pos in range(n):
        for i in range(d // 2):
            want[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d))
            want[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d))
    torch.testing.assert_close(got, want, **tol(torch.float64))
    torch.testing.assert_close(sinusoidal_table(5, d, offset=45, dtype=torch.float64), want[45:], **tol(torch.float64))


@pytest.mark.parametrize("make", [lambda: SinusoidalPositionalEmbedding(8), lambda: LearnedPositionalEmbedding(32, 8)])
def test_offset_decoding_and_positions_equal_full_pass(make):
    emb = make().double()
    x = torch.randn(2, 12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = emb(x)
    for t in (0, 5, 11):
        torch.testing.assert_close(emb(x[:, t:t + 1], offset=t), full[:, t:t + 1], **tol(torch.float64))
    pos = torch.tensor([[3, 4, 5], [0, 1, 2]])
    got = emb(x[:, :3], positions=pos)
    torch.testing.assert_close(got[0], x[0, :3] + (full - x)[0, 3:6], **tol(torch.float64))
    torch.testing.assert_close(got[1], full[1, :3], **tol(torch.float64))


def test_sinusoidal_bf16_matches_float64_and_caches():
    emb = SinusoidalPositionalEmbedding(16)
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    got = emb(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), emb(x), **tol(torch.bfloat16))
    assert emb.table(3000).shape == (3000, 16)  # grows past the first cache size
    torch.testing.assert_close(emb.table(3000)[:40].double(), sinusoidal_table(40, 16, dtype=torch.float64),
                               **tol(torch.float32))


def test_learned_gets_gradient_only_at_used_positions():
    emb = LearnedPositionalEmbedding(10, 4)
    emb(torch.zeros(1, 3, 4), offset=2).sum().backward()
    used = emb.weight.grad.abs().sum(-1) > 0
    assert used.tolist() == [False, False, True, True, True] + [False] * 5


def test_errors():
    with pytest.raises(ValueError, match="dim must be an even int"):
        SinusoidalPositionalEmbedding(7)
    emb = LearnedPositionalEmbedding(4, 2)
    with pytest.raises(ValueError, match="position 4 is past max_len=4"):
        emb(torch.zeros(1, 2, 2), offset=3)
    with pytest.raises(ValueError, match=r"x must be \(B, N, E\) with E = 2"):
        emb(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="either positions or offset"):
        emb(torch.zeros(1, 2, 2), offset=1, positions=torch.arange(2))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        emb(torch.zeros(1, 2, 2), positions=torch.tensor([0, -1]))
