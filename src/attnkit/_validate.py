"""Input checks shared by every public function.

Each check raises a ValueError (TypeError for wrong types) that names the argument, the value or
shape it got, and what was expected, so that a user can fix the call without reading our code.
"""

from __future__ import annotations

import math
import numbers

import torch


def shape_str(t: torch.Tensor) -> str:
    """The shape as a Python tuple reads: (2, 3), (5,), ()."""
    return str(tuple(t.shape))


def _is_real(x: object) -> bool:
    """A real Python/NumPy number that is not a bool or a tensor."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, torch.Tensor))


def check_rank4(name: str, t: object, legend: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {legend}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {legend}, got {t.dim()}: shape {shape_str(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q: (B, Hq, Nq, D), k: (B, Hk, Nk, D), v: (B, Hk, Nk, Dv), Hq a multiple of Hk."""
    check_rank4("q", q, "(B, Hq, Nq, D)")
    check_rank4("k", k, "(B, Hk, Nk, D)")
    check_rank4("v", v, "(B, Hk, Nk, Dv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"batch sizes differ: q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}; "
            "expected the same B in dimension 0"
        )
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {shape_str(k)} and v {shape_str(v)} must agree in heads and length (dims 1, 2)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"head dim of q ({q.shape[3]}) must equal head dim of k ({k.shape[3]}): q {shape_str(q)}, "
            f"k {shape_str(k)}; expected q (B, Hq, Nq, D) and k (B, Hk, Nk, D)"
        )
    hq, hk = q.shape[1], k.shape[1]
    if hk == 0 or hq % hk != 0:
        raise ValueError(
            f"query heads Hq={hq} must be a multiple of key/value heads Hk={hk} (grouped-query attention)"
        )
    if k.shape[2] == 0:
        raise ValueError(f"k has no keys (Nk=0): shape {shape_str(k)}")
    if q.shape[3] == 0:
        raise ValueError(f"q and k have head dim D=0: q {shape_str(q)}, k {shape_str(k)}; expected D >= 1 "
                         "(the default scale is 1/sqrt(D))")


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not _is_real(scale):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return float(scale)


def check_dropout(p: float) -> float:
    if not _is_real(p):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(p).__name__}")
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    return float(p)


SEED_LIMIT = 2**64


def check_seed(seed: int | None, name: str = "dropout_seed") -> int | None:
    """An int in [0, 2^64) (all 64 bits enter the hash, see ``attnkit._hash``), or None."""
    if seed is None:
        return None
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"{name} must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def check_bool(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be True or False, got {x!r}")
    return x


def check_softcap(c: float | None) -> float | None:
    if c is None:
        return None
    if not _is_real(c):
        raise TypeError(f"softcap must be a finite number > 0 (or None), got {type(c).__name__}")
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"softcap must be a finite number > 0 (or None), got {c!r}")
    return float(c)


def check_device(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move it with .to(q.device)")


def check_broadcastable(name: str, t: torch.Tensor, target: tuple[int, ...], legend: str) -> None:
    """t must have at most 4 dims, each equal to the target's or 1 (right-aligned, like torch)."""
    if t.dim() > len(target) or t.dim() < 2:
        raise ValueError(
            f"{name} must have 2 to 4 dimensions broadcastable to {legend} = {tuple(target)}, "
            f"got shape {shape_str(t)}"
        )
    for got, want in zip(reversed(t.shape), reversed(target)):
        if got not in (1, want):
            raise ValueError(
                f"{name} of shape {shape_str(t)} does not broadcast to {legend} = {tuple(target)}: "
                "each dimension must equal the target's or be 1"
            )


def check_elementwise(what: str, out: torch.Tensor, *idx: torch.Tensor) -> None:
    """``out`` of a user function of broadcast index tensors must have (or broadcast to, without
    growing) their broadcast shape: it is computed elementwise from them, e.g. ``q >= k``."""
    want = torch.broadcast_shapes(*(t.shape for t in idx))
    try:
        ok = torch.broadcast_shapes(out.shape, want) == want
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{what} returned shape {tuple(out.shape)}, which does not broadcast to the shape of its index "
            f"tensors (b, h, q, k) {tuple(want)}: compute it elementwise from them (e.g. q >= k), not as a "
            "tensor of its own size"
        )


def probe_grid(nq: int, nk: int, device=None) -> tuple[torch.Tensor, ...]:
    """Small index tensors b (1,1,1,1), h (1,1,1,1), q (1,1,<=2,1) (key coordinates), k (1,1,1,<=3)
    for checking a user function once per call (their sizes differ from any real (Nq, Nk) tile
    layout, so a function that returns a tensor of its own size is caught)."""
    z = torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=device)
    q = (torch.arange(max(0, nq - 2), nq, device=device) + (nk - nq)).view(1, 1, -1, 1)
    k = torch.arange(min(nk, 3), device=device).view(1, 1, 1, -1)
    return z, z, q, k
