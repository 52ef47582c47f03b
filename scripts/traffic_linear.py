"""Tensor traffic and FLOPs of causal linear attention (attnkit vs fla's naive chunked form).

    python scripts/traffic_linear.py [--n 16384] [--heads 8] [--dim 64]

Counts, for every aten op of one forward (and one forward + backward of out.sum()), the bytes of
the distinct elements it reads (tensor inputs) and writes (outputs; in-place ops write their
first argument), with views, reshapes and other aliasing ops counted as free, and the matmul
FLOPs (2 m n k per product). Prints bytes per token (total / (B N)) and FLOPs per token. This is
a model of DRAM traffic at tensor granularity (an op that streams a tensor larger than the cache
moves about that much); it ignores cache reuse across ops and the kernels' internal traffic.
Legend: B = 1 batch, H heads, N sequence, D = Dv head dim, float32.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm"}
FREE = {"detach", "alias", "lift_fresh", "_unsafe_view", "empty", "new_empty", "empty_like", "empty_strided",
        "new_empty_strided"}  # aliasing or allocating only


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) view covers."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return n * t.element_size()


class Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.read = self.written = self.flops = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._schema.name.split("::")[-1] in FREE:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        r = sum(distinct_bytes(t) for t in ins)
        w = sum(distinct_bytes(t) for t in outs)
        self.read += r
        self.written += w
        name = func._schema.name.split("::")[-1]
        self.ops[name] = self.ops.get(name, 0) + r + w
        if name in MATMULS:
            a, b = (args[1], args[2]) if name.startswith(("add", "badd")) else (args[0], args[1])
            self.flops += 2 * a.numel() * b.shape[-1]
        return out


def measure(fn, q, k, v, backward: bool) -> Traffic:
    xs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    with Traffic() as tr:
        out = fn(*xs)
        if backward:
            out.sum().backward()
    return tr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    a = p.parse_args()
    from attnkit.bench.cases_linear import fla_naive_chunk
    from attnkit.variants.linear import elu_plus_one, linear_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.n, a.dim, generator=g) for _ in range(3))
    impls = {"attnkit.linear": lambda q, k, v: linear_attention(q, k, v, causal=True)}
    fla = fla_naive_chunk()
    if fla is not None:
        impls["fla.naive_chunk"] = lambda q, k, v: fla(elu_plus_one(q).transpose(1, 2), elu_plus_one(k).transpose(1, 2),
                                                       v.transpose(1, 2), normalize=True).transpose(1, 2)
    print(f"B=1 H={a.heads} N={a.n} D={a.dim} float32; per token = total / N")
    print("impl | mode | bytes/token (read + written) | matmul FLOP/token | top ops by bytes")
    for name, fn in impls.items():
        for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
            tr = measure(fn, q, k, v, bwd)
            top = ", ".join(f"{o} {b / a.n / 1024:.1f}K" for o, b in sorted(tr.ops.items(), key=lambda x: -x[1])[:4])
            print(f"{name} | {mode} | {(tr.read + tr.written) / a.n / 1024:.1f} KiB | "
                  f"{tr.flops / a.n / 1e6:.2f} M | {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
