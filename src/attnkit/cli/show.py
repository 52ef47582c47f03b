"""``attnkit show SPEC --size N``: draw a mask spec (ASCII) or a positional bias (numbers), and a
PNG (or SVG/PDF) of it when ``--out FILE`` is given (that needs matplotlib: ``attnkit[cli]``).

SPEC is a small expression over the spec constructors, e.g. ``causal``,
``"sliding_window(3) | global_tokens([0])"``, ``"bigbird(block_size=4)"``, ``"alibi(8)"``.
It is parsed with ``ast`` and only whitelisted constructors, literals, ``&`` and ``|`` (masks)
and ``+`` (biases) are accepted (nothing is eval'ed). Lists become tensors.

Nothing is written unless ``--out`` is given; then the path written is printed. The drawing is
an Nq x Nk matrix, so both sizes are capped at ``MAX_SIZE``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from .. import masks as M
from .._expr import parse_expr
from ..biases import Bias

MAX_SIZE = 2048  # per side: show materialises the Nq x Nk matrix; a PNG cannot resolve more anyway
ASCII_MAX_MASK, ASCII_MAX_BIAS = 160, 24  # widest picture / number grid printed to the terminal
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
INSTALL_HINT = "pip install 'attnkit[cli]'"


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


def parse_spec(text: str, names: dict | None = None):
    """Build a mask or bias spec from an expression such as ``causal & sliding_window(3)``
    (``attnkit._expr``: masks combine with & and |, biases with +)."""
    return parse_expr(text, _constructors() if names is None else names)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help='e.g. causal, "sliding_window(3) | global_tokens([0])", "bigbird(block_size=4)", "alibi(8)"')
    p.add_argument("--size", type=int, default=32, help=f"sequence length N of the keys (and queries), 1..{MAX_SIZE}")
    p.add_argument("--nq", type=int, default=None,
                   help=f"number of queries if different from --size (bottom-right aligned), 1..{MAX_SIZE}")
    p.add_argument("--head", type=int, default=0, help="which head to draw (>= 0)")
    p.add_argument("--mask", default=None, help='for a bias: blank out pairs this mask blocks, e.g. "causal"')
    p.add_argument("--out", default=None,
                   help=f"also draw it into this file ({', '.join(IMAGE_SUFFIXES)}; needs matplotlib: {INSTALL_HINT})")


def check_args(args) -> None:
    """Reject option values before any work, naming the option, its value and what is allowed."""
    for opt, value in (("--size", args.size), ("--nq", args.nq)):
        if value is None:
            continue
        if value < 1:
            raise ValueError(f"{opt} must be >= 1, got {value}")
        if value > MAX_SIZE:
            raise ValueError(f"{opt} {value} is above show's limit of {MAX_SIZE} (it draws the whole Nq x Nk "
                             f"matrix); draw a smaller N, the pattern repeats")
    if args.head < 0:
        raise ValueError(f"--head must be >= 0, got {args.head}")
    if args.out is not None and not args.out.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"--out must name a {', '.join(IMAGE_SUFFIXES)} file, got {args.out!r}")


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _image(matrix: torch.Tensor, title: str, path: str, heat: bool) -> None:
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


def _draw_bias(spec: Bias, args, nq: int, nk: int) -> torch.Tensor:
    dense = spec.to_dense(nq, nk, heads=args.head + 1)
    matrix = dense.expand(1, args.head + 1, nq, nk)[0, args.head].clone()  # (Nq, Nk)
    if args.mask:
        blocker = parse_spec(args.mask)
        if not isinstance(blocker, M.Mask):
            raise ValueError(f"--mask {args.mask!r} is not a mask spec (got {type(blocker).__name__})")
        matrix[~blocker.to_dense(nq, nk, heads=args.head + 1)[0, args.head]] = float("nan")  # drawn blank
    finite = matrix[~matrix.isnan()]
    summary = f"min {finite.min():.3f}, max {finite.max():.3f}" if finite.numel() else "every pair blocked by --mask"
    print(f"{spec!r}  head {args.head}, Nq={nq}, Nk={nk}; {summary}")
    if nk <= ASCII_MAX_BIAS:
        print("\n".join(" ".join(f"{x:6.2f}" for x in row.tolist()) for row in matrix))
    else:
        print(f"(Nk > {ASCII_MAX_BIAS}: too wide for the numbers; --out FILE.png draws the heat map)")
    return matrix


def _draw_mask(spec: M.Mask, args, nq: int, nk: int) -> torch.Tensor:
    if args.mask:
        raise ValueError(f"--mask applies to a bias spec; combine masks with & instead: '{args.spec} & {args.mask}'")
    matrix = spec.to_dense(nq, nk, heads=args.head + 1)[0, args.head]  # (Nq, Nk)
    density = matrix.float().mean().item()
    print(f"{spec!r}  head {args.head}, Nq={nq}, Nk={nk}; {density:.1%} of pairs may attend ('#')")
    if nk <= ASCII_MAX_MASK:
        print(spec.picture(nq, nk, head=args.head))
    else:
        print(f"(Nk > {ASCII_MAX_MASK}: too wide for ASCII; --out FILE.png draws it)")
    return matrix


def run(args) -> int:
    check_args(args)
    spec = parse_spec(args.spec)
    nk = args.size
    nq = nk if args.nq is None else args.nq
    if isinstance(spec, Bias):
        matrix, heat = _draw_bias(spec, args, nq, nk), True
    elif isinstance(spec, M.Mask):
        matrix, heat = _draw_mask(spec, args, nq, nk), False
    else:
        raise ValueError(f"{args.spec!r} is neither a mask nor a bias spec")
    if args.out is None:
        need = "" if has_matplotlib() else f" (needs matplotlib: {INSTALL_HINT})"
        print(f"For a picture file add --out FILE.png{need}.")
        return 0
    if not has_matplotlib():
        raise ValueError(f"--out {args.out!r} needs matplotlib, which is not installed: {INSTALL_HINT}")
    _image(matrix, repr(spec) + ("" if heat else "\nblack = may attend"), args.out, heat)
    print(f"wrote {os.path.abspath(args.out)}")
    return 0
