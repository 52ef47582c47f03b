"""What a demo row is. Modules in ``attnkit.cli.demo_cases`` export ``cases() -> list[DemoCase]``.

The demo driver calls ``prepare()``, which builds inputs (default workload, seeded) and returns
a ``Prepared``: ``run`` is the timed call (the fast path, in the workload dtype), ``reference``
recomputes the same thing in float64 by the plain formula, and ``backend`` says what ran. The
driver times ``run``, measures its peak memory, and reports max |run() - reference()|; rows with
an ``expected_error`` are approximations, labelled "approx" with their documented bound.
A case that cannot run raises; the driver then prints no row for it (only the reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prepared:
    run: Callable[[], torch.Tensor]
    reference: Callable[[], torch.Tensor]
    backend: str
    # For approximations (Performer, Nystrom, LSH vs exact attention): the error bound the docs
    # state, so the demo labels the row "approx" (a large error there is expected) and flags a
    # result outside it. None = exact (checked against the dtype tolerance).
    expected_error: float | None = None
    # Where that bound is documented (printed under the table), e.g. "docs/longrange-kernels.md".
    bound_source: str = ""

    def __post_init__(self):
        if self.expected_error is not None and not self.bound_source:
            raise ValueError(f"{self.backend}: an expected_error needs its bound_source (where it is documented)")


@dataclass(frozen=True)
class DemoCase:
    variant: str
    prepare: Callable[[], Prepared]
