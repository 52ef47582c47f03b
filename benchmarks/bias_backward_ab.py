"""Causal attention with and without bias specs through blockwise, fwd and fwd+bwd, interleaved in
one process (ratios to plain causal taken from the same round), with a switch to the previous
causal-ALiBi plan (``alibi_strip``: ``linear_in_offset`` off, so ALiBi runs the translation-
invariant strip plan and its chunked backward).

    PYTHONPATH=src python benchmarks/bias_backward_ab.py --size 8192 --threads 2 --rounds 2 \\
        --cases causal,alibi,alibi_strip,biasspec

B=1, H=8, D=64, float32; ``biasspec`` is the bench's causal_biasspec (a linear-decay
``biases.from_function``). Wall-clock seconds; compare ratios within a round only.
"""

from __future__ import annotations

import argparse
import time

import torch

from attnkit import attention, biases, masks
from attnkit.positions import ALiBi


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
    linear = ALiBi.linear_in_offset
    args = {"causal": dict(mask=masks.causal()),
            "alibi": dict(mask=masks.causal(), bias=ALiBi(H)),
            "alibi_strip": dict(mask=masks.causal(), bias=ALiBi(H)),
            "biasspec": dict(mask=masks.causal(),
                             bias=biases.from_function(lambda b, h, i, j: -0.01 * (i - j).float(), name="linear_decay"))}
    for r in range(a.rounds):
        for case in a.cases.split(","):
            ALiBi.linear_in_offset = False if case == "alibi_strip" else linear
            t0 = time.perf_counter()
            with torch.no_grad():
                attention(q, k, v, backend="blockwise", **args[case])
            t1 = time.perf_counter()
            attention(q, k, v, backend="blockwise", **args[case]).sum().backward()
            t2 = time.perf_counter()
            print(f"round {r} {case:12s} fwd {t1 - t0:7.3f} s  fwd+bwd {t2 - t1:7.3f} s", flush=True)
    ALiBi.linear_in_offset = linear


if __name__ == "__main__":
    main()
