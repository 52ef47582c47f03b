"""Multi-query associative recall (Zoology, Arora et al. 2023), as ``zoology/data/multiquery_ar.py``.

Legend: B batch, L seq_len, P num_kv_pairs, V vocab.

A sequence starts with P key-value pairs k1 v1 ... kP vP (keys distinct, from [1, V/2); values
distinct, from [V/2, V)); the remaining L - 2P positions hold the P keys again as queries, each
at an even offset 2 g from the end of the context, the gaps g drawn without replacement with
p(g) ~ a g^(a-1), a = 0.01 (short gaps likelier). Every other position (the filler after the
context) holds a random token from the whole vocabulary (Zoology's class default,
``random_non_queries=True``): a query's key can recur in the filler followed by some other
token, and only a model that knows where the context ends can tell the copies apart.
``random_non_queries=False`` (Zoology's published Fig. 2 configs) fills it with token 0, which no
key or value uses; at this task's default budget softmax does not leave the 1/8 plateau on that
task, while the random filler gives it a signal to follow (docs/quality.md, mqar). The target at a
query's position is its value (IGNORE elsewhere): a causal model must recall it from the
context. Accuracy: the fraction of queries whose argmax is the value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import IGNORE, Batch, Defaults, GeneratedTask, pos_int


def _distinct(b: int, low: int, high: int, n: int, g: torch.Generator) -> torch.Tensor:
    """(b, n) distinct integers from [low, high) per row."""
    return torch.rand(b, high - low, generator=g).argsort(dim=1)[:, :n] + low


def mqar_batch(b: int, *, vocab: int, seq_len: int, num_kv_pairs: int, g: torch.Generator,
               power_a: float = 0.01, random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, L) tokens and y (b, L) targets (the value at each query position, IGNORE elsewhere);
    the filler is random tokens from [0, V), or token 0 without ``random_non_queries``."""
    P, L, V = num_kv_pairs, seq_len, vocab
    ctx = 2 * P
    keys = _distinct(b, 1, V // 2, P, g)                                    # (b, P)
    values = _distinct(b, V // 2, V, P, g)                                  # (b, P)
    space = (L - ctx) // 2
    w = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(w.expand(b, space), P, replacement=False, generator=g)  # (b, P)
    if random_non_queries:
        x = torch.randint(0, V, (b, L), generator=g)                        # (b, L) random filler
    else:
        x = torch.zeros(b, L, dtype=torch.long)                             # (b, L) filler 0: no key, no value
    x[:, 0:ctx:2], x[:, 1:ctx:2] = keys, values
    qpos = ctx + 2 * gaps                                                   # (b, P) query positions
    x.scatter_(1, qpos, keys)
    y = torch.full((b, L), IGNORE, dtype=torch.long)
    y.scatter_(1, qpos, values)
    return x, y


@dataclass(frozen=True)
class MQAR(GeneratedTask):
    """vocab V (keys from the lower half, values from the upper), seq_len L, num_kv_pairs P
    (4 P <= L), num_eval: size of the fixed test set; random_non_queries: random filler tokens
    (Zoology's class default) instead of token 0 (its published configs)."""

    vocab: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 8
    num_eval: int = 1000
    random_non_queries: bool = True

    name = "mqar"
    kind = "lm"
    metric = "accuracy"
    # Random filler (the default): softmax sits on the 1/8 plateau (one of the values, not which) until
    # ~1800 and ends at 0.828 (0.976 after 8000), capped near 0.978 for a position-blind look-up by later
    # copies of the keys. With filler 0 (random_non_queries=False) it stays on the plateau through these
    # 4000 steps at seeds 0 and 1 (0.143), also with lr 1e-2, T5 positions or batch 256 (docs/quality.md)
    defaults = Defaults(layers=2, dim=64, heads=2, steps=4000, batch=64, lr=3e-3, position="rope", eval_every=100)

    def __post_init__(self):
        for f in ("vocab", "seq_len", "num_kv_pairs", "num_eval"):
            pos_int("mqar", f, getattr(self, f))
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"mqar: seq_len={self.seq_len} must be >= 4 * num_kv_pairs = {4 * self.num_kv_pairs}")
        if self.num_kv_pairs >= self.vocab // 2:
            raise ValueError(f"mqar: num_kv_pairs={self.num_kv_pairs} needs vocab > {2 * self.num_kv_pairs + 1} "
                             "(distinct keys from [1, V/2))")
        if not isinstance(self.random_non_queries, bool):
            raise ValueError(f"mqar: random_non_queries must be True or False, got {self.random_non_queries!r}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def max_len(self) -> int:
        return self.seq_len

    def _batch(self, b: int, g: torch.Generator) -> Batch:
        x, y = mqar_batch(b, vocab=self.vocab, seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs, g=g,
                          random_non_queries=self.random_non_queries)
        return Batch(x, y)


__all__ = ["MQAR", "mqar_batch"]
