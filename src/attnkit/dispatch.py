"""The one dispatch point: which backend runs a call.

``backend="auto"`` walks ``auto_order(call)`` and takes the first backend whose
``not_supported_reasons(call)`` is empty. A named backend that cannot run raises with its
reasons; when nothing fits, the error lists every backend and why. The choice is logged at
DEBUG level on the ``attnkit`` logger.

Decision table for ``auto`` (first that fits):

| call                                              | order                          |
|---------------------------------------------------|--------------------------------|
| return_weights=True                               | reference                      |
| no mask / plain causal / dense tensor mask or bias | sdpa, reference               |
| anything else (structured mask specs, bias specs, softcap, dropout) | sdpa, reference |
"""

from __future__ import annotations

import logging

from .backends import BACKENDS
from .backends.base import AttentionCall

log = logging.getLogger("attnkit")


class NoBackendError(RuntimeError):
    """No backend can run this call; the message lists each backend's reasons."""


def auto_order(call: AttentionCall) -> list[str]:
    if call.return_weights:
        return ["reference"]
    return [n for n in ("sdpa", "reference") if n in BACKENDS]


def choose(call: AttentionCall, backend: str) -> str:
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        reasons = BACKENDS[backend].not_supported_reasons(call)
        if reasons:
            raise NoBackendError(f"backend {backend!r} cannot run this call: " + "; ".join(reasons))
        return backend
    tried = {}
    for name in auto_order(call):
        reasons = BACKENDS[name].not_supported_reasons(call)
        if not reasons:
            log.debug("attnkit.attention: backend %s (auto)%s", name,
                      f"; skipped {tried}" if tried else "")
            return name
        tried[name] = reasons
    for name in BACKENDS:
        if name not in tried:
            tried[name] = BACKENDS[name].not_supported_reasons(call) or ["not in auto's order for this call"]
    lines = "\n".join(f"  - {n}: " + "; ".join(r) for n, r in tried.items())
    raise NoBackendError(f"no backend can run this call:\n{lines}")
