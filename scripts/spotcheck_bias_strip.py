"""Spot check of the tile math's bias strip at the bench's largest N: T5 with a learnable table,
fwd+bwd through blockwise (fused forward, tile-math backward), reading the call's ``BiasStrip``
vs evaluating the bias on every tile (strip budget 0, the previous path).

    PYTHONPATH=src python scripts/spotcheck_bias_strip.py --size 16384 --threads 1

B=1, H=8, D=64, float32. Prints the max |difference| of the output, q/k/v gradients and the
table's gradient, and their largest magnitudes.
"""

from __future__ import annotations

import argparse
import time

import torch

import attnkit
from attnkit.backends import blockwise_relative
from attnkit.positions import T5RelativeBias


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    H, D = 8, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, a.size, D, generator=g, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, H, a.size, D, generator=g)
    t5 = T5RelativeBias(H, init_std=1.0)
    budget = blockwise_relative.STRIP_BUDGET
    res = []
    for name, b in (("strip", budget), ("per tile", 0)):
        blockwise_relative.STRIP_BUDGET = b
        t = time.perf_counter()
        out = attnkit.attention(q, k, v, bias=t5.spec(), scale=1.0, backend="blockwise")
        res.append((out.detach(), torch.autograd.grad(out, [q, k, v, t5.weight], dout)))
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    blockwise_relative.STRIP_BUDGET = budget
    (o1, g1), (o2, g2) = res
    for name, x, y in zip(["out", "dq", "dk", "dv", "dtable"], (o1, *g1), (o2, *g2)):
        print(f"{name}: max |diff| {(x - y).abs().max().item():.3g}, max |value| {y.abs().max().item():.3g}")


if __name__ == "__main__":
    main()
