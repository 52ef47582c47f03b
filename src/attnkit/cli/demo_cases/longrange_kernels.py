"""Demo rows for additive (Bahdanau), linear (elu+1) and Performer FAVOR+ attention.

Workloads (float32, seeded): additive B=1, H=4, N=256, D=A=32 (its cost is N^2 A);
linear and Performer B=1, H=8, N=1024, D=64, q and k drawn N(0, 0.5^2), v N(0, 1), m=256 features.
Each exact row compares the fast path with its own float64 materialised formula (Performer: the
same random features). The Performer row against exact softmax attention carries the expected
error measured by ``error_table()`` (see docs/longrange-kernels.md):

    python -c "from attnkit.cli.demo_cases.longrange_kernels import error_table; error_table()"
"""

from __future__ import annotations

import math

import torch

from ...masks import causal
from ...variants.additive import additive_attention
from ...variants.linear import elu_plus_one, linear_attention
from ...variants.performer import draw_favor_projection, favor_features, performer_attention
from ..demo_api import DemoCase, Prepared

B, H, N, D, M_FEATURES, SIGMA = 1, 8, 1024, 64, 256, 0.5
# Max |performer - exact softmax| on the demo workload (non-causal, m=256, projection seed 0) is
# 0.65 (float32 and float64 alike); the demo flags a run above 0.7. See error_table().
PERFORMER_EXPECTED_MAX_ERROR = 0.7


def _qkv(n=N, h=H, d=D, sigma=SIGMA, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    return (sigma * q).to(dtype), (sigma * k).to(dtype), v.to(dtype)


def _masked_kernel_attention(a: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """out = A v / A 1 with A (B, H, Nq, Nk) >= 0 zeroed where not allowed; float64."""
    if allowed is not None:
        a = a * allowed
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, (a @ v) / torch.where(den > 0, den, 1.0), 0.0)


def naive_additive(q, k, v, w_q, w_k, v_a, allowed=None):
    """Float64 materialised additive attention: (B, H, Nq, Nk, A) tanh tensor, masked softmax."""
    pq = torch.einsum("bhnd,had->bhna", q, w_q)
    pk = torch.einsum("bhnd,had->bhna", k, w_k)
    e = (torch.tanh(pq[:, :, :, None] + pk[:, :, None]) * v_a[None, :, None, None]).sum(-1)  # (B, H, Nq, Nk)
    if allowed is not None:
        e = e.masked_fill(~allowed, float("-inf"))
    return torch.softmax(e, dim=-1) @ v


def _additive() -> Prepared:
    n, h, d = 256, 4, 32
    q, k, v = _qkv(n, h, d, sigma=1.0)
    g = torch.Generator().manual_seed(1)
    w_q, w_k = (torch.randn(h, d, d, generator=g) / math.sqrt(d) for _ in range(2))
    v_a = torch.randn(h, d, generator=g) / math.sqrt(d)
    allowed = causal().to_dense(n, n)
    return Prepared(
        run=lambda: additive_attention(q, k, v, w_q, w_k, v_a, mask=causal()),
        reference=lambda: naive_additive(*(t.double() for t in (q, k, v, w_q, w_k, v_a)), allowed=allowed),
        backend="attnkit.additive (tiled, online softmax)",
    )


def _linear() -> Prepared:
    q, k, v = _qkv()
    allowed = causal().to_dense(N, N)

    def reference():
        a = elu_plus_one(q.double()) @ elu_plus_one(k.double()).transpose(-1, -2)
        return _masked_kernel_attention(a, v.double(), allowed)
    return Prepared(run=lambda: linear_attention(q, k, v, causal=True), reference=reference,
                    backend="attnkit.linear (chunked causal)")


def _performer_formula(q, k, v, w, allowed=None):
    s = q.shape[-1] ** -0.25
    a = favor_features(q * s, w) @ favor_features(k * s, w).transpose(-1, -2)  # raw estimator, float64
    return _masked_kernel_attention(a, v, allowed)


def exact_softmax(q, k, v, is_causal=False):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if is_causal:
        s = s.masked_fill(~causal().to_dense(q.shape[2], k.shape[2]), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _performer(is_causal: bool, vs_softmax: bool):
    def prepare() -> Prepared:
        q, k, v = _qkv()
        w = draw_favor_projection(M_FEATURES, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        run = lambda: performer_attention(q, k, v, projection=w.float(), causal=is_causal)
        qd, kd, vd = q.double(), k.double(), v.double()
        if vs_softmax:
            return Prepared(run=run, reference=lambda: exact_softmax(qd, kd, vd, is_causal),
                            backend="attnkit.performer vs exact softmax", expected_error=PERFORMER_EXPECTED_MAX_ERROR,
                            bound_source="docs/longrange-kernels.md, approximation error table")
        allowed = causal().to_dense(N, N) if is_causal else None
        return Prepared(run=run, reference=lambda: _performer_formula(qd, kd, vd, w, allowed),
                        backend="attnkit.performer (same features)")
    return prepare


def cases() -> list[DemoCase]:
    return [
        DemoCase("additive (Bahdanau), causal, A=32", _additive),
        DemoCase("linear attention elu+1, causal", _linear),
        DemoCase(f"Performer FAVOR+ m={M_FEATURES}, causal (vs its formula)", _performer(True, False)),
        DemoCase(f"Performer FAVOR+ m={M_FEATURES} vs exact softmax", _performer(False, True)),
    ]


def error_table(features=(64, 256, 1024), sigmas=(0.5, 1.0), seeds=3) -> list[dict]:
    """Approximation error vs exact softmax attention (float64, B=1, H=8, N=1024, D=64).

    q, k ~ N(0, sigma^2), v ~ N(0, 1), input seed 0; Performer averaged over ``seeds``
    projection draws; linear attention (elu+1, a different model) for information.
    Reports relative Frobenius error |out - exact| / |exact| and max |out - exact|.
    """
    rows = []
    for sigma in sigmas:
        q, k, v = _qkv(sigma=sigma, dtype=torch.float64)
        for is_causal in (False, True):
            exact = exact_softmax(q, k, v, is_causal)
            for m in features:
                rel, mx = [], []
                for s in range(seeds):
                    w = draw_favor_projection(m, D, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                    out = performer_attention(q, k, v, projection=w, causal=is_causal)
                    rel.append(float((out - exact).norm() / exact.norm()))
                    mx.append(float((out - exact).abs().max()))
                rows.append(dict(variant=f"performer m={m}", sigma=sigma, causal=is_causal,
                                 rel=sum(rel) / seeds, max=sum(mx) / seeds))
            out = linear_attention(q, k, v, causal=is_causal)
            rows.append(dict(variant="linear elu+1", sigma=sigma, causal=is_causal,
                             rel=float((out - exact).norm() / exact.norm()), max=float((out - exact).abs().max())))
    print("| variant | q,k std | causal | rel. Frobenius error | max abs error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['sigma']} | {r['causal']} | {r['rel']:.3f} | {r['max']:.3f} |")
    return rows
