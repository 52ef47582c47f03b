"""What every softmax-attention backend receives and must state.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim.

``attnkit.attention`` validates the user's arguments once and hands every backend the same
``AttentionCall`` (``attnkit._call``): tensor masks and biases are already wrapped as specs.
A backend states why it cannot run a call in two steps, so the dispatcher never materialises
anything for a backend it would not pick:

- ``static_reasons(call)``: cheap checks of flags, dtypes, devices and sizes;
- ``data_reasons(call)``: checks that look at the data (a dense mask's fully masked rows, a
  bias's infinities), asked only when the static reasons are empty.

An empty list means it can run the call and give the reference's result within the dtype's
tolerance. ``run(call)`` returns out (B, Hq, Nq, Dv), or (out, weights) if call.return_weights.
"""

from __future__ import annotations

from .._call import AttentionCall


class Backend:
    """Base class: a name, reasons it cannot run a call, and how to run it."""

    name: str = "?"

    def static_reasons(self, call: AttentionCall) -> list[str]:
        raise NotImplementedError(f"backend {self.name} must state static_reasons()")

    def data_reasons(self, call: AttentionCall) -> list[str]:
        return []

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        """Static reasons, then (only when there are none) data-dependent ones."""
        return self.static_reasons(call) or self.data_reasons(call)

    def run(self, call: AttentionCall):
        """Return out (B, Hq, Nq, Dv), or (out, weights (B, Hq, Nq, Nk)) if call.return_weights."""
        raise NotImplementedError(f"backend {self.name} must implement run()")


__all__ = ["AttentionCall", "Backend"]
