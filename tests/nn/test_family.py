"""Family modules (attnkit.nn.family): thin MultiHeadAttention constructors. Checked here: the
head split (head h is columns h*D:(h+1)*D of each projection, for every family), and
LSHSelfAttention against ``lsh_attention`` on heads split by explicit column slicing."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit import (
    AdditiveAttention,
    LinearAttention,
    LinformerAttention,
    LSHSelfAttention,
    MultiHeadAttention,
    NystromAttention,
    PerformerAttention,
)
from attnkit import masks as M
from attnkit.variants.lsh import lsh_attention
from tests.references import merge_heads, split_heads
from tests.tolerances import assert_close

F64 = torch.float64
E, H, N = 16, 4, 8
D = E // H

FAMILY = {
    "softmax": lambda: MultiHeadAttention(E, H),
    "softmax_gqa": lambda: MultiHeadAttention(E, H, num_kv_heads=2),
    "additive": lambda: AdditiveAttention(E, H, attn_dim=5),
    "linear": lambda: LinearAttention(E, H),
    "performer": lambda: PerformerAttention(E, H, num_features=8),
    "linformer": lambda: LinformerAttention(E, H, max_len=N, proj_dim=3),
    "nystrom": lambda: NystromAttention(E, H, num_landmarks=2),
    "lsh": lambda: LSHSelfAttention(E, H, n_hashes=2, bucket_size=4),
    "lsh_causal": lambda: LSHSelfAttention(E, H, n_hashes=3, bucket_size=2, causal=True),
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_each_query_head_is_its_own_column_block(name):
    """With out_proj = identity, perturbing the query-projection rows of head h changes output
    columns h*D:(h+1)*D and nothing else (a wrong view would mix tokens and heads)."""
    torch.manual_seed(0)
    m = FAMILY[name]().to(F64).eval()
    with torch.no_grad():
        m.out_proj.weight.copy_(torch.eye(E, dtype=F64))
        m.out_proj.bias.zero_()
    x = torch.randn(2, N, E, dtype=F64, generator=torch.Generator().manual_seed(1))
    base = m(x)
    for h in range(H):
        m2 = copy.deepcopy(m)
        with torch.no_grad():
            m2.q_proj.weight[h * D:(h + 1) * D] += torch.randn(D, E, dtype=F64, generator=torch.Generator().manual_seed(h))
        changed = (m2(x) - base).abs().amax(dim=(0, 1)) > 1e-9  # (E,)
        inside = torch.zeros(E, dtype=torch.bool)
        inside[h * D:(h + 1) * D] = True
        assert bool(changed[inside].any()), f"{name}: head {h} did not change"
        assert not bool(changed[~inside].any()), f"{name}: head {h}'s queries changed columns {changed.nonzero().flatten().tolist()}"


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_self_attention_equals_the_function_on_sliced_heads(causal):
    torch.manual_seed(0)
    m = LSHSelfAttention(E, H, n_hashes=2, bucket_size=4, causal=causal, seed=3).to(F64).eval()
    assert m.k_proj is None  # shared QK
    x = torch.randn(2, N, E, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    pad = torch.zeros(2, N, dtype=torch.bool)
    pad[1, 6:] = True
    qk = split_heads(m.q_proj(x), H)  # (B, H, N, D)
    v = split_heads(m.v_proj(x), H)
    want = m.out_proj(merge_heads(lsh_attention(qk, v, n_hashes=2, bucket_size=4, causal=causal, seed=3,
                                                mask=M.key_padding_from_bool(pad))))
    out = m(x, key_padding_mask=pad)
    assert_close(out, want)
    g = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0], grad=True)
