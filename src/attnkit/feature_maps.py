"""Feature maps phi for kernelised (linear) attention: softmax-free attention phi(q).phi(k).

Legend: B batch, H heads, N positions, D head dim, m number of random features, F feature dim.

- ``elu_plus_one``: phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, "Transformers are RNNs"), F = D.
- ``draw_favor_projection`` / ``favor_features``: FAVOR+ positive orthogonal random features
  (Choromanski et al. 2021, "Rethinking Attention with Performers"), F = m:

      phi(x) = m^-1/2 exp(W x - |x|^2 / 2),   W (m, D) with rows w_r ~ N(0, I_D)

  so that E[phi(x).phi(y)] = exp(x.y) (unbiased), with per-pair variance
  (1/m) exp(2 x.y) (exp|x+y|^2 - 1) for i.i.d. rows (orthogonal rows do no worse, paper Thm 2).
  Attention uses x = q * scale^(1/2) and y = k * scale^(1/2) (scale = 1/sqrt(D): x = q D^-1/4).

A feature map is any callable (B, H, N, D) -> (B, H, N, F) whose outputs are >= 0 with a
positive sum per row (so the normaliser of linear attention is positive).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, elementwise (B, H, N, D) -> (B, H, N, D). Katharopoulos et al. 2020."""
    return F.elu(x).add_(1.0)  # in place: elu's backward reads its input, not its output


def draw_favor_projection(num_features: int, head_dim: int, *, generator: torch.Generator | None = None,
                          orthogonal: bool = True, scaling: str = "chi", dtype: torch.dtype = torch.float32,
                          device=None) -> torch.Tensor:
    """Random projection W (m, D) for FAVOR+ features, drawn from ``generator`` (seeded, reproducible).

    orthogonal=True: rows come in blocks of D mutually orthogonal directions (QR of a Gaussian
    matrix, signs fixed by diag(R) so each block is Haar-distributed); the last block is cut to
    fit m. scaling="chi" rescales each row by the norm of an independent Gaussian vector
    (chi_D distributed), so every row is marginally N(0, I_D) and the estimator stays unbiased;
    scaling="sqrt_d" uses the constant sqrt(D) (performer-pytorch's ``scaling=1``).
    orthogonal=False: i.i.d. Gaussian rows (``scaling`` is ignored).
    The draw happens on CPU in float64, then is cast, so it does not depend on the device.
    """
    if not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"num_features must be an int > 0, got {num_features!r}")
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be an int > 0, got {head_dim!r}")
    if scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"scaling must be 'chi' or 'sqrt_d', got {scaling!r}")
    m, d = num_features, head_dim
    g = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    if not orthogonal:
        w = torch.randn(m, d, generator=g, dtype=torch.float64)
        return w.to(dtype=dtype, device=device)
    n_blocks = -(-m // d)
    gauss = torch.randn(n_blocks, d, d, generator=g, dtype=torch.float64)
    qm, r = torch.linalg.qr(gauss)                                         # (n, D, D) orthonormal columns
    qm = qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-uniform
    directions = qm.transpose(-1, -2).reshape(n_blocks * d, d)[:m]         # (m, D), unit rows, orthogonal per block
    if scaling == "chi":
        norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1)  # (m,) chi_D
    else:
        norms = torch.full((m,), math.sqrt(d), dtype=torch.float64)
    return (directions * norms.unsqueeze(1)).to(dtype=dtype, device=device)


def favor_features(x: torch.Tensor, projection: torch.Tensor, *, role: str = "raw", eps: float = 0.0,
                   stabilizer: str = "robust", key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR+ positive random features of already-scaled inputs x (B, H, N, D) -> (B, H, N, m).

    role="raw": the estimator itself, m^-1/2 exp(W x - |x|^2/2) (for tests; may overflow).
    role="query" / "key": stabilised for attention. A constant factor common to all features of
    a query row, or common to all keys of one (batch, head), cancels between the numerator and
    the normaliser of attention, so it is subtracted inside exp (it is treated as a constant:
    no gradient flows through it, and none needs to).
      stabilizer="robust" (default, requires eps == 0): queries subtract max_r (w_r.x - |x|^2/2)
        per row, keys subtract the max of (w_r.k - |k|^2/2) over valid keys and features of each
        (batch, head); the largest feature is then exactly m^-1/2, so nothing underflows to all-zero.
      stabilizer="paper" (the paper's code and performer-pytorch): queries subtract max_r w_r.x
        per row, keys the max of w_r.k over keys and features; then eps is added to every
        feature (m^-1/2 (exp(...) + eps)). eps > 0 biases the estimator and makes the output
        depend on the stabiliser; performer-pytorch uses eps=1e-4, the paper's code 1e-6.
    key_valid: (B', H', N) bool, True = real key; padded keys are excluded from the key max
    (their features are still computed; the caller zeroes them).
    Cost O(N m D).
    """
    if projection.dim() != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(f"projection must be (m, D) with D = {x.shape[-1]}, got shape {tuple(projection.shape)}")
    if role not in ("raw", "query", "key"):
        raise ValueError(f"role must be 'raw', 'query' or 'key', got {role!r}")
    if stabilizer not in ("robust", "paper"):
        raise ValueError(f"stabilizer must be 'robust' or 'paper', got {stabilizer!r}")
    if stabilizer == "robust" and eps != 0.0:
        raise ValueError(f"eps={eps} needs stabilizer='paper' (eps is defined relative to the paper's stabiliser)")
    m = projection.shape[0]
    log_ratio = -0.5 * math.log(m)
    u = torch.matmul(x, projection.to(x.dtype).T)                # (B, H, N, m)
    diag = 0.5 * (x * x).sum(dim=-1, keepdim=True)               # (B, H, N, 1)
    if role == "raw":
        return torch.exp(u - (diag - log_ratio))
    if role == "query":
        c = u.detach().amax(dim=-1, keepdim=True)                # (B, H, N, 1)
        if stabilizer == "robust":                               # diag cancels per row
            return u.sub_(c - log_ratio).exp_()                  # in place: matmul's backward does not need u
        return (torch.exp(u - (diag + c)) + eps) * math.exp(log_ratio)
    row_max = u.detach().amax(dim=-1)                            # (B, H, N)
    if stabilizer == "robust":
        row_max = row_max - diag.detach().squeeze(-1)
    c = key_max(row_max.unsqueeze(-1), key_valid)                # (B, H, 1, 1)
    if eps == 0.0:
        return u.sub_(diag + (c - log_ratio)).exp_()
    return (torch.exp(u - (diag + c)) + eps) * math.exp(log_ratio)


def key_max(logits: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Max of logits (B, H, N, m) over valid keys and features -> (B, H, 1, 1), detached; 0 if none valid."""
    lg = logits.detach()
    if key_valid is not None:
        lg = lg.masked_fill(~key_valid.unsqueeze(-1), float("-inf"))
    c = lg.amax(dim=(-1, -2), keepdim=True)
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))
