"""Nystromformer: softmax attention through m landmarks and an iterative pseudo-inverse.

Legend: B batch, Hq query heads, Hk key/value heads (Hq % Hk == 0), Nq queries, Nk keys,
D head dim, Dv value dim, m landmarks, K depthwise-conv kernel length, E model width.

    Q~, K~ = segment means of Q and K (m segments each)
    out = softmax(s Q K~^T) pinv(softmax(s Q~ K~^T)) softmax(s Q~ K^T) V   [+ conv(V)]

pinv is the iterative Moore-Penrose approximation of Razavi et al. 2014 used by the paper,
Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z))), from Z0 = A^T / (max_i sum_j |A_ij| *
max_j sum_i |A_ij|). With E_t = I - A Z_t one step gives E_{t+1} = E_t^3 (3 I + E_t) / 4 (third
order); A Z_0 is symmetric PSD, so ||E_t||_2 = g^t(1 - sigma_min(A)^2 c) with g(e) = e^3 (3 + e)/4
and c the Z0 scale. The tests derive their tolerance from this.

Paper: Y. Xiong, Z. Zeng, R. Chakraborty, M. Tan, G. Fung, Y. Li, V. Singh, "Nystromformer: A
Nystrom-Based Algorithm for Approximating Self-Attention", AAAI 2021. Cost: O(N m (D + Dv) +
iters * m^3) time and O(N m) memory per head: linear in N for a fixed m.

Conventions (peer: lucidrains ``nystrom-attention`` 0.0.14)
- Segments: with ``segments="even"`` (default) segment s covers positions [floor(s N / m),
  floor((s+1) N / m)): sizes differ by at most one, no padding. ``segments="front_pad"`` is the
  peer's: it left-pads N to a multiple of m with masked tokens, so the first segment is short
  (or empty). Landmarks are means over the real (non-padded) positions of a segment; an empty
  landmark is dropped (its row/column of the landmark kernel is zero, and the pinv iteration
  keeps that block zero), whereas the peer keeps it as a uniform row and leaks a little.
- ``pinv_init="per_matrix"`` (default) takes the max row/column sums of each (b, h) matrix (so a
  batch element does not depend on the others); ``"global"`` takes them over the whole tensor,
  as the peer and HF's ``init_option="original"`` do.
- Without a mask the peer also attends to its zero padding tokens when m does not divide N; pass
  it a mask of all True (and eps=0) to compare. The residual is the peer's depthwise conv over
  the sequence (kernel (K, 1) per head, zero padding, no bias) on the key-padded values.
- Non-causal only: each landmark averages a whole segment (future positions included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from .._numerics import compute_dtype, expand_kv, safe_softmax
from .base import Variant, key_valid, pos_int

SEGMENTS = ("even", "front_pad")
PINV_INIT = ("per_matrix", "global")


def segment_ids(n: int, m: int, mode: str = "even", device=None) -> torch.Tensor:
    """(n,) int64: the landmark segment of each position (see the module docstring)."""
    i = torch.arange(n, device=device)
    if mode == "even":  # the largest s with floor(s n / m) <= i
        return ((i + 1) * m - 1) // n
    if mode == "front_pad":
        pad, seg_len = (-n) % m, -(-n // m)
        return (i + pad) // seg_len
    raise ValueError(f"segments must be one of {SEGMENTS}, got {mode!r}")


def _landmarks(x: torch.Tensor, seg: torch.Tensor, m: int, valid: torch.Tensor | None):
    """Segment means of x (B, H, N, D) over valid positions -> (B, H, m, D), landmark valid (B, 1, m)."""
    B, H, N, D = x.shape
    if valid is None and N % m == 0 and bool((seg == torch.arange(N, device=seg.device) // (N // m)).all()):
        # equal segments (every mode when m divides N): a strided mean, no index_add / index_select
        return x.view(B, H, m, N // m, D).mean(dim=3), torch.ones(1, 1, m, dtype=torch.bool, device=x.device)
    if valid is None:
        w = torch.ones(1, 1, N, dtype=x.dtype, device=x.device)
    else:
        w = valid[:, None, :].to(x.dtype)  # (B, 1, N)
        x = x * w.unsqueeze(-1)
    sums = x.new_zeros(B, H, m, D).index_add(2, seg, x)  # (B, H, m, D)
    counts = w.new_zeros(w.shape[0], 1, m).index_add(2, seg, w)  # (B', 1, m)
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    return means, counts > 0


def _softmax(s: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim; blocked entries get 0 and rows with nothing allowed give zeros."""
    return torch.softmax(s, dim=-1) if allowed is None else safe_softmax(s, ~allowed)


_REASON = "each landmark averages a whole segment of keys (future positions included)"


class _SoftmaxMatmul(torch.autograd.Function):
    """softmax(x y^T) w without a mask: x (B, H, L, D), y (B, H, S, D), w (B, H, S, Dv) -> (B, H, L, Dv).

    Forward keeps the probabilities P (B, H, L, S), softmaxed in place in the scores' buffer (one
    (L, S) allocation where autograd's graph makes two). Backward: dP = dout w^T, then
    dlogits = P (dP - sum_j P_ij dP_ij) by torch's fused softmax backward, in place in dP's buffer
    (one pass over the (L, S) tensors where sub_ then mul_ make two, and out need not be saved);
    dx = dlogits y, dy = dlogits^T x, dw = P^T dout.
    """

    @staticmethod
    def forward(ctx, x, y, w):
        p = torch.matmul(x, y.transpose(-1, -2))                          # (B, H, L, S)
        torch.ops.aten._softmax.out(p, -1, False, out=p)                   # in place
        out = torch.matmul(p, w)                                           # (B, H, L, Dv)
        ctx.save_for_backward(x, y, w, p)
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, w, p = ctx.saved_tensors
        need_x, need_y, need_w = ctx.needs_input_grad
        dw = torch.matmul(p.transpose(-1, -2), g) if need_w else None     # (B, H, S, Dv)
        dx = dy = None
        if need_x or need_y:
            ds = torch.matmul(g, w.transpose(-1, -2))                       # (B, H, L, S)
            # d logits; on CPU in place (the kernel takes each row's sum before writing that row;
            # other devices' kernels are not checked here, so they get their own buffer)
            dl = ds if ds.device.type == "cpu" else torch.empty_like(ds)
            torch.ops.aten._softmax_backward_data.out(ds, p, -1, p.dtype, grad_input=dl)
            dx = torch.matmul(dl, y) if need_x else None
            dy = torch.matmul(dl.transpose(-1, -2), x) if need_y else None
        return dx, dy, dw


def _softmax_matmul(x, y, w, allowed):
    """softmax(x y^T) w over allowed entries (bool, broadcastable to the scores; None = all)."""
    if allowed is None and x.dtype in (torch.float32, torch.float64):
        return _SoftmaxMatmul.apply(x, y, w)
    return _softmax(x @ y.transpose(-1, -2), allowed) @ w


def iterative_pinv(a: torch.Tensor, iterations: int = 6, init: str = "per_matrix") -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a (..., m, m) by the paper's third-order iteration.

    Z0 = a^T / (max row abs-sum * max column abs-sum), per matrix or over the whole tensor.
    Zero rows/columns of ``a`` stay zero columns/rows of the result. Cost O(iterations * m^3).
    """
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"pinv_iterations must be an int >= 0, got {iterations!r}")
    if init not in PINV_INIT:
        raise ValueError(f"pinv_init must be one of {PINV_INIT}, got {init!r}")
    absa = a.abs()
    if init == "per_matrix":
        row = absa.sum(dim=-1).amax(dim=-1)[..., None, None]  # (..., 1, 1)
        col = absa.sum(dim=-2).amax(dim=-1)[..., None, None]
    else:
        row, col = absa.sum(dim=-1).max(), absa.sum(dim=-2).max()
    den = row * col
    z = a.transpose(-1, -2) / torch.where(den > 0, den, torch.ones_like(den))
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])                         # (batch, m, m)
    z = z.expand_as(a).reshape(-1, *a.shape[-2:])
    return _PinvIterations.apply(a3, z, iterations).view(*lead, *a.shape[-2:])


class _PinvIterations(torch.autograd.Function):
    """z <- 1/4 z (13 I - az (15 I - az (7 I - az))) ``iterations`` times from z0, on (batch, m, m).

    Forward with z_t = c_t y_t (c_t = 4^-t, so no product needs a separate scaling pass), per
    iteration: P = a y; Y = 7 I - c P; W = c P Y - 15 I; U = c P W + 13 I; y <- y U. Four batched
    products (the scalings ride in the products' alpha, the constants are diagonal adds) where the
    plain formula takes about eight full-size ops. Backward by hand, in reverse, from dy':
        dy = dy' U^T,  dU = y^T dy',  dW = c P^T dU,  dY = c P^T dW,
        dP = c (dU W^T + dW Y^T - dY),  da += dP y^T,  dy += a^T dP.
    """

    @staticmethod
    def forward(ctx, a, z, iterations: int):
        saved, c = [], 1.0
        y = z
        for _ in range(iterations):
            p = torch.bmm(a, y)                                                  # a z = c p
            yy = torch.mul(p, -c)
            yy.diagonal(dim1=-2, dim2=-1).add_(7.0)                              # 7 I - az
            w = torch.baddbmm(p, p, yy, beta=0.0, alpha=c)
            w.diagonal(dim1=-2, dim2=-1).sub_(15.0)                              # az (7 I - az) - 15 I
            u = torch.baddbmm(p, p, w, beta=0.0, alpha=c)
            u.diagonal(dim1=-2, dim2=-1).add_(13.0)                              # 13 I - az (15 I - ...)
            saved += [y, p, yy, w, u]
            y = torch.bmm(y, u)
            c *= 0.25
        ctx.save_for_backward(a, *saved)
        ctx.iterations = iterations
        return y * c if iterations else y.clone()

    @staticmethod
    def backward(ctx, gz):
        a, *saved = ctx.saved_tensors
        n = ctx.iterations
        gy = gz * 0.25 ** n
        at = a.transpose(1, 2)
        ga = torch.zeros_like(a)
        for i in range(n - 1, -1, -1):
            c = 0.25 ** i
            y, p, yy, w, u = saved[5 * i:5 * i + 5]
            pt = p.transpose(1, 2)
            gu = torch.bmm(y.transpose(1, 2), gy)
            gy = torch.bmm(gy, u.transpose(1, 2))
            gw = torch.baddbmm(gu, pt, gu, beta=0.0, alpha=c)
            gyy = torch.baddbmm(gw, pt, gw, beta=0.0, alpha=c)
            gp = torch.baddbmm(gu, gu, w.transpose(1, 2), beta=0.0, alpha=c)
            gp = torch.baddbmm(gp, gw, yy.transpose(1, 2), alpha=c).sub_(gyy, alpha=c)
            ga = torch.baddbmm(ga, gp, y.transpose(1, 2))
            gy = torch.baddbmm(gy, at, gp)
        return ga, gy, None


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_landmarks: int,
                      pinv_iterations: int = 6, mask=None, query_valid: torch.Tensor | None = None,
                      conv_kernel: torch.Tensor | None = None, scale: float | None = None,
                      segments: str = "even", pinv_init: str = "per_matrix") -> torch.Tensor:
    """Nystrom approximation of softmax(scale q k^T) v with ``num_landmarks`` landmarks.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hk, Nk, D). v: (B, Hk, Nk, Dv); Hq a multiple of Hk.
        num_landmarks: m <= min(Nq, Nk). With m == Nq == Nk every segment is one token and the
            result is exact softmax attention up to the pinv iteration's error.
        pinv_iterations: iterations of the pseudo-inverse (paper: 6).
        mask: as ``attnkit.attention`` (a spec or a bool tensor, True = may attend), restricted to
            key padding (``masks.key_padding``, ``key_padding_from_bool``, (B, 1, 1, Nk) bool):
            padded keys are left out of the key landmarks, of softmax(Q~ K^T) and of the conv.
            Any other mask (causal included) raises: a landmark averages a whole segment.
        query_valid: (B, Nq) bool, True = real query: padded queries are left out of the query
            landmarks (in padded self-attention, the keys' validity). Their rows are still computed.
        conv_kernel: (Hq, K), K odd: adds the depthwise conv over the sequence of the values
            (needs Nq == Nk); None: no residual.
        scale: default 1/sqrt(D). segments: "even" or "front_pad" (peer). pinv_init:
            "per_matrix" or "global" (peer).

    Returns: (B, Hq, Nq, Dv) in q's dtype (half/bfloat16 computed in float32).
    Cost: O(N m (D + Dv) + pinv_iterations m^3) time, O(N m) memory per head.
    """
    V.check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if not isinstance(num_landmarks, int) or not 1 <= num_landmarks <= min(Nq, Nk):
        raise ValueError(f"num_landmarks must be an int in [1, min(Nq, Nk)] = [1, {min(Nq, Nk)}], got "
                         f"{num_landmarks!r}; for sequences this short use exact attention")
    m = num_landmarks
    scale = V.check_scale(scale, D)
    kvalid = key_valid(mask, batch=B, nq=Nq, nk=Nk, device=q.device, variant="Nystrom", reason=_REASON)
    qvalid = query_valid
    if qvalid is not None and (not isinstance(qvalid, torch.Tensor) or qvalid.dtype != torch.bool
                               or tuple(qvalid.shape) != (B, Nq)):
        got = f"{qvalid.dtype} {V.shape_str(qvalid)}" if isinstance(qvalid, torch.Tensor) else type(qvalid).__name__
        raise ValueError(f"query_valid must be a bool (B, Nq) = ({B}, {Nq}) tensor (True = real query), got {got}")
    in_dtype = q.dtype
    ct = compute_dtype(in_dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    if kvalid is not None:
        v = v * kvalid[:, None, :, None].to(ct)  # (B, Hk, Nk, Dv), padded rows zero
    kl, kl_valid = _landmarks(k, segment_ids(Nk, m, segments, q.device), m, kvalid)  # (B, Hk, m, D), (B', 1, m)
    ql, ql_valid = _landmarks(q, segment_ids(Nq, m, segments, q.device), m, qvalid)  # (B, Hq, m, D)
    k, v, kl = (expand_kv(t, Hq // Hk) for t in (k, v, kl))  # (B, Hq, ., .)
    all_k = bool(kl_valid.all())
    all_q = bool(ql_valid.all())
    kls, qls = kl * scale, ql * scale  # fold the scale into the small landmark tensors
    m2 = None if all_k and all_q else ql_valid[..., :, None] & kl_valid[..., None, :]  # (B', 1, m, m)
    k2 = _softmax(qls @ kl.transpose(-1, -2), m2)  # (B, Hq, m, m)
    m3 = None if kvalid is None else ql_valid[..., :, None] & kvalid[:, None, None, :]  # (B, 1, m, Nk)
    if m3 is None and not all_q:
        m3 = ql_valid[..., :, None].expand(-1, -1, -1, Nk)
    z = iterative_pinv(k2, pinv_iterations, pinv_init)  # (B, Hq, m, m)
    w3 = z @ _softmax_matmul(qls, k, v, m3)  # z (k3 v): (B, Hq, m, Dv), k3 = softmax(Q~ K^T) (B, Hq, m, Nk)
    out = _softmax_matmul(q, kls, w3, None if all_k else kl_valid[..., None, :])  # k1 w3: (B, Hq, Nq, Dv)
    if conv_kernel is not None:
        out = out + depthwise_conv(v, conv_kernel, Nq)
    return out.to(in_dtype)


def depthwise_conv(v: torch.Tensor, kernel: torch.Tensor, nq: int) -> torch.Tensor:
    """Per-head conv over the sequence: v (B, H, N, Dv), kernel (H, K), K odd -> (B, H, N, Dv)."""
    B, H, N, Dv = v.shape
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 2 or kernel.shape[0] != H:
        got = V.shape_str(kernel) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
        raise ValueError(f"conv_kernel must be a tensor (Hq, K) with Hq={H}, got {got}")
    K = kernel.shape[1]
    if K % 2 == 0:
        raise ValueError(f"conv_kernel length K must be odd (same-length output), got K={K}")
    if nq != N:
        raise ValueError(f"conv_kernel needs Nq == Nk (the residual adds conv(v) to each query row), got Nq={nq}, Nk={N}")
    w = kernel.to(v.dtype).view(H, 1, K, 1)  # (H, 1, K, 1) like Conv2d(H, H, (K, 1), groups=H)
    if v.device.type == "cpu":  # oneDNN's depthwise kernel (and its backward) is faster on (B, N, Dv, H) memory
        v = v.contiguous(memory_format=torch.channels_last)
    return F.conv2d(v, w, padding=(K // 2, 0), groups=H)  # (B, H, N, Dv)


@dataclass(frozen=True)
class Nystrom(Variant):
    """Nystromformer (Xiong et al. 2021): segment-mean landmarks, iterative pseudo-inverse.

    num_landmarks: m (<= the sequence lengths). pinv_iterations: 6 (paper). conv_kernel_size:
    K of the depthwise-conv residual on the values (the official code's and the peer's; self-
    attention only), None: no residual. segments / pinv_init: see the module docstring.
    Non-causal by construction; masks: key padding only. Cost O(N m D + m^3).
    """

    num_landmarks: int = 256
    pinv_iterations: int = 6
    conv_kernel_size: int | None = None
    segments: str = "even"
    pinv_init: str = "per_matrix"

    name = "nystrom"

    def __post_init__(self):
        pos_int("Nystrom", "num_landmarks", self.num_landmarks)
        pos_int("Nystrom", "pinv_iterations", self.pinv_iterations)
        if self.conv_kernel_size is not None:
            pos_int("Nystrom", "conv_kernel_size", self.conv_kernel_size)
            if self.conv_kernel_size % 2 == 0:
                raise ValueError(f"Nystrom: conv_kernel_size must be odd (same-length output), got {self.conv_kernel_size}")
        if self.segments not in SEGMENTS:
            raise ValueError(f"Nystrom: segments must be one of {SEGMENTS}, got {self.segments!r}")
        if self.pinv_init not in PINV_INIT:
            raise ValueError(f"Nystrom: pinv_init must be one of {PINV_INIT}, got {self.pinv_init!r}")

    def causal_version(self):
        raise ValueError("Nystrom is non-causal by construction (each landmark averages a segment that includes "
                         "future positions) and cannot be a decoder's self-attention")

    def decode_reason(self) -> str | None:
        return "Nystrom summarises the whole key sequence in landmarks and is non-causal, so it cannot decode"

    def build_core(self, *, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return NystromCore(self, num_heads)


class NystromCore(nn.Module):
    """``nystrom_attention``; holds the residual conv kernel (H, K) when the spec asks for one."""

    def __init__(self, spec: Nystrom, num_heads: int):
        super().__init__()
        self.spec = spec
        K = spec.conv_kernel_size
        self.conv_kernel = None if K is None else nn.Parameter(torch.empty(num_heads, K).uniform_(-K ** -0.5, K ** -0.5))

    def forward(self, q, k, v, *, mask, bias, dropout_p, need_weights, cache, query_valid=None):
        s = self.spec
        if self.conv_kernel is not None and q.shape[2] != k.shape[2]:
            raise ValueError(f"Nystrom(conv_kernel_size={s.conv_kernel_size}) adds a conv of the values to each query "
                             f"row and needs self-attention (Nq == Nk), got Nq={q.shape[2]}, Nk={k.shape[2]}")
        return nystrom_attention(q, k, v, num_landmarks=s.num_landmarks, pinv_iterations=s.pinv_iterations, mask=mask,
                                 query_valid=query_valid, conv_kernel=self.conv_kernel, segments=s.segments,
                                 pinv_init=s.pinv_init), None


__all__ = ["nystrom_attention", "iterative_pinv", "segment_ids", "depthwise_conv", "Nystrom", "NystromCore",
           "SEGMENTS", "PINV_INIT"]
