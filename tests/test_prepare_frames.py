"""prepare-data on synthetic camera frames with known eyes: where the iris lands in the crops, and
which frames are turned away and why (truth: pipeline.data.synthetic_frames)."""

import math
from collections import Counter

import numpy as np
import pytest

from pipeline.common.config import CircularityConfig, PrepareConfig
from pipeline.data.synthetic_frames import iter_frames
from pipeline.prepare import Rejected, prepare_frame

CFG = PrepareConfig()


def _prepare(frame: np.ndarray) -> tuple[dict | None, str]:
    try:
        return prepare_frame(frame, CFG, CircularityConfig())[1], "kept"
    except Rejected as exc:
        return None, exc.reason


@pytest.fixture(scope="module")
def prepared():
    """200 good 640x480 frames (seed 31, not a seed the checker was tuned on), then 40 of each bad kind."""
    out = [(_prepare(f), r) for f, r in iter_frames(200, 480, 640, seed=31)]
    out += [(_prepare(f), r) for f, r in iter_frames(40, 480, 640, seed=32, kinds=(1.0, 0.0))]
    out += [(_prepare(f), r) for f, r in iter_frames(40, 480, 640, seed=33, kinds=(0.0, 1.0))]
    return out


def test_crops_centre_the_true_iris_at_the_margin_scale(prepared):
    kept = [(label, rec) for (label, verdict), rec in prepared if rec["kind"] == "good" and verdict == "kept"]
    good = sum(rec["kind"] == "good" for _, rec in prepared)
    assert len(kept) >= 0.9 * good
    size, margin = CFG.size, CFG.margin
    for label, rec in kept:
        left, top, scale = label["crop_box"][0], label["crop_box"][1], label["scale"]
        x, y = (rec["iris_cx"] - left + 0.5) * scale - 0.5, (rec["iris_cy"] - top + 0.5) * scale - 0.5
        assert math.hypot(x - (size - 1) / 2, y - (size - 1) / 2) < 0.02 * size
        assert rec["iris_r"] * scale == pytest.approx(size / (2 * margin), rel=0.03)


def test_frames_kept_or_turned_away_by_their_true_usable_area_and_cut(prepared):
    """Usable iris area well above the limit (by 0.1): kept; well below: turned away; a cut iris
    (14–31 % of its disk outside the frame, the limit 10 %): turned away as cut."""
    limit = CFG.min_usable_iris_area
    clear = Counter(v for (_, v), rec in prepared if rec["kind"] != "cut" and rec["usable_iris_area"] > limit + 0.1)
    hidden = Counter(v for (_, v), rec in prepared if rec["kind"] != "cut" and rec["usable_iris_area"] < limit - 0.1)
    cut = Counter(v for (_, v), rec in prepared if rec["kind"] == "cut")
    assert clear["kept"] >= 0.97 * sum(clear.values()), clear
    # Mostly hidden: turned away as occluded, or as "no limbus" where too little of it shows to be found.
    assert sum(hidden.values()) >= 10 and hidden["occluded"] >= 0.6 * sum(hidden.values()), hidden
    assert hidden["occluded"] + hidden["no limbus"] == sum(hidden.values()), hidden
    assert cut["iris cut by frame"] >= 0.8 * sum(cut.values()) and cut["kept"] == 0, cut  # the rest: no limbus
