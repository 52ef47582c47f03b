"""Demo rows for the positional schemes: RoPE (half-split, interleaved partial), ALiBi, T5 buckets
(through attnkit.attention, backend "auto"), Shaw relative K/V and Transformer-XL with memory.

Workload: B=1, H=8, D=64, float32, seeded; N=1024 for RoPE/ALiBi/T5, N=256 for Shaw and for
Transformer-XL (a 256-token segment over 256 memory tokens), whose float64 references build the
paper's per-pair tensors. Each reference is the plain formula in float64 with a materialised bias.
"""

from __future__ import annotations

import torch

from ... import masks as M
from ...functional import attention, which_backend
from ...positions import ALiBi, RotaryEmbedding, ShawRelativePosition, T5RelativeBias, XLRelativePosition
from ...positions.t5 import t5_relative_bucket
from ..demo_api import DemoCase, Prepared

B, H, D = 1, 8, 64


def _inputs(nq, nk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, nq, D, generator=g), torch.randn(B, H, nk, D, generator=g),
            torch.randn(B, H, nk, D, generator=g))


def _plain(q, k, v, bias, allowed, scale):
    """softmax(scale q k^T + bias, masked) v in float64; empty rows give zeros."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v.double()


def _rel(nq, nk):
    i = torch.arange(nq)[:, None] + (nk - nq)
    return i, torch.arange(nk)[None, :]


def _rope(interleaved: bool, rotary_dim: int | None):
    def prepare() -> Prepared:
        N = 1024
        q, k, v = _inputs(N, N)
        rope = RotaryEmbedding(D, interleaved=interleaved, rotary_dim=rotary_dim)
        mask = M.causal()

        def run():
            rq, rk = rope.apply(q, k)
            return attention(rq, rk, v, mask=mask)

        def reference():
            rq, rk = rope.apply(q.double(), k.double())  # float64 angles and rotation
            return _plain(rq, rk, v, 0.0, mask.to_dense(N, N), D**-0.5)
        return Prepared(run=run, reference=reference, backend=which_backend(q, k, v, mask=mask))
    return prepare


def _alibi() -> Prepared:
    N = 1024
    q, k, v = _inputs(N, N, seed=1)
    spec, mask = ALiBi(H), M.causal()
    i, j = _rel(N, N)
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(H)], dtype=torch.float64)  # the paper's, H = 8
    bias = -slopes[:, None, None] * (i - j).double()  # (H, N, N)
    return Prepared(run=lambda: attention(q, k, v, bias=spec, mask=mask),
                    reference=lambda: _plain(q, k, v, bias, mask.to_dense(N, N), D**-0.5),
                    backend=which_backend(q, k, v, bias=spec, mask=mask))


def _t5() -> Prepared:
    N = 1024
    q, k, v = (t / 4 for t in _inputs(N, N, seed=2))  # T5 does not scale q.k: keep the logits moderate
    t5 = T5RelativeBias(H, init_std=1.0)
    i, j = _rel(N, N)
    bias = t5.weight.detach().double()[t5_relative_bucket(j - i)].permute(2, 0, 1)  # (H, N, N)

    def run():
        with torch.no_grad():
            return attention(q, k, v, bias=t5.spec(), scale=1.0)
    return Prepared(run=run, reference=lambda: _plain(q, k, v, bias, None, 1.0),
                    backend=which_backend(q, k, v, bias=t5.spec(), scale=1.0))


def _shaw() -> Prepared:
    N, K = 256, 16
    q, k, v = _inputs(N, N, seed=3)
    shaw = ShawRelativePosition(D, K, init_std=0.5)
    mask = M.causal()

    def reference():
        i, j = _rel(N, N)
        idx = (j - i).clamp(-K, K) + K
        aK, aV = shaw.rel_k.detach().double()[idx], shaw.rel_v.detach().double()[idx]  # (N, N, D) each
        qd, kd, vd = q.double(), k.double(), v.double()
        e = (qd @ kd.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", qd, aK)) * D**-0.5
        w = torch.softmax(e.masked_fill(~mask.to_dense(N, N), float("-inf")), -1)
        return w @ vd + torch.einsum("bhij,ijd->bhid", w, aV)

    def run():
        with torch.no_grad():
            return shaw(q, k, v, mask=mask)
    return Prepared(run=run, reference=reference, backend="attnkit.positions.shaw (chunked)")


def _xl() -> Prepared:
    N, MEM = 256, 256
    q, k, v = _inputs(N, N + MEM, seed=4)
    xl = XLRelativePosition(H, D, init_std=0.5)
    mem = (k[:, :, :MEM], v[:, :, :MEM])
    mask = M.causal()

    def run():
        with torch.no_grad():
            return xl(q, k[:, :, MEM:], v[:, :, MEM:], memory=mem, mask=mask)

    def reference():
        """The official code's path: (q + u) k^T + rel_shift((q + v) r^T), r over pos_seq = Nk-1 .. 0."""
        nk = N + MEM
        with torch.no_grad():
            dist = torch.arange(nk - 1, -1, -1, dtype=torch.float64)
            f = 10000.0 ** (-torch.arange(0, H * D, 2, dtype=torch.float64) / (H * D))
            R = torch.cat([torch.sin(dist[:, None] * f), torch.cos(dist[:, None] * f)], -1)  # (Nk, E)
            r = (R @ xl.r_net.weight.double().t()).view(nk, H, D).transpose(0, 1)  # (H, Nk, D)
            qd, kd, vd = q.double(), k.double(), v.double()
            u, vb = xl.r_w_bias.double()[:, None], xl.r_r_bias.double()[:, None]
            ac = (qd + u) @ kd.transpose(-1, -2)
            bd = (qd + vb) @ r.transpose(-1, -2)  # (B, H, N, Nk)
            bd = torch.cat([bd.new_zeros(B, H, N, 1), bd], -1).view(B, H, nk + 1, N)[:, :, 1:].reshape(B, H, N, nk)
            s = ((ac + bd) * D**-0.5).masked_fill(~mask.to_dense(N, nk), float("-inf"))
            return torch.softmax(s, -1) @ vd
    return Prepared(run=run, reference=reference, backend="attnkit.positions.xl (chunked)")


def cases() -> list[DemoCase]:
    return [
        DemoCase("RoPE half-split + causal", _rope(False, None)),
        DemoCase("RoPE interleaved, rotary_dim 32 + causal", _rope(True, 32)),
        DemoCase("ALiBi (8 heads) + causal", _alibi),
        DemoCase("T5 buckets (32, 128), scale 1", _t5),
        DemoCase("Shaw rel. K/V (K=16) + causal, N=256", _shaw),
        DemoCase("Transformer-XL seg 256 + mem 256", _xl),
    ]
