"""Mask specs: which (query, key) pairs may attend, as composable data.

Conventions (True = may attend; query positions in key coordinates, bottom-right aligned; the
structural questions a spec answers about itself) are in ``attnkit.masks.base``.

- ``bands``: ``causal``, ``sliding_window``, ``prefix_lm``
- ``data``: ``key_padding``, ``key_padding_from_bool``, ``document``, ``from_function``, and
  ``as_mask`` (the one normaliser of a user's ``mask=`` argument)
- ``sparse``: ``dilated``, ``strided``, ``fixed``, ``block_sparse``, ``global_tokens``, ``bigbird``
- ``tiles``: ``TileMap``, the tile planner shared by every tiled kernel
"""

from .bands import Band, PrefixLM, causal, prefix_lm, sliding_window
from .base import EMPTY, FULL, PARTIAL, And, Mask, Or, evaluate_tiles, gather_dense, index_grid
from .data import (
    Document,
    FunctionMask,
    KeyPadding,
    KeyValid,
    TensorMask,
    as_mask,
    document,
    from_function,
    key_padding,
    key_padding_from_bool,
)
from .sparse import (
    BigBird,
    BlockSparse,
    Dilated,
    Fixed,
    GlobalTokens,
    Strided,
    bigbird,
    block_sparse,
    dilated,
    fixed,
    global_tokens,
    strided,
)
from .tiles import TileMap

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "causal", "sliding_window", "prefix_lm", "key_padding",
    "key_padding_from_bool", "document", "from_function", "dilated", "strided", "fixed",
    "block_sparse", "global_tokens", "bigbird", "evaluate_tiles", "as_mask", "TileMap", "index_grid",
    "gather_dense", "Band", "PrefixLM", "And", "Or", "KeyPadding", "KeyValid", "Document", "TensorMask",
    "FunctionMask", "Dilated", "Strided", "Fixed", "BlockSparse", "GlobalTokens", "BigBird",
]
