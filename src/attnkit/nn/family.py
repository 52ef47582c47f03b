"""Family modules: ``MultiHeadAttention`` with one variant chosen, for those who think in modules.

Each is ``MultiHeadAttention(embed_dim, num_heads, attention=<Spec>(**options), ...)`` and
nothing more: the same forward (self- and cross-attention, ``mask=``, ``key_padding_mask=``,
caches), the same checks, the same parameters (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``, ``core``). Keyword arguments that ``MultiHeadAttention`` takes (``num_kv_heads``,
``kdim``, ``vdim``, ``bias``, ``dropout``, ``position``, ``batch_first``, ``device``,
``dtype``) go to the module; the others are the variant's options.
"""

from __future__ import annotations

from ..variants import LSH, Additive, Linear, Linformer, Nystrom, Performer
from .mha import MultiHeadAttention

MODULE_ARGS = ("num_kv_heads", "kdim", "vdim", "bias", "dropout", "position", "batch_first", "device", "dtype")


class _FamilyModule(MultiHeadAttention):
    variant: type = None

    def __init__(self, embed_dim: int, num_heads: int = 1, **kwargs):
        module = {k: kwargs.pop(k) for k in MODULE_ARGS if k in kwargs}
        super().__init__(embed_dim, num_heads, attention=self.variant(**kwargs), **module)


class AdditiveAttention(_FamilyModule):
    """``MultiHeadAttention(attention=Additive(attn_dim=, mask=))``: Bahdanau attention per head
    (num_heads=1 by default, the paper's form), with kdim / vdim for an encoder of another width."""

    variant = Additive


class LinearAttention(_FamilyModule):
    """``MultiHeadAttention(attention=Linear(feature_map=, causal=, chunk_size=))``."""

    variant = Linear


class PerformerAttention(_FamilyModule):
    """``MultiHeadAttention(attention=Performer(num_features=, causal=, ...))``; ``redraw()`` draws
    the next random projection (``core.projection``)."""

    variant = Performer

    def redraw(self) -> None:
        self.core.redraw()


class LinformerAttention(_FamilyModule):
    """``MultiHeadAttention(attention=Linformer(max_len, proj_dim=, sharing=))``."""

    variant = Linformer


class NystromAttention(_FamilyModule):
    """``MultiHeadAttention(attention=Nystrom(num_landmarks=, pinv_iterations=, conv_kernel_size=, ...))``."""

    variant = Nystrom


class LSHSelfAttention(_FamilyModule):
    """``MultiHeadAttention(attention=LSH(n_hashes=, bucket_size=, causal=, seed=))``: shared-QK,
    self-attention only."""

    variant = LSH


__all__ = ["AdditiveAttention", "LinearAttention", "PerformerAttention", "LinformerAttention", "NystromAttention",
           "LSHSelfAttention"]
