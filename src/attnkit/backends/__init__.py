"""Backend registry. Backends register here; ``attnkit.dispatch`` chooses among them."""

from __future__ import annotations

from .base import AttentionCall, Backend
from .blockwise import BlockwiseBackend
from .flex import FlexBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend

BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


register_backend(ReferenceBackend())
register_backend(SdpaBackend())
register_backend(BlockwiseBackend())
register_backend(FlexBackend())

__all__ = ["AttentionCall", "Backend", "BACKENDS", "register_backend"]
