"""Spot-check of the transformers bench workload at its largest N: attnkit vs sdpa, same weights.

    PYTHONPATH=src python benchmarks/transformers_spotcheck.py --N 16384

For each variant of ``attnkit bench --families transformers`` (B=2, last row 25% left-padded),
runs the base model (no LM head) once with attn_implementation="attnkit" and once with "sdpa"
and prints the largest difference of the final hidden states over real tokens, with the path
attnkit took (the unpadded rows run plain causal / banded calls). Small-N tests cannot see
bugs that only appear at large N; this is the check at the bench's size.
"""

from __future__ import annotations

import argparse
import time

import torch

from attnkit.bench.cases_transformers import VARIANTS, build_model, padded_batch
from attnkit.bench.registry import BenchShape


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = BenchShape(B=args.batch, H=8, N=args.N, D=64)
    ids, am, pos = padded_batch(shape)
    real = am.bool()
    for variant in VARIANTS:
        out = {}
        for impl in ("attnkit.auto", "sdpa"):
            model = build_model(variant, shape, impl).model  # the decoder stack, no LM head
            t0 = time.perf_counter()
            with torch.no_grad():
                out[impl] = model(ids, attention_mask=am, position_ids=pos, use_cache=False).last_hidden_state
            print(f"{variant} {impl}: {time.perf_counter() - t0:.1f} s", flush=True)
            del model
        diff = (out["attnkit.auto"] - out["sdpa"])[real].abs().max().item()
        scale = out["sdpa"][real].abs().max().item()
        print(f"{variant} N={args.N}: max |attnkit - sdpa| over real tokens = {diff:.2e} (max |h| = {scale:.2f})")


if __name__ == "__main__":
    main()
