"""Spot-check the long-range fast paths at the bench's largest size against the code they replaced.

    python scripts/spotcheck_longrange.py [--old REV] [--n 16384] [--only linear_causal,lsh]

The old code is taken from git revision REV (default: the commit before issue 15's changes) with
``git archive`` into a temporary directory and imported as ``attnkit_old``. For each case, with
B=1, H=8, N, D=64 and the bench's inputs, it runs forward and backward (a fixed random upstream
gradient) of the old code in float64 (the reference), the old code in float32 and the new code in
float32, and prints for the output and each input gradient the largest error as a fraction of the
float32 tolerance (``attnkit.tolerances.tol(float32, "blockwise")``, gradients with the gradient
factor): <= 1 is within the table. "old f32" shows what the replaced path itself reached.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def load_old(rev: str):
    tmp = tempfile.mkdtemp(prefix="attnkit-old-")
    arch = subprocess.run(["git", "-C", REPO, "archive", rev, "src/attnkit"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=arch, check=True)
    os.rename(os.path.join(tmp, "src", "attnkit"), os.path.join(tmp, "attnkit_old"))
    sys.path.insert(0, tmp)
    return importlib.import_module("attnkit_old")


def same_buckets(qk: torch.Tensor, rotations: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Buckets from qk rounded to float32 and float32 rotations, hashed in float64: identical for
    every path and dtype (hashing in two precisions, or by two matmul layouts, moves near-ties to
    other buckets, and seeded rotations differ per dtype)."""
    x = qk.detach().float().double()
    r = torch.randn(rotations.shape, generator=torch.Generator().manual_seed(0)).double()  # not the dtype's draw
    rot = torch.einsum("bhnd,drk->bhrnk", x, r)
    return torch.cat([rot, -rot], dim=-1).argmax(dim=-1)


def cases(pkg: str, n: int):
    """name -> fn(q, k, v) on (1, 8, n, 64) tensors; the same for the old and the new package."""
    v = importlib.import_module(f"{pkg}.variants")
    lin = importlib.import_module(f"{pkg}.variants.linear")
    perf = importlib.import_module(f"{pkg}.variants.performer")
    lsh = importlib.import_module(f"{pkg}.variants.lsh")
    nys = importlib.import_module(f"{pkg}.variants.nystrom")
    del v
    lsh.lsh_buckets = same_buckets

    def w(x):
        return perf.draw_favor_projection(256, 64, generator=torch.Generator().manual_seed(2), dtype=x.dtype)

    conv = torch.randn(8, 33, generator=torch.Generator().manual_seed(1)) / 33
    return {
        "linear_causal": lambda q, k, v: lin.linear_attention(q, k, v, causal=True),
        "linear_noncausal": lambda q, k, v: lin.linear_attention(q, k, v),
        "performer_noncausal": lambda q, k, v: perf.performer_attention(q, k, v, projection=w(q)),
        "performer_causal": lambda q, k, v: perf.performer_attention(q, k, v, projection=w(q), causal=True),
        "lsh": lambda q, k, v: lsh.lsh_attention(q, v, n_hashes=8, bucket_size=64, seed=0),
        "lsh_causal": lambda q, k, v: lsh.lsh_attention(q, v, n_hashes=8, bucket_size=64, seed=0, causal=True),
        "nystrom": lambda q, k, v: nys.nystrom_attention(q, k, v, num_landmarks=256, conv_kernel=conv.to(q.dtype)),
    }


def run(fn, dtype, n):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out = fn(q, k, v)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), gout, allow_unused=True)
    return [out.detach().double()] + [None if x is None else x.double() for x in grads]


def err(a, b, grad: bool) -> float:
    from attnkit.tolerances import tol

    t = tol(torch.float32, "blockwise", grad=grad)
    if a is None or b is None:
        return float("nan")
    return float(((a - b).abs() / (t["atol"] + t["rtol"] * b.abs())).max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="d50056a", help="git revision of the replaced code")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--only", default="", help="comma list of case names")
    a = p.parse_args()
    torch.set_num_threads(2)
    load_old(a.old)
    new, old = cases("attnkit", a.n), cases("attnkit_old", a.n)
    names = [c for c in new if not a.only or c in a.only.split(",")]
    print(f"N={a.n}: largest error / float32 tolerance (blockwise; gradients x10), reference = old code in float64")
    print("case | path | out | dq | dk | dv")
    for name in names:
        ref = run(old[name], torch.float64, a.n)
        for label, fn in (("old f32", old[name]), ("new f32", new[name])):
            got = run(fn, torch.float32, a.n)
            cells = [f"{err(x, y, i > 0):.2e}" for i, (x, y) in enumerate(zip(got, ref))]
            print(f"{name} | {label} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
