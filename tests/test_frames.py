"""Synthetic camera frames (pipeline.data.synthetic_frames) and the checker on them: the truth the
frames carry, checked against closed forms, and the checker's accuracy against that truth."""

import math

import numpy as np
import pytest

from pipeline.check.analyze import analyze_image, margin_adequacy
from pipeline.common.config import CircularityConfig
from pipeline.common.errors import UserError
from pipeline.data.synthetic_frames import iter_frames, render_frame

CFG = CircularityConfig()


def _segment_share(d: float, r: float) -> float:
    """Share of a disk of radius r beyond a straight edge at distance d from its centre (closed form)."""
    return (r * r * math.acos(d / r) - d * math.sqrt(r * r - d * d)) / (math.pi * r * r)


def test_frames_are_reproducible_uint8_of_the_asked_size():
    a, rec = render_frame(np.random.default_rng([3, 1]), 240, 320)
    b, _ = render_frame(np.random.default_rng([3, 1]), 240, 320)
    assert a.shape == (240, 320) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert 0.125 * 240 <= rec["iris_r"] <= 0.27 * 240 and rec["kind"] == "good"
    assert a.std() > 10  # an eye, not a blank


def test_cut_frames_truth_matches_the_circular_segment():
    for i in range(6):
        _, rec = render_frame(np.random.default_rng([5, i]), 480, 640, "cut")
        x, y, r = rec["iris_cx"], rec["iris_cy"], rec["iris_r"]
        d = min(x + 0.5, 639.5 - x, y + 0.5, 479.5 - y)  # distance to the edge it crosses
        assert 0.3 * r - 1e-9 <= d <= 0.6 * r + 1e-9
        assert rec["iris_outside"] == pytest.approx(_segment_share(d, r), abs=0.01)
        assert rec["usable_iris_area"] <= 1 - rec["iris_outside"] + 1e-9
        assert rec["margin_adequacy"] == 0.0


def test_occluding_lids_hide_more_of_the_same_eye():
    for i in range(6):
        _, good = render_frame(np.random.default_rng([7, i]), 480, 640, "good")
        _, occluded = render_frame(np.random.default_rng([7, i]), 480, 640, "occluded")
        assert (occluded["iris_cx"], occluded["iris_r"]) == (good["iris_cx"], good["iris_r"])  # the same eye
        assert occluded["usable_iris_area"] < good["usable_iris_area"] - 0.05
        assert occluded["upper_lid"]["y"] >= good["upper_lid"]["y"] and occluded["lower_lid"]["y"] <= good["lower_lid"]["y"]


def test_margin_adequacy_closed_form():
    # Iris r = 50 at x = 80 in a 640-wide frame: left margin 30.5 px = 0.61 r → 1.02 of 0.6 r; top
    # margin 5.5 px = 0.11 r → 0.55 of 0.2 r: the smallest wins.
    assert margin_adequacy(80.0, 55.0, 50.0, 640, 480) == pytest.approx((55.5 - 50) / 50 / 0.2)
    assert margin_adequacy(320.0, 240.0, 50.0, 640, 480) == 1.0
    assert margin_adequacy(20.0, 240.0, 50.0, 640, 480) == 0.0


@pytest.fixture(scope="module")
def frame_results():
    return [(analyze_image(f, CFG), r) for f, r in iter_frames(200, 480, 640, seed=29, kinds=(0.2, 0.1))]


def test_checker_accuracy_on_200_frames(frame_results):
    good = [(m, r) for m, r in frame_results if r["kind"] == "good"]
    assert len(good) > 120 and all(m["pupil_found"] and m["iris_found"] for m, _ in good)
    pupil_c = np.mean([math.hypot(m["pupil_cx"] - r["pupil_cx"], m["pupil_cy"] - r["pupil_cy"]) for m, r in good])
    iris_c = np.mean([math.hypot(m["iris_cx"] - r["iris_cx"], m["iris_cy"] - r["iris_cy"]) for m, r in good])
    pupil_r = np.mean([abs(m["pupil_r"] / r["pupil_r"] - 1) for m, r in good])
    iris_r = np.mean([abs(m["iris_r"] / r["iris_r"] - 1) for m, r in good])
    assert pupil_c < 1.0 and iris_c < 2.0 and pupil_r < 0.03 and iris_r < 0.03, (pupil_c, iris_c, pupil_r, iris_r)
    usable = np.mean([abs(m["usable_iris_area"] - r["usable_iris_area"]) for m, r in good])
    margin = np.mean([abs(m["margin_adequacy"] - r["margin_adequacy"]) for m, r in good])
    assert usable < 0.05 and margin < 0.02, (usable, margin)


def test_occluded_frames_measure_less_usable_iris(frame_results):
    occluded = [m["usable_iris_area"] for m, r in frame_results if r["kind"] == "occluded" and m["iris_found"]]
    good = [m["usable_iris_area"] for m, r in frame_results if r["kind"] == "good"]
    assert len(occluded) > 20 and np.median(occluded) < np.median(good) - 0.2


def test_bad_frame_arguments_are_user_errors():
    with pytest.raises(UserError, match="at least 64"):
        render_frame(np.random.default_rng(0), 40, 640)
    with pytest.raises(UserError, match="unknown frame kind"):
        render_frame(np.random.default_rng(0), 480, 640, "blurry")
    with pytest.raises(UserError, match="sum to <= 1"):
        next(iter_frames(3, kinds=(0.8, 0.5)))
