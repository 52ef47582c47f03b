"""Shared hypothesis strategies and input makers for attention tests.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.

- ``shapes()``: a strategy for ``Shape(B, Hq, Hk, Nq, Nk, D, Dv)``, tiny, with odd lengths,
  Nq != Nk, Nq = 1, GQA/MQA (Hq a multiple of Hk) and Dv != D all reachable.
- ``make_qkv(shape, dtype=, seed=, requires_grad=)``: seeded q (B,Hq,Nq,D), k (B,Hk,Nk,D),
  v (B,Hk,Nk,Dv), leaves with requires_grad.
- ``mask_specs(shape)``: a strategy for any attnkit mask spec valid for that shape, including
  compositions with & and |; ``bool_masks(shape)`` for dense bool tensors.
- ``positions(nq, nk)``: query positions in key coordinates (bottom-right alignment).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st

from attnkit import masks as M


class Shape(NamedTuple):
    B: int
    Hq: int
    Hk: int
    Nq: int
    Nk: int
    D: int
    Dv: int


@st.composite
def shapes(draw, max_batch: int = 2, max_kv_heads: int = 2, max_groups: int = 3, max_len: int = 11,
           max_dim: int = 5) -> Shape:
    B = draw(st.integers(1, max_batch))
    Hk = draw(st.integers(1, max_kv_heads))
    Hq = Hk * draw(st.integers(1, max_groups))
    Nk = draw(st.integers(1, max_len))
    Nq = draw(st.one_of(st.just(1), st.just(Nk), st.integers(1, max_len)))
    D = draw(st.integers(1, max_dim))
    Dv = draw(st.one_of(st.just(D), st.integers(1, max_dim)))
    return Shape(B, Hq, Hk, Nq, Nk, D, Dv)


def make_qkv(shape: Shape, *, dtype=torch.float64, seed: int = 0, requires_grad: bool = True,
             scale: float = 1.0):
    """Seeded leaves q (B,Hq,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv) of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hk, Nq, Nk, D, Dv = shape

    def leaf(*s):
        return (scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(requires_grad)

    return leaf(B, Hq, Nq, D), leaf(B, Hk, Nk, D), leaf(B, Hk, Nk, Dv)


def positions(nq: int, nk: int) -> list[int]:
    """Key-coordinate position of each query row: row i sits at i + (Nk - Nq)."""
    return [i + nk - nq for i in range(nq)]


def rand_bool(gen: torch.Generator, *size, p: float = 0.5) -> torch.Tensor:
    return torch.rand(*size, generator=gen) < p


# ---------------------------------------------------------------------------------------------
# Mask specs
# ---------------------------------------------------------------------------------------------


@st.composite
def leaf_masks(draw, shape: Shape) -> M.Mask:
    """One mask spec (no composition) that is valid for ``shape``."""
    B, Hq, _, Nq, Nk = shape[:5]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kinds = ["causal", "window", "dilated", "strided", "fixed", "global", "global_flags", "padding",
             "padding_bool", "prefix", "prefix_tensor", "function", "block_sparse", "document",
             "document_sorted", "bigbird", "tensor"]
    kind = draw(st.sampled_from(kinds))
    if kind == "causal":
        return M.causal()
    if kind == "window":
        return M.sliding_window(draw(st.integers(0, 4)), draw(st.integers(0, 3)))
    if kind == "dilated":
        return M.dilated(draw(st.integers(1, 3)), draw(st.integers(1, 3)), causal=draw(st.booleans()))
    if kind == "strided":
        return M.strided(draw(st.integers(1, 4)))
    if kind == "fixed":
        block = draw(st.integers(1, 4))
        return M.fixed(block, draw(st.integers(1, block)), causal=draw(st.booleans()))
    if kind == "global":
        idx = draw(st.lists(st.integers(0, Nk - 1), min_size=1, max_size=3, unique=True))
        return M.global_tokens(torch.tensor(idx))
    if kind == "global_flags":
        return M.global_tokens(rand_bool(g, B, Nk, p=0.2))
    if kind == "bigbird":
        bs = draw(st.integers(1, 3))
        return M.bigbird(bs, draw(st.sampled_from([1, 3])), draw(st.integers(0, 1)), draw(st.integers(0, 2)),
                         seed=draw(st.integers(0, 100)))
    if kind == "padding":  # lengths 0 give fully masked rows
        return M.key_padding(torch.tensor(draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B))))
    if kind == "padding_bool":
        return M.key_padding_from_bool(rand_bool(g, B, Nk, p=0.3))
    if kind == "prefix":
        return M.prefix_lm(draw(st.integers(0, Nk)))
    if kind == "prefix_tensor":
        return M.prefix_lm(torch.tensor(draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B))))
    if kind == "function":
        mod = draw(st.integers(2, 3))
        return M.from_function(lambda b, h, q, k: (q + 2 * k + h + b) % mod != 0, name=f"mod{mod}")
    if kind == "tensor":  # what attnkit.attention wraps a bool mask tensor into
        return M.TensorMask(draw(bool_masks(shape)), Nq, Nk)
    if kind == "block_sparse":
        bs = draw(st.integers(1, 3))
        nb = -(-Nk // bs)
        heads = draw(st.sampled_from([1, Hq]))
        return M.block_sparse(rand_bool(g, heads, nb, nb, p=0.6) if heads > 1 else rand_bool(g, nb, nb, p=0.6), bs)
    if kind == "document":
        ids = torch.randint(0, 3, (B, Nk) if draw(st.booleans()) else (Nk,), generator=g)
        return M.document(ids)
    # document_sorted: packed sequences, the common case with a closed-form tiles()
    ids = torch.sort(torch.randint(0, 4, (B, Nk), generator=g), dim=1).values
    return M.document(ids)


@st.composite
def mask_specs(draw, shape: Shape, max_depth: int = 2) -> M.Mask:
    """A mask spec valid for ``shape``: a leaf or a composition with & / | (depth <= max_depth)."""
    if max_depth == 0 or draw(st.integers(0, 2)) > 0:
        return draw(leaf_masks(shape))
    a = draw(mask_specs(shape, max_depth - 1))
    b = draw(mask_specs(shape, max_depth - 1))
    return (a & b) if draw(st.booleans()) else (a | b)


@st.composite
def bool_masks(draw, shape: Shape, allow_empty_rows: bool = True) -> torch.Tensor:
    """A dense bool mask broadcastable to (B, Hq, Nq, Nk) (random which dims are broadcast)."""
    B, Hq, _, Nq, Nk = shape[:5]
    size = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, Hq])), Nq, Nk)
    layout = draw(st.sampled_from(["full", "2d", "keys", "queries"]))
    if layout == "2d":
        size = size[2:]
    elif layout == "keys":  # a key-padding style mask (B', H', 1, Nk)
        size = size[:2] + (1, Nk)
    elif layout == "queries":  # whole query rows on or off (B', H', Nq, 1)
        size = size[:3] + (1,)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    m = rand_bool(g, *size, p=0.6)
    if not allow_empty_rows:
        m[..., 0] = True
    return m


def dense_from_predicate(pred, B: int, H: int, Nq: int, Nk: int) -> torch.Tensor:
    """Brute force: (B, H, Nq, Nk) bool from ``pred(b, h, pos, j)`` looped over every pair, where
    pos is the query's key-coordinate position (row i sits at i + Nk - Nq)."""
    out = torch.zeros(B, H, Nq, Nk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i, pos in enumerate(positions(Nq, Nk)):
                for j in range(Nk):
                    out[b, h, i, j] = bool(pred(b, h, pos, j))
    return out


def tile_truth(dense: torch.Tensor, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of a (B, H, Nq, Nk) bool mask: (any allowed pair, all pairs allowed), (B, H, Tq, Tk)."""
    B, H, Nq, Nk = dense.shape
    tq, tk = -(-Nq // block_q), -(-Nk // block_k)
    any_ = torch.zeros(B, H, tq, tk, dtype=torch.bool)
    all_ = torch.zeros(B, H, tq, tk, dtype=torch.bool)
    for a in range(tq):
        for c in range(tk):
            blk = dense[:, :, a * block_q:(a + 1) * block_q, c * block_k:(c + 1) * block_k]
            any_[:, :, a, c] = blk.flatten(2).any(-1)
            all_[:, :, a, c] = blk.flatten(2).all(-1)
    return any_, all_
