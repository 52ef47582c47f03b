"""Position specs wired into MultiHeadAttention (attnkit.nn.positions): every spec and option
against explicit float64 formulas on the module's weights (tests/references.py), forward and
backward, self-attention with and without a causal variant.

The references are independent of the module: RoPE as complex rotations with the pairing the
spec names (interleaved GPT-J pairs or half-split NeoX pairs, partial rotary_dim), T5 buckets
from transformers' ``T5Attention._relative_position_bucket`` with the direction the spec
names (or, when bidirectional=None, the one the variant implies), ALiBi slopes from the
paper's code, Shaw's clipped tables and Transformer-XL's four-term score.
"""

from __future__ import annotations

import pytest
import torch

from attnkit import masks as M
from attnkit.nn import T5, XL, Alibi, MultiHeadAttention, Rope, Shaw, Softmax
from tests.references import mha_reference
from tests.tolerances import assert_close

F64 = torch.float64
CAUSAL = Softmax(mask=M.causal())

CASES = {
    "rope_half_split": (CAUSAL, Rope()),
    "rope_interleaved": (CAUSAL, Rope(interleaved=True)),
    "rope_interleaved_partial": (Softmax(), Rope(interleaved=True, rotary_dim=4, base=100.0)),
    "rope_half_split_partial": (Softmax(), Rope(rotary_dim=4, base=100.0)),
    "alibi_causal": (CAUSAL, Alibi()),
    "alibi_bidirectional": (Softmax(), Alibi()),
    "t5_encoder_default": (Softmax(), T5(num_buckets=8, max_distance=8)),
    "t5_decoder_default": (CAUSAL, T5(num_buckets=8, max_distance=8)),
    "t5_encoder_explicit_unidirectional": (Softmax(), T5(num_buckets=8, max_distance=8, bidirectional=False)),
    "t5_decoder_explicit_bidirectional": (CAUSAL, T5(num_buckets=8, max_distance=8, bidirectional=True)),
    "t5_encoder_explicit_bidirectional": (Softmax(), T5(num_buckets=8, max_distance=8, bidirectional=True)),
    "t5_decoder_explicit_unidirectional": (CAUSAL, T5(num_buckets=8, max_distance=8, bidirectional=False)),
    "shaw": (Softmax(), Shaw(max_distance=3)),
    "shaw_causal": (CAUSAL, Shaw(max_distance=2)),
    "xl": (CAUSAL, XL(mem_len=4)),
}


def _layer(att, pos, *, num_kv_heads=None, seed=0):
    torch.manual_seed(seed)
    m = MultiHeadAttention(32, 4, num_kv_heads=num_kv_heads, attention=att, position=pos, dtype=F64).eval()
    with torch.no_grad():  # learned tables start near zero; make every entry count
        for p in m.pos.parameters():
            p.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("hk", [4, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_module_equals_explicit_formula(name, hk):
    m = _layer(*CASES[name], num_kv_heads=hk)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 32, dtype=F64, generator=g, requires_grad=True)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True
    out, want = m(x, key_padding_mask=pad), mha_reference(m, x, pad)
    assert_close(out, want, msg=name)
    dout = torch.randn(out.shape, dtype=F64, generator=g)
    params = [x] + [p for p in m.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(out, params, dout, allow_unused=True),
                    torch.autograd.grad(want, params, dout, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, grad=True, msg=name)


def test_the_options_change_the_result():
    """So that a spec option silently ignored cannot pass the test above by accident: each pair
    differs only in the option, on the same weights."""
    x = torch.randn(1, 11, 32, dtype=F64, generator=torch.Generator().manual_seed(2))
    pairs = [("rope_half_split", "rope_interleaved"), ("rope_half_split_partial", "rope_interleaved_partial"),
             ("t5_encoder_default", "t5_encoder_explicit_unidirectional"),
             ("t5_decoder_default", "t5_decoder_explicit_bidirectional")]
    for a, b in pairs:
        ma, mb = _layer(*CASES[a]), _layer(*CASES[b])
        mb.load_state_dict(ma.state_dict())
        assert (ma(x) - mb(x)).abs().max() > 1e-3, (a, b)
