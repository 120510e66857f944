"""McNemar's exact test for paired pass rates, against scipy's binomial test and a hand count."""

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.check.stats import mcnemar_exact


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_matches_the_binomial_test_on_discordant_pairs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    a, b = rng.random(n) < rng.random(), rng.random(n) < rng.random()
    result = mcnemar_exact(a, b)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    assert (result["a_only"], result["b_only"]) == (a_only, b_only)
    assert result["difference"] == pytest.approx(a.mean() - b.mean())
    expected = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    assert result["p_value"] == pytest.approx(expected, rel=1e-12)


def test_mcnemar_small_case_by_hand():
    # 5 discordant pairs, all one way: p = 2 · (1/2)^5
    a = [True] * 5 + [True, False]
    b = [False] * 5 + [True, False]
    assert mcnemar_exact(a, b)["p_value"] == pytest.approx(2 / 32)
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


# ------------------------------------------------------------------ paired bootstrap, Holm, MMD


def test_holm_by_hand():
    from pipeline.check.stats import holm_adjust

    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → kept monotone at 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == []


def test_paired_bootstrap_of_a_mean_matches_the_normal_interval():
    from pipeline.check.stats import mean_difference, paired_bootstrap

    rng = np.random.default_rng(3)
    a = rng.normal(5.0, 3.0, 400)  # large spread shared by both sets through the seed ...
    b = a - 0.2 + rng.normal(0.0, 0.5, 400)  # ... a small true shift with little paired noise
    result = paired_bootstrap(mean_difference(a, b), 400, resamples=4000, seed=1)
    d = a - b
    assert result["estimate"] == pytest.approx(d.mean(), rel=1e-12)
    half = 1.959964 * d.std(ddof=1) / np.sqrt(400)  # what pairing buys: 0.5/√400, not 3/√400
    lo, hi = result["ci95"]
    assert lo == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert result["p_value"] == pytest.approx(1 / 4000)  # every resample is on one side of 0
    same = paired_bootstrap(mean_difference(a, a + rng.normal(0, 0.5, 400)), 400, resamples=4000, seed=1)
    assert same["p_value"] > 0.05 and same["ci95"][0] < 0 < same["ci95"][1]


def test_mean_difference_skips_pairs_with_a_missing_value():
    from pipeline.check.stats import mean_difference

    of = mean_difference([1.0, np.nan, 3.0, 4.0], [0.0, 1.0, 1.0, np.nan])
    assert of(np.ones((1, 4)))[0] == pytest.approx((1.0 + 2.0) / 2)
    assert of(np.array([[3, 0, 1, 0]]))[0] == pytest.approx((3 * 1.0 + 2.0) / 4)


def test_mmd_to_reference_equals_the_unbiased_estimate_and_brute_force():
    from pipeline.check.metrics import _kernel, _mmd2_unbiased, mmd2_to_reference

    rng = np.random.default_rng(0)
    x, ref = rng.normal(size=(12, 5)), rng.normal(0.3, 1.0, size=(12, 5))
    of = mmd2_to_reference(x, ref)
    assert of(np.ones(12))[0] == pytest.approx(_mmd2_unbiased(x, ref), rel=1e-10)
    counts = np.bincount(rng.integers(0, 12, 12), minlength=12)
    drawn = np.repeat(np.arange(12), counts)  # a resample, row by row
    within = [_kernel(x[[i]], x[[j]])[0, 0] for p, i in enumerate(drawn) for q, j in enumerate(drawn)
              if p != q and i != j]  # pairs of two draws of one row left out
    kr = _kernel(ref, ref)
    brute = (np.mean(within) + (kr.sum() - np.trace(kr)) / (12 * 11)
             - 2 * np.mean([_kernel(x[[i]], ref).mean() for i in drawn]))
    assert of(counts[None])[0] == pytest.approx(brute, rel=1e-10)
