"""Iris codes tell synthetic eyes apart (pipeline.check.iris_code, pipeline.check.hamming on
pipeline.data.synthetic_identities): genuine pairs (two captures of one eye: other pupil
dilation, rotation, lids and noise) against impostor pairs (different eyes), on ground truth."""

import numpy as np
import pytest

from pipeline.check.hamming import (
    degrees_of_freedom,
    equal_error_rate,
    genuine_and_impostor,
    pairwise_hamming,
)
from pipeline.check.iris_code import code_image
from pipeline.common.config import CircularityConfig
from pipeline.common.images import to_unit
from pipeline.data.synthetic_identities import iter_identities

# Each capture turns the eye by up to ±10°, so two captures differ by up to 20°: shifts of ±16
# angular samples of 256 (±22.5°) cover it (identity-check's default, ±8, suits one camera).
MAX_SHIFT = 16


@pytest.fixture(scope="module")
def scores():
    codes, ids = [], []
    for img, rec in iter_identities(200, 4, 128, seed=5):
        code, reason = code_image(to_unit(img[0]), CircularityConfig())
        assert code is not None, (rec["identity"], rec["capture"], reason)
        codes.append(code)
        ids.append(rec["identity"])
    hd, _ = pairwise_hamming(codes, None, MAX_SHIFT)
    return genuine_and_impostor(hd, np.array(ids))


def test_genuine_and_impostor_distances_separate(scores):
    genuine, impostor = scores
    assert len(genuine) == 200 * 6 and np.isfinite(genuine).all() and np.isfinite(impostor).all()
    eer, _ = equal_error_rate(genuine, impostor)
    assert eer <= 0.01, eer
    assert np.median(genuine) < 0.3 < 0.42 < np.median(impostor)


def test_impostor_distribution_is_that_of_independent_eyes(scores):
    _, impostor = scores
    # Daugman: unrelated codes score 0.5, ≈ 0.45–0.47 once the best of several rotations is taken.
    assert 0.43 < impostor.mean() < 0.5
    assert degrees_of_freedom(impostor) > 200
