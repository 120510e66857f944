"""Noise schedules against their closed forms."""

import math

import numpy as np
import pytest

from guided_diffusion.errors import DiffusionSettingError
from guided_diffusion.schedules import cosine_betas, get_betas, linear_betas


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name, T):
    betas = get_betas(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    abar = np.cumprod(1 - betas)
    assert (abar > 0).all() and (abar < 1).all()
    assert (np.diff(abar) < 0).all()


def test_cosine_matches_closed_form_before_clipping():
    T, s = 1000, 0.008
    betas = cosine_betas(T, s=s)
    abar = np.cumprod(1 - betas)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    unclipped = np.nonzero(betas < 0.999)[0]
    last = unclipped[-1]  # clipping only happens at the very end
    assert last >= T - 2
    expected = np.array([f(t + 1) / f(0) for t in range(last + 1)])
    np.testing.assert_allclose(abar[: last + 1], expected, rtol=1e-9, atol=1e-12)
    assert betas.max() <= 0.999


def test_linear_scales_with_T():
    for T in (1000, 4000, 5000):
        b = linear_betas(T)
        scale = 1000 / T
        assert b[0] == pytest.approx(scale * 1e-4, rel=1e-12)
        assert b[-1] == pytest.approx(scale * 0.02, rel=1e-12)
        np.testing.assert_allclose(np.diff(b), (b[-1] - b[0]) / (T - 1), rtol=1e-6)
    b4, b5 = linear_betas(4000), linear_betas(5000)
    # β·T spans the same range [0.1, 20] for both
    assert b4[0] * 4000 == pytest.approx(b5[0] * 5000) and b4[-1] * 4000 == pytest.approx(b5[-1] * 5000)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(DiffusionSettingError, match="linear, cosine"):
        get_betas("sigmoid", 100)
    with pytest.raises(DiffusionSettingError):
        linear_betas(0)
    with pytest.raises(DiffusionSettingError, match="more than 20"):
        linear_betas(20)  # β_T would reach 1
