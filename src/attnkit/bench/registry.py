"""Benchmark case registry. Each module under ``attnkit.bench`` that defines cases registers them.

A case says how to build one timed step for a shape and mode; the runner (``attnkit bench``)
times it in a fresh subprocess with warm-up and repeats and measures peak memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BenchShape:
    B: int = 1
    H: int = 8
    N: int = 4096
    D: int = 64
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class BenchCase:
    family: str    # "softmax", "sparse", "positions", "longrange", ...
    variant: str   # what is computed, e.g. "swa256", "causal", "performer_m256"
    impl: str      # who computes it, e.g. "attnkit.blockwise", "sdpa", "flex", "performer-pytorch"
    # make(shape, mode) -> step: a zero-argument callable doing one forward (mode "fwd") or one
    # forward + backward (mode "bwd"). Inputs are built inside make(), outside the timed step.
    make: Callable[[BenchShape, str], Callable[[], object]]
    # available(shape, mode) -> None if the case can run, else a short reason ("no CPU backward").
    available: Callable[[BenchShape, str], str | None] = lambda shape, mode: None
    # Useful FLOPs of one step (for GFLOP/s); None if not meaningful.
    flops: Callable[[BenchShape, str], float] | None = None


CASES: dict[str, BenchCase] = {}


def register(case: BenchCase) -> BenchCase:
    key = f"{case.family}/{case.variant}/{case.impl}"
    if key in CASES:
        raise ValueError(f"bench case {key} registered twice")
    CASES[key] = case
    return case


def random_qkv(shape: BenchShape, grad: bool, *, n: int = 3, nk: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    """``n`` seeded tensors (B, H, N, D) in shape.dtype; all but the first have Nk = nk if given."""
    g = torch.Generator().manual_seed(seed)
    sizes = [shape.N] + [nk or shape.N] * (n - 1)
    return [torch.randn(shape.B, shape.H, s, shape.D, generator=g).to(shape.dtype).requires_grad_(grad) for s in sizes]


def make_step(fn: Callable[[], torch.Tensor], tensors, mode: str) -> Callable[[], torch.Tensor]:
    """One timed step: ``fn()`` under no_grad ("fwd"), or ``fn().sum().backward()`` ("bwd")
    after clearing the gradients of ``tensors``."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn()
        return run

    def run_bwd():
        for t in tensors:
            t.grad = None
        out = fn()
        out.sum().backward()
        return out
    return run_bwd
