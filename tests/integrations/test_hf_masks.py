"""HF mask functions -> attnkit specs: the same boolean mask as transformers' own ``sdpa_mask``.

Random geometries cover prefill, decode (Nq = 1), static caches (unwritten slots past the last
query), cropped sliding caches (kv_offset > 0), left / right padding and holes, packed sequences.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
import transformers.masking_utils as MU  # noqa: E402

from attnkit import masks as M  # noqa: E402
from attnkit.integrations import _hf_masks as H  # noqa: E402
from attnkit.integrations.transformers import HFMask, mask_spec  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

KINDS = ("causal", "sliding", "bidirectional", "bidirectional_sliding", "packed", "custom_or")


def hf_function(kind: str, W: int, ids=None, pos=None):
    if kind == "causal":
        return MU.causal_mask_function
    if kind == "sliding":
        return MU.sliding_window_causal_mask_function(W)
    if kind == "bidirectional":
        return MU.bidirectional_mask_function
    if kind == "bidirectional_sliding":
        return MU.sliding_window_bidirectional_mask_function(W)
    if kind == "packed":  # as create_causal_mask builds it
        remapped = MU.remap_positions_for_packed_sequence(MU.sliding_window_causal_mask_function(W), pos)
        return MU.and_masks(remapped, MU.packed_sequence_mask_function(ids))
    if kind == "custom_or":  # an or_mask_function attnkit does not know: the fallback
        return MU.or_masks(MU.causal_mask_function, lambda b, h, q, k: (k % 3) == 0)
    raise ValueError(kind)


def dense(hm: HFMask) -> torch.Tensor:
    """(B, 1, Nq, Nk) bool of an HFMask: the spec over the kept keys, cropped keys blocked."""
    B, Nq, K, Nk = hm.batch_size, hm.q_length, hm.keep, hm.kv_length
    d = torch.ones(B, 1, Nq, K, dtype=torch.bool) if hm.mask is None else hm.mask.to_dense(Nq, K, batch=B)
    return torch.nn.functional.pad(d, (0, Nk - K), value=False)


@st.composite
def geometries(draw):
    kind = draw(st.sampled_from(KINDS))
    B = draw(st.integers(1, 3))
    nq = draw(st.integers(1, 9))
    packed = kind == "packed"
    past = 0 if packed else draw(st.integers(0, 9))          # q_offset - kv_offset
    kv_offset = 0 if packed else draw(st.integers(0, 5))      # a sliding cache's dropped keys
    extra = 0 if packed else draw(st.integers(0, 5))          # a static cache's unwritten slots
    W = draw(st.integers(1, 6))
    kv_length = past + nq + extra
    L = kv_offset + kv_length - draw(st.integers(0, 3))       # HF pads a short 2-D mask with padding
    pad = draw(st.sampled_from(("none", "left", "random")))
    ids = pos = None
    if packed:
        cut = draw(st.integers(1, nq))
        pos = torch.cat([torch.arange(cut), torch.arange(nq - cut)]).view(1, nq).expand(B, nq)
        ids = (pos == 0).cumsum(-1) - 1
    am = None
    if pad != "none" and not packed:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        if pad == "left":
            starts = torch.randint(0, max(L, 1), (B,), generator=g)
            am = (torch.arange(L).view(1, -1) >= starts.view(-1, 1)).long()
        else:
            am = (torch.rand(B, L, generator=g) < 0.7).long()
    return dict(kind=kind, B=B, nq=nq, q_offset=kv_offset + past, kv_offset=kv_offset, kv_length=kv_length,
                W=W, am=am, ids=ids, pos=pos)


def both(g):
    fn = hf_function(g["kind"], g["W"], g["ids"], g["pos"])
    kw = dict(batch_size=g["B"], q_length=g["nq"], kv_length=g["kv_length"], q_offset=g["q_offset"],
              kv_offset=g["kv_offset"], mask_function=fn, attention_mask=g["am"], use_vmap=g["kind"] == "custom_or")
    ours = mask_spec(**kw)
    theirs = MU.sdpa_mask(**kw, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return ours, theirs


@SETTINGS
@given(geometries())
def test_spec_equals_transformers_sdpa_mask(g):
    ours, theirs = both(g)
    want = theirs.expand(g["B"], 1, g["nq"], g["kv_length"])
    assert torch.equal(dense(ours), want), (g, ours)


@SETTINGS
@given(geometries())
def test_recognised_pieces_become_closed_form_specs(g):
    ours, _ = both(g)
    text = repr(ours.mask)
    if g["kind"] == "custom_or" and ours.mask is None:  # an OR with a part that allows every pair here
        assert dense(ours).all(), g  # (e.g. causal with one query at the last key) is no mask at all
    else:
        assert ("hf:" in text) == (g["kind"] == "custom_or"), text
    if g["kind"] in ("causal", "sliding", "packed"):
        assert ours.keep == g["q_offset"] + g["nq"] - g["kv_offset"]  # keys after the last query are cropped
    if g["kind"] == "packed":
        assert "document" in text


def test_pictures_of_common_cases():
    # Mistral window 3 over a left-padded row: the band and the padding, no dense tensor.
    am = torch.tensor([[0, 0, 1, 1, 1, 1]])
    hm = mask_spec(batch_size=1, q_length=6, kv_length=6, mask_function=MU.sliding_window_causal_mask_function(3),
                   attention_mask=am)
    assert repr(hm.mask).startswith("(sliding_window(2, 0) & key_padding_from_bool")
    assert hm.mask.picture() == "\n".join(["......", "......", "..#...", "..##..", "..###.", "...###"])
    # A static cache of 16 slots, prefill of 4: keys 4.. are cropped, the mask is plain causal.
    hm = mask_spec(batch_size=1, q_length=4, kv_length=16, mask_function=MU.causal_mask_function)
    assert (hm.keep, repr(hm.mask)) == (4, "causal()")
    # Decode at position 9 of that cache: 10 keys kept, the query sees all of them (no mask at all).
    hm = mask_spec(batch_size=1, q_length=1, kv_length=16, q_offset=torch.tensor(9), mask_function=MU.causal_mask_function)
    assert hm.keep == 10 and hm.mask is None


def test_long_padded_window_has_empty_tiles_for_blockwise_to_skip():
    am = torch.ones(2, 4096, dtype=torch.long)
    am[1, :1024] = 0
    hm = mask_spec(batch_size=2, q_length=4096, kv_length=4096, attention_mask=am,
                   mask_function=MU.sliding_window_causal_mask_function(512))
    t = hm.mask.tiles(4096, 4096, 128, 128, batch=2)  # closed form: band & key validity, O(B * Nk + tiles)
    assert t.shape == (2, 1, 32, 32)
    assert (t == M.EMPTY).float().mean() > 0.8 and (t[1, 0, :, :8] == M.EMPTY).all()


def test_cache_position_form_of_transformers_4():
    # 4.5x passes cache_position (Nq,) instead of q_length / q_offset.
    a = mask_spec(batch_size=1, cache_position=torch.arange(5, 8), kv_length=12, mask_function=MU.causal_mask_function)
    b = mask_spec(batch_size=1, q_length=3, q_offset=5, kv_length=12, mask_function=MU.causal_mask_function)
    assert (repr(a.mask), a.q_length, a.keep) == (repr(b.mask), b.q_length, b.keep) == ("causal()", 3, 8)
    with pytest.raises(TypeError, match="cache_position"):
        mask_spec(batch_size=1, kv_length=3, mask_function=MU.causal_mask_function)


def test_precomputed_mask_is_returned_as_is():
    hm = mask_spec(batch_size=2, q_length=3, kv_length=5, q_offset=2, mask_function=MU.causal_mask_function)
    assert mask_spec(batch_size=2, q_length=3, kv_length=5, q_offset=2, attention_mask=hm) is hm
    with pytest.raises(ValueError, match=r"precomputed HFMask is for \(Nq, Nk\) = \(3, 5\)"):
        mask_spec(batch_size=2, q_length=1, kv_length=6, attention_mask=hm)


def test_bad_padding_mask_is_refused():
    with pytest.raises(ValueError, match=r"2-D \(B, L\) tensor"):
        mask_spec(batch_size=1, q_length=2, kv_length=2, mask_function=MU.causal_mask_function,
                  attention_mask=torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="3 rows, expected batch size B=2"):
        mask_spec(batch_size=2, q_length=2, kv_length=2, mask_function=MU.causal_mask_function,
                  attention_mask=torch.ones(3, 2))


def test_a_piece_whose_meaning_changed_falls_back():
    # A band piece is checked against HF's own function first: a different meaning is not trusted.
    def make(sliding_window):
        def inner_mask(b, h, q, k):
            return k >= q - sliding_window  # not what sliding_window_overlay means (k > q - W)
        return inner_mask

    fake = make(2)
    fake.__module__, fake.__qualname__ = H._HF_MODULE, "sliding_window_overlay.<locals>.inner_mask"
    fn = MU.and_masks(fake, MU.causal_mask_function)
    hm = mask_spec(batch_size=1, q_length=5, kv_length=5, mask_function=fn)
    assert "hf:" in repr(hm.mask)
    want = MU.sdpa_mask(batch_size=1, q_length=5, kv_length=5, allow_is_causal_skip=False, mask_function=fn)
    assert torch.equal(dense(hm), want)


def test_band_names():
    assert repr(H.band(None, 0)) == "causal()" and repr(H.band(-3, 0)) == "sliding_window(3, 0)"
    assert repr(H.band(None, -2)) == "band(None, -2)" and isinstance(H.band(2, 5), M.Band)
    assert H.band(None, None) is None  # no bound: every pair


def test_bounds_that_never_bind_are_dropped():
    # A window as long as the sequence is plain causal (sdpa's fused kernel); decode sees every key.
    hm = mask_spec(batch_size=1, q_length=8, kv_length=8, mask_function=MU.sliding_window_causal_mask_function(8))
    assert repr(hm.mask) == "causal()"
    hm = mask_spec(batch_size=1, q_length=8, kv_length=8, mask_function=MU.sliding_window_causal_mask_function(7))
    assert repr(hm.mask) == "sliding_window(6, 0)"
    hm = mask_spec(batch_size=1, q_length=1, kv_length=8, q_offset=7, mask_function=MU.causal_mask_function)
    assert hm.mask is None and hm.keep == 8
