"""What a demo row is. Modules in ``attnkit.cli.demo_cases`` export ``cases() -> list[DemoCase]``.

The demo driver calls ``prepare()``, which builds inputs (default workload, seeded) and returns
a ``Prepared``: ``run`` is the timed call (the fast path, in the workload dtype), ``reference``
recomputes the same thing in float64 by the plain formula, and ``backend`` says what ran. The
driver times ``run``, measures its peak memory, and reports max |run() - reference()|.
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
    # For approximations (Performer, Nystrom, ...): the error the docs state as expected, so the
    # demo can flag a result outside it. None = exact (checked against the dtype tolerance).
    expected_error: float | None = None


@dataclass(frozen=True)
class DemoCase:
    variant: str
    prepare: Callable[[], Prepared]
