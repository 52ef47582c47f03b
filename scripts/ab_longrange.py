"""Interleaved A/B timing of one long-range variant, old code (a git revision) vs this tree, in ONE process.

Usage: PYTHONPATH=src python scripts/ab_longrange.py --old main --case nystrom [--reps 5] [--n 16384]

The old revision's variant module (and, for lsh, lsh_chunks) is loaded from ``git show`` as a sibling
module of ``attnkit.variants``, so both versions share everything else. B=1, H=8, D=64, float32,
torch.set_num_threads(2); forward (no_grad) and forward + backward of ``out.sum()``, old and new
alternated ``--reps`` times; prints medians, new/old and every pair (the machine is shared: compare
ratios from the same run only). Also prints the largest output/gradient difference of new vs old.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time

import torch

FILES = {"nystrom": "nystrom", "linear": "linear", "lsh": "lsh_chunks"}


def load_old(rev: str, name: str):
    src = subprocess.run(["git", "show", f"{rev}:src/attnkit/variants/{name}.py"], check=True,
                         capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    import attnkit.variants  # noqa: F401  (parent package for the relative imports)
    spec = importlib.util.spec_from_file_location(f"attnkit.variants._ab_old_{name}", f.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="main")
    ap.add_argument("--case", choices=sorted(FILES), required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=16384)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from attnkit.variants import linear, lsh, lsh_chunks, nystrom
    old = load_old(a.old, FILES[a.case])
    new = {"nystrom": nystrom, "linear": linear, "lsh": lsh_chunks}[a.case]
    torch.manual_seed(0)
    x = [torch.randn(1, 8, a.n, 64, requires_grad=True) for _ in range(3)]
    conv = torch.randn(8, 33) / 33

    def call(mod):
        q, k, v = x
        if a.case == "nystrom":
            return mod.nystrom_attention(q, k, v, num_landmarks=256, conv_kernel=conv)
        if a.case == "linear":
            return mod.linear_attention(q, k, v, causal=True)
        lsh.lsh_chunks = mod  # lsh.py calls lsh_chunks.plan / attend through the module attribute
        return lsh.lsh_attention(q, v, n_hashes=8, bucket_size=64, seed=0)

    def run(mod, bwd):
        for t in x:
            t.grad = None
        if not bwd:
            with torch.no_grad():
                return call(mod), None
        out = call(mod)
        out.sum().backward()
        return out, [None if t.grad is None else t.grad.clone() for t in x]

    (o1, g1), (o2, g2) = run(old, True), run(new, True)
    diffs = [(a_ - b_).abs().max().item() for a_, b_ in zip([o1, *g1], [o2, *g2]) if a_ is not None]
    print(f"case {a.case}, old = {a.old}: max |new - old| out, grads: {diffs}")
    for bwd in (False, True):
        times = {"old": [], "new": []}
        for _ in range(a.reps):
            for name, mod in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                run(mod, bwd)
                times[name].append(time.perf_counter() - t0)
        mo, mn = statistics.median(times["old"]), statistics.median(times["new"])
        pairs = " ".join(f"{p:.2f}/{q:.2f}" for p, q in zip(times["old"], times["new"]))
        print(f"{'fwd+bwd' if bwd else 'fwd'}: old {mo:.3f} s, new {mn:.3f} s, new/old {mn / mo:.3f}  (old/new: {pairs})")


if __name__ == "__main__":
    main()
