"""attnkit.sparse_masks against brute-force loops written from the papers' definitions.

Legend: B batch, H heads, Nq queries, Nk keys; pos = i + Nk - Nq (query row i in key coordinates);
bs block size. Child et al. 2019 (Sparse Transformers, section 4.2), Beltagy et al. 2020
(Longformer), Zaheer et al. 2020 (BigBird).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import masks as M
from tests.strategies import Shape, dense_from_predicate, tile_truth

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
sizes = st.tuples(st.integers(1, 12), st.integers(1, 12))  # (Nq, Nk)


@SETTINGS
@given(sizes, st.integers(1, 4), st.integers(1, 4), st.booleans())
def test_dilated_longformer(n, window, dilation, causal):
    nq, nk = n
    # Longformer dilated window: offsets 0, d, 2d, ... (window of them) behind, and ahead if not causal.
    steps = range(window) if causal else range(-(window - 1), window)
    want = dense_from_predicate(lambda b, h, pos, j: any(j == pos - m * dilation for m in steps), 1, 1, nq, nk)
    assert torch.equal(M.dilated(window, dilation, causal=causal).to_dense(nq, nk), want)


@SETTINGS
@given(sizes, st.integers(1, 5))
def test_strided_component(n, stride):
    nq, nk = n
    want = dense_from_predicate(lambda b, h, pos, j: j <= pos and (pos - j) % stride == 0, 1, 1, nq, nk)
    assert torch.equal(M.strided(stride).to_dense(nq, nk), want)


@SETTINGS
@given(sizes, st.integers(1, 5))
def test_child_strided_pattern(n, l):  # noqa: E741  (the paper's name for the stride)
    """Paper: A1 = {t, ..., i} with t = max(0, i - l); A2 = {j : (i - j) mod l = 0}; causal."""
    nq, nk = n

    def paper(b, h, i, j):
        a1 = max(0, i - l) <= j <= i
        a2 = (i - j) % l == 0 and j <= i
        return a1 or a2

    want = dense_from_predicate(paper, 1, 1, nq, nk)
    assert torch.equal((M.sliding_window(l - 1) | M.strided(l)).to_dense(nq, nk), want)


@SETTINGS
@given(sizes, st.integers(1, 5), st.data(), st.booleans())
def test_child_fixed_pattern(n, l, data, causal):  # noqa: E741
    """Paper: A1 = {j : floor(j / l) = floor(i / l)}; A2 = {j : j mod l in {l - c, ..., l - 1}}."""
    nq, nk = n
    c = data.draw(st.integers(1, l))

    def paper(b, h, i, j):
        ok = (j // l == i // l) or (j % l in range(l - c, l))
        return ok and (j <= i or not causal)

    want = dense_from_predicate(paper, 1, 1, nq, nk)
    assert torch.equal(M.fixed(l, c, causal=causal).to_dense(nq, nk), want)


@SETTINGS
@given(sizes, st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
def test_block_sparse(n, bs, heads, seed):
    nq, nk = n
    nb = -(-nk // bs)
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(heads, nb, nb, generator=g) < 0.5
    spec = M.block_sparse(layout if heads > 1 else layout[0], bs)
    # A query before key 0 (Nq > Nk) is in no layout row.
    want = dense_from_predicate(lambda b, h, pos, j: pos >= 0 and bool(layout[h % heads, pos // bs, j // bs]),
                                1, heads, nq, nk)
    assert torch.equal(spec.to_dense(nq, nk, heads=heads), want)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(0, 3),
       st.integers(1, 2), st.integers(0, 2**16))
def test_block_sparse_closed_form_tiles_are_exact(bs, fq, fk, nkb, back, heads, seed):
    # Closed form applies when tiles are whole blocks and Nk - Nq is a multiple of bs.
    nk = nkb * bs - (seed % bs)
    nq = max(1, nk - back * bs)
    layout = torch.rand(heads, nkb, nkb, generator=torch.Generator().manual_seed(seed)) < 0.5
    spec = M.block_sparse(layout, bs)
    t = spec.tiles(nq, nk, fq * bs, fk * bs, heads=heads)
    any_, all_ = tile_truth(spec.to_dense(nq, nk, heads=heads), fq * bs, fk * bs)
    want = torch.where(all_, M.FULL, torch.where(any_, M.PARTIAL, M.EMPTY)).to(torch.int8)
    assert torch.equal(t.expand_as(want), want)


@SETTINGS
@given(sizes, st.lists(st.integers(0, 11), min_size=1, max_size=3, unique=True), st.integers(0, 3))
def test_longformer_window_plus_global(n, idx, w):
    nq, nk = n
    idx = [i for i in idx if i < nk] or [0]
    spec = M.sliding_window(w, w) | M.global_tokens(torch.tensor(idx))
    # Global positions attend everything and are attended by all; positions < 0 are not global.
    want = dense_from_predicate(lambda b, h, pos, j: abs(pos - j) <= w or pos in idx or j in idx, 1, 1, nq, nk)
    assert torch.equal(spec.to_dense(nq, nk), want)


@SETTINGS
@given(sizes, st.integers(1, 3), st.integers(0, 2**16))
def test_global_tokens_per_sequence_flags(n, B, seed):
    nq, nk = n
    flags = torch.rand(B, nk, generator=torch.Generator().manual_seed(seed)) < 0.3
    want = dense_from_predicate(lambda b, h, pos, j: (pos >= 0 and bool(flags[b, pos])) or bool(flags[b, j]),
                                B, 1, nq, nk)
    assert torch.equal(M.global_tokens(flags).to_dense(nq, nk, batch=B), want)


@SETTINGS
@given(sizes, st.integers(1, 4), st.sampled_from([1, 3, 5]), st.integers(0, 2))
def test_bigbird_window_and_global(n, bs, wb, gb):
    nq, nk = n

    def paper(b, h, i, j):
        qb, kb = i // bs, j // bs
        return i >= 0 and (abs(qb - kb) <= wb // 2 or qb < gb or kb < gb)  # i < 0: before key 0, no block

    want = dense_from_predicate(paper, 1, 1, nq, nk)
    assert torch.equal(M.bigbird(bs, wb, gb, 0, seed=0).to_dense(nq, nk), want)


def bigbird_blocks(spec, nk, heads):
    """(H, nkb, nkb) block-level mask, after checking the dense mask is constant within blocks."""
    bs = spec.block_size
    dense = spec.to_dense(nk, nk, heads=heads)[0]  # (H, Nk, Nk)
    idx = torch.arange(nk) // bs
    blocks = dense[:, ::bs, ::bs]  # (H, nkb, nkb): first row and column of each block
    assert torch.equal(dense, blocks[:, idx][:, :, idx]), "BigBird mask is not constant within blocks"
    return blocks


def test_bigbird_random_blocks_structure_and_seed():
    bs, wb, gb, r, nk, heads = 4, 3, 1, 2, 64, 8
    nkb = nk // bs
    spec = M.bigbird(bs, wb, gb, r, seed=7)
    blocks = bigbird_blocks(spec, nk, heads)
    base = bigbird_blocks(M.bigbird(bs, wb, gb, 0, seed=7), nk, 1)[0]
    extra = blocks & ~base  # the random blocks beyond window + global
    assert bool((blocks | ~base).all()), "random blocks must add to window + global, never remove"
    assert int(extra.sum(-1).max()) <= r and int(extra.sum()) > 0
    # Deterministic: same seed, same mask (a fresh object); different seed or head: different blocks.
    assert torch.equal(M.bigbird(bs, wb, gb, r, seed=7).to_dense(nk, heads=heads), spec.to_dense(nk, heads=heads))
    assert not torch.equal(M.bigbird(bs, wb, gb, r, seed=8).to_dense(nk, heads=heads), spec.to_dense(nk, heads=heads))
    assert not torch.equal(blocks[0], blocks[1])
    # Random key blocks are spread over all key blocks: with 8 heads x 16 query blocks x 2 draws
    # (256 draws over 16 blocks, about 16 each) every block appears somewhere.
    from attnkit._hash import hash_coords
    drawn = torch.stack([hash_coords(7, torch.arange(heads).view(-1, 1), torch.arange(nkb).view(1, -1), i) % nkb
                         for i in range(r)])
    assert set(drawn.flatten().tolist()) == set(range(nkb))
    # And the mask contains exactly those: window | global | drawn blocks.
    want = base.expand(heads, nkb, nkb).clone()
    for i in range(r):
        want.scatter_(2, drawn[i].unsqueeze(-1), True)
    assert torch.equal(blocks, want)


def test_bigbird_random_needs_num_keys_and_odd_window():
    spec = M.bigbird(2, 3, 1, 1, seed=0)
    z = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="pass num_keys=Nk"):
        spec.allows(z, z, z, z)
    with pytest.raises(ValueError, match="window_blocks must be odd.*got 2"):
        M.bigbird(2, 2, 1, 1)


@pytest.mark.parametrize("make, match", [
    (lambda: M.dilated(0, 1), "dilated: window must be an int >= 1, got 0"),
    (lambda: M.dilated(2, True), "dilated: dilation must be an int >= 1, got True"),
    (lambda: M.strided(0), "strided: stride must be an int >= 1"),
    (lambda: M.fixed(2, 3), r"fixed: summary \(3\) must be <= block \(2\)"),
    (lambda: M.block_sparse(torch.ones(2, 2), 1), r"layout must be a bool tensor \(Tq, Tk\) or \(H, Tq, Tk\), got torch.float32"),
    (lambda: M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 0), "block_size must be an int >= 1"),
    (lambda: M.global_tokens([1, 2]), "indices must be a tensor, got list"),
    (lambda: M.global_tokens(torch.tensor([-1])), "indices must be >= 0"),
    (lambda: M.global_tokens(torch.tensor([1.0])), "indices must be 1-D integer or bool"),
    (lambda: M.bigbird(0), "bigbird: block_size must be an int >= 1"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("spec, nq, nk, heads, match", [
    (M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 2), 5, 5, 1, r"covers 2x2 blocks of 2, but Nk=5 needs 3x3"),
    (M.block_sparse(torch.ones(3, 2, 2, dtype=torch.bool), 2), 4, 4, 2, "has 3 heads, expected 1 .*Hq=2"),
    (M.global_tokens(torch.tensor([4])), 4, 4, 1, "indices must be < Nk=4"),
    (M.global_tokens(torch.zeros(2, 3, dtype=torch.bool)), 4, 4, 1, "flags covers 3 keys/positions .*Nk=4"),
    (M.global_tokens(torch.zeros(1, 4, dtype=torch.bool)), 4, 4, 1, "flags has 1 rows, expected batch size B=2"),
])
def test_check_names_the_mismatch(spec, nq, nk, heads, match):
    with pytest.raises(ValueError, match=match):
        spec.check(nq, nk, batch=2, heads=heads)


def test_queries_before_key_zero_attend_nothing_in_block_specs():
    for spec in (M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 2), M.bigbird(2, 3, 1, 1, seed=0)):
        d = spec.to_dense(6, 4)[0, 0]  # rows 0, 1 sit at positions -2, -1
        assert not d[:2].any() and d[2:].any(-1).all()


@pytest.mark.parametrize("spec", [
    M.dilated(2, 2), M.strided(3), M.fixed(4, 1), M.block_sparse(torch.eye(3, dtype=torch.bool), 2),
    M.global_tokens(torch.tensor([0, 5])), M.bigbird(2, 3, 1, 1, seed=3),
], ids=repr)
def test_str_draws_a_picture(spec):
    lines = str(spec).splitlines()
    assert lines[0] == repr(spec) and len(lines) > 1
    assert all(set(r) <= {"#", "."} and len(r) == len(lines[1]) for r in lines[1:])


def test_tiles_with_batch_and_head_dependence():
    shape = Shape(2, 3, 1, 7, 9, 1, 1)
    flags = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    layout = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    from tests.masks.test_base import check_tiles_sound
    for spec in (M.global_tokens(flags), M.block_sparse(layout, 2), M.bigbird(2, 1, 0, 1, seed=1),
                 M.global_tokens(flags) & M.block_sparse(layout, 2)):
        for bq, bk in ((1, 1), (2, 2), (3, 4), (4, 2)):
            check_tiles_sound(spec, shape, bq, bk)
    t = M.global_tokens(flags).tiles(7, 9, 2, 2, batch=2)
    assert t.shape == (2, 1, 4, 5) and not torch.equal(t[0], t[1])
    t = M.block_sparse(layout, 2).tiles(7, 9, 2, 2, heads=3)
    assert t.shape[:2] == (1, 3)


@pytest.mark.parametrize("seed, exc, match", [
    (1.7, TypeError, "bigbird: seed must be an int, got 1.7"),
    ("x", TypeError, "bigbird: seed must be an int, got 'x'"),
    (True, TypeError, "bigbird: seed must be an int, got True"),
    (-1, ValueError, r"bigbird: seed must be an int in \[0, 2\*\*64\), got -1"),
    (2**64, ValueError, r"bigbird: seed must be an int in \[0, 2\*\*64\)"),
])
def test_bigbird_seed_errors(seed, exc, match):
    """bigbird(seed=1.7) was truncated and seed="x" failed deep inside; negative seeds were masked."""
    with pytest.raises(exc, match=match):
        M.bigbird(4, seed=seed)


def test_bigbird_seeds_differ_in_high_bits():
    a, b = (M.bigbird(2, 1, 0, 2, seed=s).to_dense(32, heads=2) for s in (5, 5 + 2**32))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("nq,nk,bq,bk", [(256, 256, 16, 16), (192, 256, 32, 16), (256, 256, 24, 16), (300, 256, 16, 16),
                                         (250, 250, 16, 32)])
@pytest.mark.parametrize("args", [(8, 3, 1, 2, 5), (8, 5, 0, 0, 0), (16, 1, 2, 3, 1)])
def test_bigbird_closed_form_tiles_equal_evaluated(nq, nk, bq, bk, args):
    """BigBird.tiles pools its block layout (no per-pair evaluation where tiles align with blocks)
    and equals the exact tile map from evaluating every pair."""
    from attnkit.masks import evaluate_tiles

    m = M.bigbird(*args)
    got = m.tiles(nq, nk, bq, bk, heads=3)
    want = evaluate_tiles(m, nq, nk, bq, bk, heads=3)
    shape = torch.broadcast_shapes(got.shape, want.shape)
    assert torch.equal(torch.broadcast_to(got, shape), torch.broadcast_to(want, shape))
