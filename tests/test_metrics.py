"""FID / KID / IS maths on constructed features, checked against independent computations."""

import numpy as np
import pytest

from pipeline.check.metrics import (
    fid_from_features,
    frechet_distance,
    inception_score,
    kid,
    proxy_features,
)
from pipeline.common.errors import UserError


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sqrtm_denman_beavers(m, iters=60):
    """Principal square root of a matrix with positive real eigenvalues (Denman–Beavers iteration)."""
    y, z = m.copy(), np.eye(len(m))
    for _ in range(iters):
        y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
    return y


def test_frechet_1d_and_diagonal_closed_forms():
    # N(m1, s1²) vs N(m2, s2²): (m1 − m2)² + (s1 − s2)².
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    a, b = np.array([0.5, 2.0, 7.0]), np.array([1.0, 0.1, 7.0])
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_matches_brute_force_sqrtm():
    rng = np.random.default_rng(0)
    d = 12
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # tr √(Σ1 Σ2) by a different route: Denman–Beavers on the non-symmetric product.
    brute = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrtm_denman_beavers(s1 @ s2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(brute, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # Singular (rank-deficient) covariances stay finite and non-negative.
    low = np.outer(rng.standard_normal(d), rng.standard_normal(d))
    low = low @ low.T
    assert 0.0 <= frechet_distance(mu1, low, mu2, low) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-6)


def test_fid_identical_and_shifted_sets():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    shift = rng.standard_normal(16)
    assert fid_from_features(f, f + shift) == pytest.approx((shift**2).sum(), rel=1e-8)
    with pytest.raises(UserError):
        fid_from_features(f, f[:, :3])
    with pytest.raises(UserError):
        fid_from_features(f[:1], f)


@pytest.mark.parametrize(("n1", "n2"), [(30, 30), (12, 40), (2, 5)])
def test_fid_with_fewer_images_than_dimensions_matches_covariances(n1, n2):
    # The N × N route (few images, many features) against Fréchet on the D × D covariances, whose
    # square roots of singular matrices lose about sqrt(machine epsilon) of the trace.
    rng = np.random.default_rng(6)
    mix = rng.standard_normal((64, 64))
    f1, f2 = rng.standard_normal((n1, 64)) @ mix, rng.standard_normal((n2, 64)) @ mix + 0.3
    full = frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert fid_from_features(f1, f2) == pytest.approx(full, rel=1e-6)
    # A shifted copy: exactly the squared shift (here the D × D route is off by 1e-4 relative).
    shift = 0.1 * rng.standard_normal(64)
    assert fid_from_features(f1, f1 + shift) == pytest.approx(shift @ shift, rel=1e-9)


def _mmd2_brute(x, y):
    """Unbiased MMD² with k = (x·y/d + 1)³, by explicit loops."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_known_values():
    # Point masses at 0 and 1 in 1-D: k(0,0) + k(1,1) − 2k(0,1) = 1 + 8 − 2 = 7, for any subset.
    mean, std = kid(np.zeros((20, 1)), np.ones((30, 1)), subsets=5, subset_size=10)
    assert mean == pytest.approx(7.0) and std == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((15, 4)), rng.standard_normal((15, 4)) + 0.7
    # One subset holding every point: the whole-set estimate, whatever the permutation.
    assert kid(x, y, subsets=1, subset_size=15)[0] == pytest.approx(_mmd2_brute(x, y), rel=1e-10)


def test_kid_unbiased_for_same_distribution():
    rng = np.random.default_rng(3)
    means = [kid(rng.standard_normal((200, 8)), rng.standard_normal((200, 8)), subsets=20, subset_size=100, seed=s)[0]
             for s in range(10)]
    shifted = kid(rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) + 0.5, subsets=20, subset_size=100)[0]
    assert abs(np.mean(means)) < 0.1 * shifted  # ≈ 0 on average (it may go negative), far below a real shift
    assert min(means) < 0 < shifted


def test_inception_score_extremes():
    assert inception_score(np.zeros((50, 10)), splits=5) == pytest.approx((1.0, 0.0))
    one_hot = np.tile(np.eye(10) * 100.0, (3, 1))  # each split holds every class once, confidently
    mean, std = inception_score(one_hot, splits=3)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError):
        inception_score(np.zeros((3, 10)), splits=10)


def test_proxy_features_deterministic():
    rng = np.random.default_rng(4)
    imgs = rng.uniform(-1, 1, (4, 1, 64, 64)).astype(np.float32)
    a, b = proxy_features(imgs), proxy_features(imgs)
    assert a.shape == (4, 128 + 24) and np.array_equal(a, b)
    assert not np.allclose(a, proxy_features(imgs, seed=1))
    rgb = np.repeat(imgs, 3, axis=1)
    assert np.allclose(proxy_features(rgb), a, atol=1e-5)
