"""The one dispatch point: which backend runs a call.

``backend="auto"`` walks ``auto_order(call)`` and takes the first backend whose
``not_supported_reasons(call)`` is empty. A named backend that cannot run raises with its
reasons; when nothing fits, the error lists every backend and why. The choice is logged at
DEBUG level on the ``attnkit`` logger.

Decision table for ``auto`` (first backend in the order whose reasons are empty; "small" means
B * Hq * Nq * Nk <= 2^20 and Nk <= 4096, where materialising a mask for sdpa costs less than
planning tiles; a decode step against a long cache is not small: blockwise reads only the keys the
mask allows; numbers behind each row are in docs/performance.md, measured by ``attnkit bench``):

| call                                                        | CPU order                  | CUDA order                       |
|-------------------------------------------------------------|----------------------------|----------------------------------|
| return_weights=True                                         | reference                  | reference                        |
| no mask or plain causal (Nq == Nk), no bias; grads or not   | sdpa, blockwise, reference | sdpa, blockwise, reference       |
| dense bool-tensor mask and/or float bias tensor             | sdpa, blockwise, reference | sdpa, blockwise, reference       |
| small call, any mask spec / bias spec                       | sdpa, blockwise, reference | sdpa, flex, blockwise, reference |
| sliding window, block sparse, document, other mask specs,   | blockwise, sdpa, reference | flex, sdpa, blockwise, reference |
|   causal with Nq != Nk, bias specs; grads or not            |                            |                                  |
| softcap, or dropout_p > 0 (sdpa cannot reproduce them)      | blockwise, reference       | flex, blockwise, reference       |

Reasons behind the rows:
- sdpa's fused flash kernel is the fastest exact path for dense and causal attention (forward and
  backward) on CPU and CUDA; auto simply calls it there.
- A mask spec or bias spec given to sdpa is materialised as an Nq x Nk tensor and skips no work;
  blockwise skips empty tiles and keeps memory O(N * D), forward and backward, with no compile.
- flex is not in the CPU order: it has no CPU backward, compiles for ~10 s per new shape, and the
  benchmark shows blockwise at least as fast for the structured masks (docs/performance.md).
  On CUDA its compiled Triton kernels do the same tile skipping at fused-kernel speed (flex
  refuses, by its reasons, dropout and learnable bias-spec tensors, so blockwise takes those).
  Measured on an H200 (``tools/gpu_check.py``, docs/performance.md "CUDA"): flex beats sdpa's
  materialised mask 10-20x on a sliding window; blockwise runs its PyTorch tile math there (no
  fused CUDA kernel) at 8-300x sdpa's time, so on CUDA sdpa (with a materialised mask, up to its
  2^30-element limit) comes before blockwise, which remains the path for what neither can run.
"""

from __future__ import annotations

import logging

from ._call import AttentionCall
from .backends import BACKENDS

log = logging.getLogger("attnkit")


class NoBackendError(RuntimeError):
    """No backend can run this call; the message names the call and lists each backend's reasons."""


SMALL_ELEMENTS = 1 << 20
SMALL_KEYS = 4096  # above this many keys a call is never "small": skipping keys beats reading them all


def _is_plain(call: AttentionCall) -> bool:
    """No mask, or the causal band with Nq == Nk (sdpa's is_causal), or dense tensors."""
    mask_plain = call.mask is None or call.mask_tensor is not None or call.plain_causal
    bias_plain = call.bias is None or call.bias_tensor is not None
    return mask_plain and bias_plain


def auto_order(call: AttentionCall) -> list[str]:
    """Backends to try, best first (see the decision table in the module docstring)."""
    if call.return_weights:
        return ["reference"]
    B, Hq, Hk, Nq, Nk, D = call.shape
    cuda = call.q.device.type == "cuda"
    small = B * Hq * Nq * Nk <= SMALL_ELEMENTS and Nk <= SMALL_KEYS  # a decode step on a long cache is not
    if call.softcap is not None or call.dropout_p > 0:
        order = ["flex", "blockwise", "reference"] if cuda else ["blockwise", "reference"]
    elif _is_plain(call):
        order = ["sdpa", "blockwise", "reference"]
    elif small:
        order = ["sdpa", "flex", "blockwise", "reference"] if cuda else ["sdpa", "blockwise", "reference"]
    else:
        order = ["flex", "sdpa", "blockwise", "reference"] if cuda else ["blockwise", "sdpa", "reference"]
    return [n for n in order if n in BACKENDS]


def choose(call: AttentionCall, backend: str) -> str:
    """The backend that runs ``call``: ``backend`` itself, or auto's first that fits.

    Static reasons (flags, sizes) are asked of every candidate first; data reasons (which may
    materialise the mask) only of the one about to be picked.
    """
    if backend != "auto":
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        reasons = BACKENDS[backend].not_supported_reasons(call)
        if reasons:
            raise NoBackendError(f"backend {backend!r} cannot run this call ({call.describe()}): " + "; ".join(reasons))
        return backend
    tried = {}
    for name in auto_order(call):
        reasons = BACKENDS[name].not_supported_reasons(call)
        if not reasons:
            log.debug("attnkit.attention: backend %s (auto)%s", name, f"; skipped {tried}" if tried else "")
            return name
        tried[name] = reasons
    for name in BACKENDS:
        if name not in tried:
            tried[name] = BACKENDS[name].static_reasons(call) or ["not in auto's order for this call"]
    lines = "\n".join(f"  - {n}: " + "; ".join(r) for n, r in tried.items())
    raise NoBackendError(f"no backend can run this call ({call.describe()}):\n{lines}")
