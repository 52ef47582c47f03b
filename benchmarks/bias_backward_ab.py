"""Attention with bias specs through blockwise, fwd and fwd+bwd, interleaved in one process
(ratios to plain causal taken from the same round), with switches to previous code paths:

- ``alibi_strip``: causal ALiBi with ``linear_in_offset`` off (the translation-invariant strip
  plan and its chunked backward instead of the key-row plan);
- ``biasspec_whole``: the bias spec evaluated on whole rectangles (``EVAL_ELEMENTS`` unbounded)
  instead of 2^20 values at a time;
- ``t5`` / ``t5_tiles``: T5 with a learnable table (no mask, scale 1, the tile-math backward)
  reading the call's ``BiasStrip`` / evaluating the bias on every tile (strip budget 0).

    PYTHONPATH=src python benchmarks/bias_backward_ab.py --size 8192 --threads 2 --rounds 2 \\
        --cases causal,alibi,alibi_strip,biasspec,biasspec_whole,t5,t5_tiles

B=1, H=8, D=64, float32; ``biasspec`` is the bench's causal_biasspec (a linear-decay
``biases.from_function``). Wall-clock seconds; compare ratios within a round only.
"""

from __future__ import annotations

import argparse
import time

import torch

from attnkit import attention, biases, masks
from attnkit.backends import blockwise_fused, blockwise_relative
from attnkit.positions import ALiBi, T5RelativeBias


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", default="causal,alibi,alibi_strip,biasspec")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    H, D = 8, 64
    q, k, v = (torch.randn(1, H, a.size, D, requires_grad=True) for _ in range(3))
    linear, chunk, budget = ALiBi.linear_in_offset, blockwise_fused.EVAL_ELEMENTS, blockwise_relative.STRIP_BUDGET
    spec = biases.from_function(lambda b, h, i, j: -0.01 * (i - j).float(), name="linear_decay")
    t5 = T5RelativeBias(H, init_std=1.0)
    args = {"causal": dict(mask=masks.causal()),
            "alibi": dict(mask=masks.causal(), bias=ALiBi(H)),
            "alibi_strip": dict(mask=masks.causal(), bias=ALiBi(H)),
            "biasspec": dict(mask=masks.causal(), bias=spec),
            "biasspec_whole": dict(mask=masks.causal(), bias=spec),
            "t5": dict(bias=t5.spec(), scale=1.0),
            "t5_tiles": dict(bias=t5.spec(), scale=1.0)}
    for r in range(a.rounds):
        for case in a.cases.split(","):
            ALiBi.linear_in_offset = False if case == "alibi_strip" else linear
            blockwise_fused.EVAL_ELEMENTS = 1 << 62 if case == "biasspec_whole" else chunk
            blockwise_relative.STRIP_BUDGET = 0 if case == "t5_tiles" else budget
            t0 = time.perf_counter()
            with torch.no_grad():
                attention(q, k, v, backend="blockwise", **args[case])
            t1 = time.perf_counter()
            attention(q, k, v, backend="blockwise", **args[case]).sum().backward()
            t2 = time.perf_counter()
            print(f"round {r} {case:12s} fwd {t1 - t0:7.3f} s  fwd+bwd {t2 - t1:7.3f} s", flush=True)
    ALiBi.linear_in_offset, blockwise_fused.EVAL_ELEMENTS, blockwise_relative.STRIP_BUDGET = linear, chunk, budget


if __name__ == "__main__":
    main()
