"""attnkit.masks: dense forms against brute-force loops, tile maps, composition, pictures, errors.

Legend: B batch, H heads, Nq queries, Nk keys; pos = i + Nk - Nq is query row i in key coordinates.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import masks as M
from tests.strategies import (
    Shape,
    dense_from_predicate,
    mask_specs,
    positions,
    shapes,
    tile_truth,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
sizes = st.tuples(st.integers(1, 9), st.integers(1, 9))  # (Nq, Nk)


def test_positions_are_bottom_right_aligned():
    assert positions(3, 5) == [2, 3, 4]
    assert positions(1, 7) == [6]  # a decoding query sits at the last key
    assert positions(4, 4) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# to_dense == brute force, from the definitions
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(sizes)
def test_causal_is_bottom_right(n):
    nq, nk = n
    want = dense_from_predicate(lambda b, h, pos, j: j <= pos, 1, 1, nq, nk)
    assert torch.equal(M.causal().to_dense(nq, nk), want)
    if nq == nk:  # the usual lower-triangular mask
        assert torch.equal(want[0, 0], torch.ones(nq, nq, dtype=torch.bool).tril())
    else:  # torch's tril with the bottom-right diagonal offset
        assert torch.equal(want[0, 0], torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq))


@SETTINGS
@given(sizes, st.integers(0, 5), st.integers(0, 5))
def test_sliding_window(n, left, right):
    nq, nk = n
    want = dense_from_predicate(lambda b, h, pos, j: pos - left <= j <= pos + right, 1, 1, nq, nk)
    assert torch.equal(M.sliding_window(left, right).to_dense(nq, nk), want)


def test_sliding_window_zero_is_diagonal_and_mistral_window():
    assert torch.equal(M.sliding_window(0).to_dense(4)[0, 0], torch.eye(4, dtype=torch.bool))
    # Mistral window W = 3 (query included): keys i-2..i
    assert M.sliding_window(2).to_dense(5)[0, 0, 4].tolist() == [False, False, True, True, True]


@SETTINGS
@given(sizes, st.integers(0, 10))
def test_prefix_lm_int(n, p):
    nq, nk = n
    want = dense_from_predicate(lambda b, h, pos, j: j <= pos or j < p, 1, 1, nq, nk)
    assert torch.equal(M.prefix_lm(p).to_dense(nq, nk), want)


@SETTINGS
@given(sizes, st.lists(st.integers(0, 10), min_size=1, max_size=3))
def test_prefix_lm_per_batch(n, plist):
    nq, nk = n
    B = len(plist)
    want = dense_from_predicate(lambda b, h, pos, j: j <= pos or j < plist[b], B, 1, nq, nk)
    assert torch.equal(M.prefix_lm(torch.tensor(plist)).to_dense(nq, nk, batch=B), want)


@SETTINGS
@given(sizes, st.lists(st.integers(0, 9), min_size=1, max_size=3))
def test_key_padding_lengths(n, lengths):
    nq, nk = n
    lengths = [min(x, nk) for x in lengths]
    B = len(lengths)
    want = dense_from_predicate(lambda b, h, pos, j: j < lengths[b], B, 2, nq, nk)
    assert torch.equal(M.key_padding(torch.tensor(lengths)).to_dense(nq, nk, batch=B, heads=2), want)


@SETTINGS
@given(sizes, st.integers(1, 3), st.integers(0, 2**16))
def test_key_padding_from_bool(n, B, seed):
    nq, nk = n
    is_pad = torch.rand(B, nk, generator=torch.Generator().manual_seed(seed)) < 0.4
    want = dense_from_predicate(lambda b, h, pos, j: not is_pad[b, j], B, 1, nq, nk)
    assert torch.equal(M.key_padding_from_bool(is_pad).to_dense(nq, nk, batch=B), want)
    # Same mask as lengths when the padding is a suffix.
    lengths = torch.tensor([nk - 1, 0][:B] + [nk] * max(0, B - 2))
    suffix = torch.arange(nk).view(1, -1) >= lengths.view(-1, 1)
    assert torch.equal(M.key_padding_from_bool(suffix).to_dense(nq, nk, batch=B),
                       M.key_padding(lengths).to_dense(nq, nk, batch=B))


@SETTINGS
@given(sizes, st.integers(1, 2), st.booleans(), st.integers(0, 2**16))
def test_document(n, B, shared, seed):
    nq, nk = n
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (nk,) if shared else (B, nk), generator=g)
    row = (lambda b: ids) if shared else (lambda b: ids[b])
    # A query before key 0 (Nq > Nk) is in no document.
    want = dense_from_predicate(lambda b, h, pos, j: pos >= 0 and row(b)[pos] == row(b)[j], B, 1, nq, nk)
    assert torch.equal(M.document(ids).to_dense(nq, nk, batch=B), want)


@SETTINGS
@given(sizes, st.integers(2, 4))
def test_from_function_matches_loop(n, mod):
    nq, nk = n
    spec = M.from_function(lambda b, h, q, k: (q * 3 + k + h) % mod == 0)
    want = dense_from_predicate(lambda b, h, pos, j: (pos * 3 + j + h) % mod == 0, 1, 3, nq, nk)
    assert torch.equal(spec.to_dense(nq, nk, heads=3), want)


def test_from_function_must_return_bool():
    spec = M.from_function(lambda b, h, q, k: (q - k).float(), name="scores")
    with pytest.raises(TypeError, match="scores must return a bool tensor"):
        spec.to_dense(3)


@SETTINGS
@given(shapes(max_len=7), st.data())
def test_composition_is_elementwise_and_or(shape, data):
    a, b = data.draw(mask_specs(shape, 0)), data.draw(mask_specs(shape, 0))
    B, Hq, _, Nq, Nk = shape[:5]
    da, db = (m.to_dense(Nq, Nk, batch=B, heads=Hq) for m in (a, b))
    assert torch.equal((a & b).to_dense(Nq, Nk, batch=B, heads=Hq), da & db)
    assert torch.equal((a | b).to_dense(Nq, Nk, batch=B, heads=Hq), da | db)


def test_composition_rejects_non_masks():
    with pytest.raises(TypeError, match="compose only with other mask specs, got Tensor"):
        M.causal() & torch.ones(2, 2, dtype=torch.bool)


def test_to_dense_shape_and_bool():
    d = M.causal().to_dense(3, 5, batch=2, heads=4)
    assert d.shape == (2, 4, 3, 5) and d.dtype == torch.bool


# ---------------------------------------------------------------------------------------------
# tiles(): never EMPTY with an allowed pair, never FULL with a blocked pair
# ---------------------------------------------------------------------------------------------


def check_tiles_sound(spec, shape: Shape, block_q: int, block_k: int, exact: bool = False):
    B, Hq, _, Nq, Nk = shape[:5]
    t = spec.tiles(Nq, Nk, block_q, block_k, batch=B, heads=Hq)
    tq, tk = -(-Nq // block_q), -(-Nk // block_k)
    assert t.dtype == torch.int8 and t.dim() == 4, t
    assert t.shape[0] in (1, B) and t.shape[1] in (1, Hq) and t.shape[2:] == (tq, tk), (t.shape, shape)
    assert bool(((t == M.EMPTY) | (t == M.PARTIAL) | (t == M.FULL)).all())
    t = t.expand(B, Hq, tq, tk)  # a size-1 dim claims the map holds for every batch / head
    any_, all_ = tile_truth(spec.to_dense(Nq, Nk, batch=B, heads=Hq), block_q, block_k)
    bad_empty = (t == M.EMPTY) & any_
    bad_full = (t == M.FULL) & ~all_
    assert not bad_empty.any(), f"{spec!r}: EMPTY tiles with allowed pairs at {bad_empty.nonzero().tolist()}"
    assert not bad_full.any(), f"{spec!r}: FULL tiles with blocked pairs at {bad_full.nonzero().tolist()}"
    if exact:
        want = torch.where(all_, M.FULL, torch.where(any_, M.PARTIAL, M.EMPTY)).to(torch.int8)
        assert torch.equal(t, want), f"{spec!r}: tile map is not exact"


@settings(max_examples=50, deadline=None, derandomize=True)
@given(shapes(max_len=13), st.integers(1, 5), st.integers(1, 5), st.data())
def test_tiles_are_sound(shape, block_q, block_k, data):
    spec = data.draw(mask_specs(shape))
    check_tiles_sound(spec, shape, block_q, block_k)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shapes(max_len=13), st.integers(1, 5), st.integers(1, 5), st.data())
def test_evaluate_tiles_is_exact(shape, block_q, block_k, data):
    spec = data.draw(mask_specs(shape))
    B, Hq, _, Nq, Nk = shape[:5]
    t = M.evaluate_tiles(spec, Nq, Nk, block_q, block_k, batch=B, heads=Hq)
    any_, all_ = tile_truth(spec.to_dense(Nq, Nk, batch=B, heads=Hq), block_q, block_k)
    want = torch.where(all_, M.FULL, torch.where(any_, M.PARTIAL, M.EMPTY)).to(torch.int8)
    assert torch.equal(t.expand_as(want), want)


@SETTINGS
@given(shapes(max_len=13), st.integers(1, 5), st.integers(1, 5), st.integers(0, 5), st.integers(0, 5))
def test_band_tiles_are_exact(shape, block_q, block_k, left, right):
    for spec in (M.causal(), M.sliding_window(left, right)):
        check_tiles_sound(spec, shape, block_q, block_k, exact=True)


@SETTINGS
@given(shapes(max_len=13), st.integers(1, 5), st.integers(1, 5), st.data())
def test_key_valid_tiles_are_exact(shape, block_q, block_k, data):
    # Closed form from the (B, Nk) validity: left padding, right padding, holes.
    B, Nk = shape[0], shape[4]
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * Nk, max_size=B * Nk))).view(B, Nk)
    check_tiles_sound(M.key_padding_from_bool(~valid), shape, block_q, block_k, exact=True)


def test_tiles_skip_work_for_causal():
    t = M.causal().tiles(8, 8, 4, 4)[0, 0]
    assert t.tolist() == [[M.PARTIAL, M.EMPTY], [M.FULL, M.PARTIAL]]


def test_tiles_reject_bad_blocks():
    with pytest.raises(ValueError, match="block_k must be an int >= 1, got 2.0|block_q must be an int >= 1, got 0"):
        M.evaluate_tiles(M.causal(), 4, 4, 0, 2)


@pytest.mark.parametrize("spec", [
    M.causal(), M.sliding_window(2, 1), M.prefix_lm(2), M.key_padding(torch.tensor([8])),
    M.key_padding_from_bool(torch.zeros(1, 8, dtype=torch.bool)), M.document(torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])), M.block_sparse(torch.ones(4, 4, dtype=torch.bool), 2),
    M.global_tokens(torch.tensor([1])), M.bigbird(2, 1, 1, 1), M.causal() & M.key_padding(torch.tensor([5])),
    M.sliding_window(1) | M.strided(3),
], ids=repr)
@pytest.mark.parametrize("blocks", [(0, 0), (8, 0), (0, 8), (2.0, 4)])
def test_every_spec_rejects_bad_tile_sizes(spec, blocks):
    """causal().tiles(8, 8, 0, 0) was a ZeroDivisionError (closed-form tiles skipped the check)."""
    with pytest.raises(ValueError, match=r"tiles: block_[qk] must be an int >= 1, got"):
        spec.tiles(8, 8, *blocks)


@pytest.mark.parametrize("sizes", [(-1,), (4, -1), (2.5, 4), (True, 4)])
def test_to_dense_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match=r"to_dense: n[qk] must be an int >= 0, got"):
        M.causal().to_dense(*sizes)


def test_data_tensors_list_what_allows_reads():
    """What flex's block-mask cache compares (a spec edited in place must not reuse a stale one)."""
    lengths, ids = torch.tensor([3, 4]), torch.tensor([0, 0, 1])
    assert M.causal().data_tensors() == () and M.bigbird(2).data_tensors() == ()
    assert M.key_padding(lengths).data_tensors()[0] is not None
    both = (M.key_padding(lengths) & M.document(ids)).data_tensors()
    assert [t.tolist() for t in both] == [[3, 4], [[0, 0, 1]]]  # ids are kept as (1, Nk)
    assert M.prefix_lm(2).data_tensors() == () and len(M.prefix_lm(torch.tensor([1])).data_tensors()) == 1
    assert M.from_function(lambda b, h, q, k: q >= k).data_tensors() is None  # cannot see its closure
    assert (M.causal() | M.from_function(lambda b, h, q, k: q >= k)).data_tensors() is None

    class Custom(M.Mask):
        def allows(self, b, h, q, k, *, num_keys=None):
            return q >= k

    assert Custom().data_tensors() is None  # a subclass that says nothing is never cached


# ---------------------------------------------------------------------------------------------
# Pictures and reprs
# ---------------------------------------------------------------------------------------------


def test_picture_of_causal():
    assert M.causal().picture(3) == "#..\n##.\n###"
    assert M.causal().picture(2, 4) == "###.\n####"


@pytest.mark.parametrize("spec", [
    M.causal(), M.sliding_window(2, 1), M.prefix_lm(3), M.key_padding(torch.tensor([5, 2])),
    M.key_padding_from_bool(torch.tensor([[False, False, True]])),
    M.document(torch.tensor([0, 0, 1, 1, 1, 2])), M.prefix_lm(torch.tensor([1, 2])),
    M.causal() & M.key_padding(torch.tensor([3])), M.sliding_window(1) | M.prefix_lm(2),
    M.from_function(lambda b, h, q, k: k <= q, name="mine"),
], ids=repr)
def test_str_draws_a_picture(spec):
    text = str(spec)
    lines = text.splitlines()
    assert lines[0] == repr(spec)
    rows = lines[1:]
    assert rows and all(set(r) <= {"#", "."} for r in rows)
    assert len({len(r) for r in rows}) == 1


def test_str_of_data_masks_uses_their_length():
    assert str(M.document(torch.tensor([0, 0, 1]))).splitlines()[1:] == ["##.", "##.", "..#"]
    assert str(M.key_padding_from_bool(torch.tensor([[False, True]]))).splitlines()[1:] == ["#.", "#."]


# ---------------------------------------------------------------------------------------------
# Constructor and size errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: M.sliding_window(-1), "left must be an int >= 0, got -1"),
    (lambda: M.sliding_window(2, 1.5), "right must be an int >= 0, got 1.5"),
    (lambda: M.prefix_lm(-2), "prefix_len must be an int >= 0"),
    (lambda: M.prefix_lm(torch.tensor([[1]])), r"prefix_len tensor must be 1-D integer \(B,\)"),
    (lambda: M.prefix_lm(torch.tensor([-1, 2])), "prefix_len must be >= 0"),
    (lambda: M.key_padding(torch.tensor([1.0])), r"lengths must be a 1-D integer tensor \(B,\), got torch.float32"),
    (lambda: M.key_padding([3, 4]), "lengths must be a 1-D integer tensor"),
    (lambda: M.key_padding(torch.tensor([-1])), "lengths must be >= 0"),
    (lambda: M.key_padding_from_bool(torch.zeros(2, 3)), r"is_pad must be a bool tensor \(B, Nk\)"),
    (lambda: M.document(torch.zeros(3)), r"ids must be an integer tensor \(Nk,\) or \(B, Nk\)"),
    # issue 10 (fixed in the restructuring; pinned here): bools are not ints
    (lambda: M.sliding_window(True), "sliding_window: left must be an int >= 0, got True"),
    (lambda: M.sliding_window(3, False), "sliding_window: right must be an int >= 0, got False"),
    (lambda: M.document(torch.tensor([True, False])), r"document: ids must be an integer tensor .* got torch.bool"),
    (lambda: M.key_padding(torch.tensor([True])), "key_padding: lengths must be a 1-D integer tensor"),
])
def test_constructor_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("spec, match", [
    (M.key_padding(torch.tensor([2, 3, 4])), r"key_padding: lengths has 3 entries, expected batch size B=2"),
    (M.key_padding_from_bool(torch.zeros(2, 5, dtype=torch.bool)), r"is_pad covers 5 keys/positions but the input has Nk=4"),
    (M.key_padding_from_bool(torch.zeros(3, 4, dtype=torch.bool)), "3 rows, expected batch size B=2"),
    (M.document(torch.zeros(2, 3, dtype=torch.long)), r"document: ids covers 3 keys/positions but the input has Nk=4"),
    (M.document(torch.zeros(3, 4, dtype=torch.long)), "3 rows, expected batch size B=2"),
    (M.prefix_lm(torch.tensor([1])), "prefix_len has 1 entries, expected batch size B=2"),
    (M.causal() & M.key_padding(torch.tensor([1])), "lengths has 1 entries, expected batch size B=2"),
])
def test_check_names_the_mismatch(spec, match):
    with pytest.raises(ValueError, match=match):
        spec.check(4, 4, batch=2, heads=1)


def test_specs_are_traceable_elementwise():
    """allows() has no .item() or data-dependent branches: it runs under torch.vmap (flex's mask_mod)."""
    specs = [M.document(torch.tensor([[0, 0, 1, 1]])), M.global_tokens(torch.tensor([1])),
             M.global_tokens(torch.tensor([[True, False, False, True]])), M.key_padding(torch.tensor([3])),
             M.prefix_lm(torch.tensor([2])), M.block_sparse(torch.eye(2, dtype=torch.bool), 2),
             M.bigbird(2, 1, 1, 1, seed=0), M.causal() & M.sliding_window(2), M.dilated(2, 1) | M.fixed(2, 1),
             M.from_function(lambda b, h, q, k: q >= k, name="checked")]  # its shape check traces too
    z = torch.zeros((), dtype=torch.long)
    for spec in specs:
        fn = lambda b, h, q, k, spec=spec: spec.allows(b, h, q, k, num_keys=4)  # noqa: E731
        for dim in range(4):  # vmap over one index at a time, like flex
            idx = [z, z, torch.tensor(3), torch.tensor(3)]
            idx[dim] = torch.arange(4) if dim >= 2 else torch.zeros(1, dtype=torch.long)
            dims = [None] * 4
            dims[dim] = 0
            got = torch.vmap(fn, in_dims=tuple(dims))(*idx)
            want = spec.to_dense(4, 4)[0, 0, 3] if dim == 3 else spec.to_dense(4, 4)[0, 0, :, 3] if dim == 2 else None
            if want is not None:
                assert torch.equal(got, want), (spec, dim)


def test_to_dense_of_a_data_spec_covers_its_whole_batch():
    """Without batch=, a data spec's dense form has one row per sequence it carries (not just the
    first), and a batch= that does not fit raises instead of broadcasting silently."""
    spec = M.key_padding(torch.tensor([7, 20]))
    dense = spec.to_dense(20, 20)
    assert dense.shape == (2, 1, 20, 20)
    assert dense[0, 0, 0].sum() == 7 and dense[1, 0, 0].sum() == 20
    with pytest.raises(ValueError, match="lengths has 2 entries, expected batch size B=3"):
        spec.to_dense(20, 20, batch=3)
    assert M.causal().to_dense(3).shape == (1, 1, 3, 3)
    assert M.block_sparse(torch.ones(3, 2, 2, dtype=torch.bool), 2).to_dense(4).shape == (1, 3, 4, 4)
