"""Demo rows for exact softmax attention (attnkit.attention with backend="auto") over the mask
specs, biases, GQA, cross-attention, decoding, softcap and dropout.

Workload: B=1, H=8, N=1024, D=64, float32, seeded; cross-attention Nq=256 over Nk=1024.
"""

from __future__ import annotations

import torch

from ... import masks as M
from ...biases import from_function
from ...functional import attention, which_backend
from ..demo_api import DemoCase, Prepared

B, H, N, D = 1, 8, 1024, 64


def _inputs(nq=N, nk=N, hk=H, dv=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g)
    k = torch.randn(B, hk, nk, D, generator=g)
    v = torch.randn(B, hk, nk, dv, generator=g)
    return q, k, v


def _case(variant, *, mask=None, bias=None, nq=N, nk=N, hk=H, **kw) -> DemoCase:
    def prepare() -> Prepared:
        q, k, v = _inputs(nq, nk, hk)
        m = mask() if callable(mask) and not isinstance(mask, M.Mask) else mask
        b = bias() if callable(bias) and not hasattr(bias, "tensors") else bias
        args = dict(mask=m, bias=b, **kw)
        ref_args = dict(args, bias=b.double() if isinstance(b, torch.Tensor) else b)
        return Prepared(
            run=lambda: attention(q, k, v, **args),
            reference=lambda: attention(q.double(), k.double(), v.double(), backend="reference", **ref_args),
            backend=which_backend(q, k, v, **args),
        )
    return DemoCase(variant, prepare)


def _layout():
    g = torch.Generator().manual_seed(1)
    lay = torch.rand(N // 64, N // 64, generator=g) < 0.25
    return lay | torch.eye(N // 64, dtype=torch.bool)


def cases() -> list[DemoCase]:
    lengths = torch.tensor([700])
    docs = torch.repeat_interleave(torch.arange(4), torch.tensor([100, 300, 424, 200])).unsqueeze(0)
    return [
        _case("dense"),
        _case("causal", mask=M.causal()),
        _case("sliding window 128 (causal)", mask=M.sliding_window(128)),
        _case("causal + key padding", mask=M.causal() & M.key_padding(lengths)),
        _case("document (packed, causal)", mask=M.document(docs) & M.causal()),
        _case("prefix LM (prefix 128)", mask=M.prefix_lm(128)),
        _case("dilated (window 64, dilation 4)", mask=M.dilated(64, 4)),
        _case("strided | local (stride 32)", mask=M.strided(32) | M.sliding_window(31)),
        _case("fixed (block 64, summary 8)", mask=M.fixed(64, 8)),
        _case("block sparse (64, 25%)", mask=M.block_sparse(_layout(), 64)),
        _case("global tokens + window", mask=M.global_tokens(torch.tensor([0, 1, 512])) | M.sliding_window(64, 64)),
        _case("BigBird (64, 3, 1, 3)", mask=M.bigbird(64, 3, 1, 3, seed=0)),
        _case("GQA 8q/2kv causal", mask=M.causal(), hk=2),
        _case("cross-attention 256 x 1024", nq=256),
        _case("decode step (Nq=1, causal)", nq=1, mask=M.causal()),
        _case("float bias tensor", bias=lambda: 0.1 * torch.randn(1, H, N, N, generator=torch.Generator().manual_seed(2))),
        _case("bias spec -0.01*(i-j), causal", mask=M.causal(),
              bias=from_function(lambda b, h, i, j: -0.01 * (i - j).float(), name="linear_distance")),
        _case("softcap 30 (Gemma 2)", softcap=30.0, mask=M.causal()),
        _case("dropout 0.1 (seeded)", dropout_p=0.1, dropout_seed=1234, mask=M.causal()),
    ]
