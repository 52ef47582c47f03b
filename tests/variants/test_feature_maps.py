"""Feature maps: elu+1, the FAVOR+ projection and the FAVOR+ estimator's statistics.

Unbiasedness uses the paper's variance (Choromanski et al. 2021, Lemma 1) for i.i.d. rows:
Var[phi(x).phi(y)] = (1/m) exp(2 x.y) (exp|x+y|^2 - 1); the Monte-Carlo mean over R independent
projections must lie within 4 standard errors sqrt(Var / R) of exp(x.y). Orthogonal rows have
no larger variance (paper, Theorem 2), so the same bound applies to them.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.variants.linear import elu_plus_one
from attnkit.variants.performer import draw_favor_projection, favor_features
from tests.tolerances import assert_close


def test_elu_plus_one_is_positive_and_matches_formula():
    x = torch.linspace(-30, 5, 101, dtype=torch.float64)
    y = elu_plus_one(x)
    assert (y > 0).all()
    assert_close(y, torch.where(x > 0, x + 1, torch.exp(x)))


def test_projection_is_seeded_orthogonal_and_chi_scaled():
    d, m = 8, 20
    w1 = draw_favor_projection(m, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w2 = draw_favor_projection(m, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert w1.shape == (m, d) and torch.equal(w1, w2)
    unit = w1 / w1.norm(dim=1, keepdim=True)
    for lo in range(0, m, d):  # rows inside one block of d are orthonormal directions
        blk = unit[lo:lo + d]
        assert_close(blk @ blk.T, torch.eye(blk.shape[0], dtype=torch.float64))
    sq = draw_favor_projection(m, d, scaling="sqrt_d", dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_close(sq.norm(dim=1), torch.full((m,), math.sqrt(d), dtype=torch.float64))
    # chi_d norms: E|w|^2 = d, Var|w|^2 = 2d; the mean over many rows is within 4 standard errors
    big = draw_favor_projection(4096, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mean_sq = (big * big).sum(1).mean().item()
    assert abs(mean_sq - d) < 4 * math.sqrt(2 * d / 4096)


def test_projection_argument_errors():
    with pytest.raises(ValueError, match="num_features"):
        draw_favor_projection(0, 4)
    with pytest.raises(ValueError, match="scaling"):
        draw_favor_projection(4, 4, scaling="unit")
    with pytest.raises(ValueError, match="projection must be"):
        favor_features(torch.randn(1, 1, 3, 4), torch.randn(8, 5))
    with pytest.raises(ValueError, match="stabilizer='paper'"):
        favor_features(torch.randn(1, 1, 3, 4), torch.randn(8, 4), role="query", eps=1e-4)


def _pair(d, seed, norm):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    return norm * x / x.norm(), norm * y / y.norm()


@pytest.mark.parametrize("orthogonal", [False, True])
def test_estimator_is_unbiased_within_paper_standard_error(orthogonal):
    d, m, R = 6, 12, 2000
    x, y = _pair(d, 0, 0.8)
    # One draw of R * m rows: m is a multiple of d, so every group of m consecutive rows is an
    # independent FAVOR+ projection (whole orthogonal blocks, independent chi norms).
    w = draw_favor_projection(R * m, d, generator=torch.Generator().manual_seed(11 + orthogonal),
                              orthogonal=orthogonal, dtype=torch.float64)
    fx, fy = favor_features(x.view(1, 1, 1, d), w), favor_features(y.view(1, 1, 1, d), w)  # (1, 1, 1, R m)
    est = (fx * fy).view(R, m).sum(-1) * R  # favor_features scales by (R m)^-1/2 each; rescale to m^-1
    exact = math.exp(float(x @ y))
    var = math.exp(2 * float(x @ y)) * (math.exp(float((x + y) @ (x + y))) - 1) / m
    assert abs(est.mean().item() - exact) < 4 * math.sqrt(var / R)
    # sample variance: within 4 standard errors of s^2 (which depend on the sample kurtosis)
    s2 = est.var().item()
    kurt = (((est - est.mean()) ** 4).mean() / s2 ** 2).item()
    se = var * math.sqrt((kurt - 1) / R)
    if not orthogonal:  # agrees with the paper's formula
        assert abs(s2 - var) < 4 * se
    else:  # orthogonal rows do not increase it
        assert s2 < var + 4 * se


def test_stabilised_features_give_the_raw_estimators_attention():
    g = torch.Generator().manual_seed(4)
    x, y = (0.7 * torch.randn(2, 3, 9, 5, generator=g, dtype=torch.float64) for _ in range(2))
    w = draw_favor_projection(32, 5, generator=g, dtype=torch.float64)
    raw = favor_features(x, w) @ favor_features(y, w).transpose(-1, -2)          # (B, H, N, N)
    raw = raw / raw.sum(-1, keepdim=True)
    for stab in ("robust", "paper"):
        s = favor_features(x, w, role="query", stabilizer=stab) @ favor_features(y, w, role="key", stabilizer=stab).transpose(-1, -2)
        assert_close(s / s.sum(-1, keepdim=True), raw)
    # robust: the largest query feature of each row and the largest key feature are exactly m^-1/2
    fq = favor_features(x, w, role="query")
    assert_close(fq.amax(-1), torch.full(fq.shape[:3], 32 ** -0.5, dtype=torch.float64))
    fk = favor_features(100 * y, w, role="key")  # would underflow without the stabiliser
    assert_close(fk.amax(dim=(-1, -2)), torch.full(fk.shape[:2], 32 ** -0.5, dtype=torch.float64))
