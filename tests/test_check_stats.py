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
