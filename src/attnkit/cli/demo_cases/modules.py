"""Demo rows for attnkit.nn: MultiHeadAttention vs torch.nn.MultiheadAttention on the same
weights (float64 torch as the reference), and cached decoding vs the full causal pass.

Workload: B=2, N=256, E=256, H=8, float32, seeded; decoding: prefill 128 tokens, then 128
tokens one at a time through a KVCache / SlidingWindowCache / RecurrentState.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import masks as M
from ...nn import Linear, MultiHeadAttention, Rope, Softmax
from ..demo_api import DemoCase, Prepared

B, N, E, H = 2, 256, 256, 8


def _torch_case(variant: str, cross: bool, with_masks: bool) -> DemoCase:
    def prepare() -> Prepared:
        torch.manual_seed(0)
        t = nn.MultiheadAttention(E, H, batch_first=True, kdim=E // 2 if cross else None,
                                  vdim=E // 2 if cross else None).eval()
        with torch.no_grad():
            t.in_proj_bias.normal_(0, 0.1)
        m = MultiHeadAttention.from_torch(t).eval()
        t64 = MultiHeadAttention.from_torch(t).to_torch().double()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, N, E, generator=g)
        ctx = torch.randn(B, 2 * N, E // 2, generator=g) if cross else x
        nk = ctx.shape[1]
        kpm = torch.zeros(B, nk, dtype=torch.bool)
        am = None
        if with_masks:
            kpm[1, nk - 37:] = True
            am = ~M.causal().to_dense(N, nk)[0, 0]  # torch polarity: True = blocked

        def run():
            with torch.no_grad():
                return m.torch_forward(x, ctx, ctx, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]

        def reference():
            with torch.no_grad():
                x64, c64 = x.double(), ctx.double()
                return t64(x64, c64, c64, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]

        return Prepared(run=run, reference=reference, backend="attnkit.nn (auto) vs torch MHA float64")

    return DemoCase(variant, prepare)


def _decode_case(variant: str, attention, position, exact: bool = True) -> DemoCase:
    def prepare() -> Prepared:
        torch.manual_seed(0)
        m = MultiHeadAttention(E, H, num_kv_heads=2, attention=attention, position=position).eval()
        m64 = MultiHeadAttention(E, H, num_kv_heads=2, attention=attention, position=position).double().eval()
        m64.load_state_dict(m.state_dict())
        x = torch.randn(B, N, E, generator=torch.Generator().manual_seed(1))
        cache_kind = type(m.make_cache(B, N)).__name__

        def run():
            with torch.no_grad():
                cache = m.make_cache(B, N)
                outs = [m(x[:, :N // 2], cache=cache)]
                outs += [m(x[:, t:t + 1], cache=cache) for t in range(N // 2, N)]
                return torch.cat(outs, dim=1)

        def reference():
            with torch.no_grad():
                return m64(x.double())  # the full causal pass, float64

        return Prepared(run=run, reference=reference, backend=f"decode via {cache_kind}")

    return DemoCase(variant, prepare)


def cases() -> list[DemoCase]:
    return [
        _torch_case("MHA self vs torch.nn.MultiheadAttention", cross=False, with_masks=False),
        _torch_case("MHA self + causal attn_mask + key padding vs torch", cross=False, with_masks=True),
        _torch_case("MHA cross (kdim/vdim, Nk=2N) + padding vs torch", cross=True, with_masks=True),
        _decode_case("cached decoding = full pass (causal, RoPE, GQA)", Softmax(mask=M.causal()), Rope()),
        _decode_case("cached decoding = full pass (sliding window 64, ring buffer)",
                     Softmax(mask=M.sliding_window(64)), Rope()),
        _decode_case("cached decoding = full pass (linear, recurrent state)", Linear(causal=True), None),
    ]
