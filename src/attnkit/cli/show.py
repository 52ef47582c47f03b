"""``attnkit show SPEC --size N``: draw a mask spec (ASCII + PNG) or a positional bias (heat map).

SPEC is a small expression over the spec constructors, e.g. ``causal``,
``"sliding_window(3) | global_tokens([0])"``, ``"bigbird(block_size=4)"``, ``"alibi(8)"``.
It is parsed with ``ast`` and only whitelisted constructors, literals, ``&`` and ``|`` are
accepted (nothing is eval'ed). Lists become tensors.
"""

from __future__ import annotations

import argparse
import ast

import torch

from .. import masks as M
from ..biases import Bias


def _constructors() -> dict:
    names = {n: getattr(M, n) for n in ("causal", "sliding_window", "prefix_lm", "key_padding", "document",
                                         "dilated", "strided", "fixed", "block_sparse", "global_tokens", "bigbird")}
    try:  # positional biases, when the positions package is present
        from .. import positions as P
        for n in ("alibi", "t5"):
            if hasattr(P, f"show_{n}"):
                names[n] = getattr(P, f"show_{n}")
    except ImportError:
        pass
    return names


def _to_value(node: ast.AST):
    value = ast.literal_eval(node)
    if isinstance(value, list):
        value = torch.tensor(value)
        if value.dtype == torch.int64 and value.dim() == 2 and set(value.unique().tolist()) <= {0, 1}:
            value = value.bool()  # 0/1 matrices are layouts
    return value


def parse_spec(text: str, names: dict | None = None):
    """Build a mask or bias spec from an expression such as ``causal & sliding_window(3)``."""
    names = _constructors() if names is None else names

    def build(node):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            left, right = build(node.left), build(node.right)
            return left & right if isinstance(node.op, ast.BitAnd) else left | right
        if isinstance(node, ast.Name):
            node = ast.Call(func=node, args=[], keywords=[])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id not in names:
                raise ValueError(f"unknown spec {node.func.id!r}; known: {', '.join(sorted(names))}")
            args = [_to_value(a) for a in node.args]
            kwargs = {kw.arg: _to_value(kw.value) for kw in node.keywords}
            return names[node.func.id](*args, **kwargs)
        raise ValueError(f"cannot read {ast.unparse(node)!r}: use constructor calls combined with & and |")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"SPEC {text!r} is not a valid expression: {e.msg}") from None
    return build(tree.body)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help='e.g. causal, "sliding_window(3) | global_tokens([0])", "bigbird(block_size=4)", "alibi(8)"')
    p.add_argument("--size", type=int, default=32, help="sequence length N (queries and keys)")
    p.add_argument("--nq", type=int, default=None, help="number of queries if different from --size (bottom-right aligned)")
    p.add_argument("--head", type=int, default=0, help="which head to draw")
    p.add_argument("--mask", default=None, help='for a bias: blank out pairs this mask blocks, e.g. "causal"')
    p.add_argument("--out", default=None, help="PNG path (default: show-<spec>.png; 'none' for ASCII only)")


def _png(matrix: torch.Tensor, title: str, path: str, heat: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6 * matrix.shape[0] / matrix.shape[1] + 0.6))
    im = ax.imshow(matrix.float().numpy(), cmap="viridis" if heat else "Greys", interpolation="nearest",
                   vmin=None if heat else 0, vmax=None if heat else 1)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(title, fontsize=9)
    if heat:
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    spec = parse_spec(args.spec)
    nk, nq = args.size, args.nq or args.size
    if isinstance(spec, Bias):
        dense = spec.to_dense(nq, nk, heads=args.head + 1)
        matrix = dense.expand(1, args.head + 1, nq, nk)[0, args.head].clone()
        if args.mask:
            blocked = ~parse_spec(args.mask).to_dense(nq, nk, heads=args.head + 1)[0, args.head]
            matrix[blocked] = float("nan")  # drawn blank; ASCII shows nan
        finite = matrix[~matrix.isnan()]
        print(f"{spec!r}  head {args.head}, Nq={nq}, Nk={nk}; min {finite.min():.3f}, max {finite.max():.3f}")
        if nk <= 24:
            print("\n".join(" ".join(f"{x:6.2f}" for x in row.tolist()) for row in matrix))
        heat = True
    elif isinstance(spec, M.Mask):
        matrix = spec.to_dense(nq, nk, heads=args.head + 1)[0, args.head]
        density = matrix.float().mean().item()
        print(f"{spec!r}  head {args.head}, Nq={nq}, Nk={nk}; {density:.1%} of pairs may attend ('#')")
        if nk <= 160:
            print(spec.picture(nq, nk, head=args.head))
        else:
            print("(too wide for ASCII; see the PNG)")
        heat = False
    else:
        raise ValueError(f"{args.spec!r} is neither a mask nor a bias spec")
    if args.out != "none":
        slug = "".join(c if c.isalnum() else "_" for c in args.spec).strip("_")[:60]
        path = args.out or f"show-{slug}.png"
        _png(matrix, repr(spec) + ("" if heat else "\nblack = may attend"), path, heat)
        print(f"wrote {path}")
    return 0
