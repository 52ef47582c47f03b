"""ListOps (Nangia & Bowman 2018) as in the Long Range Arena (Tay et al. 2021), CPU-sized.

Legend: B batch, N tokens (<= max_len), C = 10 classes.

Grammar (``lra_benchmarks/data/listops.py``): a tree is a digit 0-9 or ``[OP a1 ... ak ]`` with
OP in MIN, MAX, MED (int(median)), SM (sum mod 10) and k in [2, max_args]; a node at depth <
max_depth is a leaf with probability 0.75, at max_depth always. Trees whose token count lies in
[min_len, max_len] are kept (LRA keeps 500 < len < 2000; the default here is 64..256 so that a
run takes minutes on 2 CPU cores). Tokens are LRA's after its preprocessing: the parentheses are
dropped, so ``[MAX 2 9 [MIN 4 7 ] 0 ]`` is 8 tokens. The label is the value of the expression.
A ``SequenceClassifier`` (mean pool) reads the padded tokens.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from functools import cached_property

import torch

from .base import EVAL_SALT, Batch, Defaults, Task, pos_int, py_rng

OPS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
PAD = 0
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPS + (CLOSE,)
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
LEAF_P = 0.25  # LRA's VALUE_P: r > 0.25 makes a leaf


class _TooLong(Exception):
    pass


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list | None = None):
    """An int leaf or (op, [children]), drawn from the distribution of LRA's ``generate_tree`` (its
    uniform draws made from ``rng.random()``, several times faster than ``randint``). ``budget``
    ([tokens left]) aborts a tree as soon as it has more tokens than a caller will keep (the
    kept trees, and so their distribution, are the same as without it)."""
    r = rng.random() if depth < max_depth else 1.0
    if budget is not None:
        budget[0] -= 1 if r > LEAF_P else 2  # a leaf, or an operator and its ']'
        if budget[0] < 0:
            raise _TooLong
    if r > LEAF_P:
        return int(rng.random() * 10)  # uniform on 0..9 (randrange/randint/choice cost ~40x a random())
    n = 2 + int(rng.random() * (max_args - 1))  # uniform on 2..max_args
    children = [generate_tree(rng, depth + 1, max_depth, max_args, budget) for _ in range(n)]
    return (OPS[int(rng.random() * len(OPS))], children)


def tokens(tree) -> list[str]:
    """LRA's token sequence: ``[OP`` children ``]``, parentheses dropped."""
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    out = [op]
    for c in children:
        out += tokens(c)
    return out + [CLOSE]


def evaluate(tree) -> int:
    """The value of a tree (MED: int(median), SM: sum mod 10)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    vals = [evaluate(c) for c in children]
    if op == "[MIN":
        return min(vals)
    if op == "[MAX":
        return max(vals)
    if op == "[MED":
        return int(statistics.median(vals))
    return sum(vals) % 10


def sample(rng: random.Random, *, min_len: int, max_len: int, max_depth: int, max_args: int,
           max_tries: int = 100_000) -> tuple[list[str], int]:
    """One (tokens, label) with min_len <= len(tokens) <= max_len, by rejection (as LRA)."""
    for _ in range(max_tries):
        try:
            tree = generate_tree(rng, 1, max_depth, max_args, [max_len])
        except _TooLong:
            continue
        toks = tokens(tree)
        if min_len <= len(toks) <= max_len:
            return toks, evaluate(tree)
    raise RuntimeError(f"listops: no tree with {min_len} <= length <= {max_len} in {max_tries} draws; "
                       "widen the length range or change max_depth / max_args")


def collate(examples: list[tuple[list[str], int]]) -> Batch:
    """Pad to the longest example: x (B, N), y (B,), padding_mask (B, N) True = pad."""
    n = max(len(t) for t, _ in examples)
    x = torch.full((len(examples), n), PAD, dtype=torch.long)
    for i, (toks, _) in enumerate(examples):
        x[i, :len(toks)] = torch.tensor([TOKEN_ID[t] for t in toks])
    y = torch.tensor([label for _, label in examples])
    return Batch(x, y, x == PAD)


@dataclass(frozen=True)
class ListOps(Task):
    """min_len / max_len: kept token counts; max_depth, max_args: LRA's 10 and 10; num_eval test size.

    Defaults: 2000 test expressions (LRA's test size; the standard error of an accuracy near 37 %
    is about 1.1 points, against 1.5 at 1000). 3000 steps of batch 32 at lr 1e-3 (2 layers, width
    64, 4 heads, learned positions): at 1500 steps the loss was still falling and softmax stopped
    at 34.9 %, at 3000 it reaches 39.8 % (docs/quality.md). A step takes about 0.28 s on one idle
    core (generation included), so a run takes about 15 minutes (30 on the shared, loaded machine).
    """

    min_len: int = 64
    max_len: int = 256
    max_depth: int = 10
    max_args: int = 10
    num_eval: int = 2000

    name = "listops"
    kind = "classify"
    metric = "accuracy"
    num_classes = 10
    defaults = Defaults(layers=2, dim=64, heads=4, steps=3000, batch=32, lr=1e-3, position="learned", eval_every=250)

    def __post_init__(self):
        for f in ("min_len", "max_len", "num_eval"):
            pos_int("listops", f, getattr(self, f))
        pos_int("listops", "max_depth", self.max_depth, 2)
        pos_int("listops", "max_args", self.max_args, 2)
        if self.min_len > self.max_len:
            raise ValueError(f"listops: min_len={self.min_len} must be <= max_len={self.max_len}")

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    def _examples(self, rng: random.Random, n: int):
        return [sample(rng, min_len=self.min_len, max_len=self.max_len, max_depth=self.max_depth,
                       max_args=self.max_args) for _ in range(n)]

    def train_batch(self, step: int, batch: int, seed: int) -> Batch:
        return collate(self._examples(py_rng(seed, step), batch))

    @cached_property
    def _eval(self) -> list:
        return self._examples(py_rng(0, 0, EVAL_SALT), self.num_eval)

    def eval_batches(self, batch: int) -> list[Batch]:
        e = self._eval
        return [collate(e[i:i + batch]) for i in range(0, len(e), batch)]


__all__ = ["ListOps", "generate_tree", "tokens", "evaluate", "sample", "collate", "VOCAB", "TOKEN_ID", "PAD", "OPS"]
