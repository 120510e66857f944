"""The fast helpers of pipeline/check/ give what the slower standard routines they replace give."""

import cv2
import numpy as np
import pytest
from skimage.measure import find_contours, label

from pipeline.check import quality
from pipeline.check.analyze import analyze_image
from pipeline.check.arrays import kernel, linear_quantile
from pipeline.check.contour import longest_closed_contour
from pipeline.check.fit import _null_vectors
from pipeline.check.quality import LASH_CONTRAST, sharpness
from pipeline.common.config import CircularityConfig
from pipeline.common.images import to_unit
from pipeline.data.synthetic import generate_irises


@pytest.mark.parametrize("seed", range(20))
def test_contour_is_skimages_longest_closed_one(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(12, 60, 2)
    img = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), rng.uniform(0.5, 3))
    img = cv2.copyMakeBorder(img, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1.0)  # every contour closes
    level = float(np.quantile(img, rng.uniform(0.2, 0.6)))
    closed = [c for c in find_contours(img, level) if len(c) > 8 and np.array_equal(c[0], c[-1])]
    ours = longest_closed_contour(img, level)
    if not closed:
        assert ours is None
        return
    expected = max(closed, key=len)[:-1, ::-1]
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("shape", [(16, 16), (50, 70), (128, 128)])
def test_sharpness_is_daugmans_kernel_power(shape):
    g = np.random.default_rng(shape[1]).random(shape).astype(np.float32)
    kernel = np.ones((8, 8), np.float32)
    kernel[2:6, 2:6] = -3.0  # Daugman's band-pass: +1 around, -3 in the central 4x4; zero sum
    resp = cv2.filter2D(g.astype(np.float64), -1, kernel.astype(np.float64))[4:-4, 4:-4]
    assert sharpness(g) == pytest.approx(float((resp**2).mean()) * 255.0**2, rel=1e-5)


def test_null_vectors_solve_the_systems():
    systems = np.random.default_rng(0).normal(size=(200, 5, 6))
    vectors = _null_vectors(systems)
    assert np.abs(np.einsum("tij,tj->ti", systems, vectors)).max() < 1e-9 * np.abs(vectors).max()
    degenerate = systems[:1].copy()
    degenerate[0, 1] = degenerate[0, 0]  # two equal rows: no unique null vector
    assert not _null_vectors(degenerate).any()
    mixed = np.concatenate([systems[:3], degenerate])  # one singular system: the others are still solved
    assert np.allclose(_null_vectors(mixed), np.concatenate([vectors[:3], np.zeros((1, 6))]), rtol=1e-9, atol=0)


@pytest.mark.parametrize(("shape", "density"), [((40, 50), 0.45), ((64, 64), 0.12), ((520, 520), 0.002)])
def test_touching_components_are_skimages(shape, density):
    # Few components (8-bit table), over 256 (16-bit labels) and a frame too big for 16-bit labels.
    rng = np.random.default_rng(shape[0])
    mask = (rng.random(shape) < density).astype(np.uint8)
    seed = (mask > 0) & (rng.random(shape) < 0.3)
    labels = label(mask, connectivity=2)
    expected = np.isin(labels, labels[seed]) & (mask > 0)
    assert labels.max() > 1 and expected.any() and not expected.all()
    assert np.array_equal(quality._touching(mask, seed), expected)


@pytest.mark.parametrize("q", [0.0, 0.4, 0.5, 0.93, 1.0])
def test_linear_quantile_is_numpys(q):
    a = np.random.default_rng(1).normal(size=(7, 31))
    assert np.array_equal(linear_quantile(a, q), np.quantile(a, q, axis=-1))


def _lashes_dropped_over_the_whole_window(iris_like, sm, disk, pupil_mask, dy, i_med, scale):
    """The lash rule as first written: closing, labelling and the upper-half test over the whole window."""
    upper = dy < 0
    closed = cv2.morphologyEx(sm, cv2.MORPH_CLOSE, kernel(3 * scale))
    dark = ((closed - sm > LASH_CONTRAST * i_med) & upper).astype(np.uint8)
    above = ((~iris_like | ~disk) & upper & (pupil_mask == 0)).astype(np.uint8)
    n, labels = cv2.connectedComponents(dark | above)  # OpenCV's default labelling, not the one under test
    hit = np.zeros(n, bool)
    hit[labels[above > 0]] = True
    hit[0] = False
    return iris_like & ~(hit[labels] & (dark > 0))


def test_lashes_looked_for_in_the_top_rows_are_those_of_the_whole_window(monkeypatch):
    calls = []
    real = quality._drop_lashes
    monkeypatch.setattr(quality, "_drop_lashes", lambda *a: calls.append([x.copy() if isinstance(x, np.ndarray) else x
                                                                           for x in a]) or real(*a))
    cfg = CircularityConfig()
    for img in generate_irises(40, 128, seed=11, defects=0.6)[0]:
        analyze_image(to_unit(img[0]), cfg)
    assert len(calls) >= 30
    changed = 0
    for args in calls:
        want = _lashes_dropped_over_the_whole_window(*args)
        np.testing.assert_array_equal(real(args[0].copy(), *args[1:]), want)
        changed += not np.array_equal(want, args[0])
    assert changed >= 3  # lashes were found in some eyes: the comparison covers the rule, not only no-ops
    iris_like, sm, disk, pupil_mask, dy, i_med, scale = calls[0]
    below = np.abs(dy) + 1  # a window wholly below the iris centre has no lash rows
    np.testing.assert_array_equal(real(iris_like.copy(), sm, disk, pupil_mask, below, i_med, scale), iris_like)

