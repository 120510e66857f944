"""Per-image analysis: exact shapes drawn here, and the synthetic irises with their ground truth."""

from collections import Counter

import cv2
import numpy as np
import pytest

from pipeline.check.analyze import analyze_batch, analyze_image, to_grey_unit
from pipeline.check.rules import (
    METRICS,
    NO_PUPIL,
    evaluate_rules,
    round_pupil_without_bleed,
    rules_from_config,
)
from pipeline.common.config import CircularityConfig, load_config
from pipeline.common.images import to_unit
from pipeline.data.synthetic import generate_irises

CFG = CircularityConfig()
# What each synthetic defect must be reported as (its primary symptom; see CircularityConfig).
EXPECTED_RULES = {
    "bleed": ("bleed_fraction",),
    "irregular": ("pupil_circularity", "pupil_radial_dev"),
    "oval": ("pupil_axis_ratio", "pupil_circularity"),
    "offcenter": ("concentricity",),
}


def _disk_image(r: float, cx: float, cy: float, size: int = 128) -> np.ndarray:
    """A hard-edged (rasterised, not anti-aliased) dark disk on a grey background."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 0.6, np.float32)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 0.08
    return img


@pytest.mark.parametrize("r", [8, 9, 12, 16, 20, 25, 30, 35, 40])
def test_rasterised_circle_is_round(r):
    rng = np.random.default_rng(r)
    for _ in range(3):
        cx, cy = 63.5 + rng.random(), 63.5 + rng.random()
        m = analyze_image(_disk_image(r, cx, cy), CFG)
        assert m["pupil_found"]
        assert m["pupil_circularity"] >= 0.98
        assert m["pupil_axis_ratio"] >= 0.97
        assert m["pupil_radial_dev"] < 0.03
        assert abs(m["pupil_r"] - r) / r < 0.03  # area-equivalent radius of the raster ≈ r
        assert np.hypot(m["pupil_cx"] - cx, m["pupil_cy"] - cy) < 0.3


@pytest.mark.parametrize("angle", [0.0, 25.0, 60.0, 90.0, 137.0])
def test_ellipse_axis_ratio(angle):
    img = np.full((128, 128), 160, np.uint8)
    cv2.ellipse(img, ((64.3, 63.6), (56.0, 44.8), angle), 20, -1, cv2.LINE_AA)  # axes 56 × 44.8: ratio 0.8
    m = analyze_image(img, CFG)
    assert 0.78 <= m["pupil_axis_ratio"] <= 0.82
    assert m["reason"].startswith("pupil_axis_ratio") or not m["iris_found"]


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(128, 128), (40, 90), (7, 7)])
def test_constant_images_have_no_pupil(value, shape):
    m = analyze_image(np.full(shape, value, np.float32), CFG)
    assert m["pupil_found"] is False and m["iris_found"] is False
    assert m["pass"] is False and m["reason"] == NO_PUPIL
    assert set(METRICS) <= set(m)
    assert np.isnan(m["pupil_circularity"]) and np.isnan(m["bleed_fraction"])


def test_noise_only_image_has_no_pupil():
    img = np.random.default_rng(0).uniform(0.4, 0.6, (128, 128)).astype(np.float32)
    assert analyze_image(img, CFG)["reason"] == NO_PUPIL


def test_pixel_formats_agree():
    img, _ = generate_irises(1, 128, seed=3)
    unit = to_unit(img[0, 0])
    ref = analyze_image(unit, CFG)
    u8 = np.round(unit * 255).astype(np.uint8)
    u16 = np.round(unit * 65535).astype(np.uint16)
    rgb = np.repeat(u8[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(u8[:, :, None], 255)], axis=2)
    for variant in (u8, u16, rgb, rgba, unit[:, :, None]):
        m = analyze_image(variant, CFG)
        assert m["pass"] == ref["pass"]
        assert abs(m["pupil_r"] - ref["pupil_r"]) < 0.1
        assert abs(m["iris_r"] - ref["iris_r"]) < 0.3
    assert np.allclose(to_grey_unit(rgb), u8 / 255.0, atol=1e-6)


def test_measured_at_own_size():
    """The same eye at 128 and 256 px: lengths double, shape figures stay."""
    img, rec = generate_irises(1, 128, seed=5)
    small = to_unit(img[0, 0])
    big = cv2.resize(small, (256, 256), interpolation=cv2.INTER_CUBIC)
    a, b = analyze_image(small, CFG), analyze_image(big, CFG)
    assert a["pass"] and b["pass"]
    assert b["pupil_r"] == pytest.approx(2 * a["pupil_r"], rel=0.03)
    assert b["iris_r"] == pytest.approx(2 * a["iris_r"], rel=0.03)
    assert b["pupil_circularity"] == pytest.approx(a["pupil_circularity"], abs=0.02)
    # Non-square crop: the eye keeps its place, coordinates are those of the crop.
    crop = small[:, 10:110]
    c = analyze_image(crop, CFG)
    assert c["pupil_found"]
    assert c["pupil_cx"] == pytest.approx(a["pupil_cx"] - 10, abs=0.3)


def test_rules_in_config_order_and_reason_text():
    rules = rules_from_config(CFG)
    assert [r.metric for r in rules][:3] == ["bleed_fraction", "pupil_axis_ratio", "pupil_circularity"]
    metrics = {m: 0.0 for m in METRICS} | {"pupil_found": True, "iris_found": True, "pupil_axis_ratio": 0.5,
                                          "pupil_circularity": 0.5, "iris_circularity": 1.0, "pupil_iris_ratio": 0.4}
    ok, reason = evaluate_rules(metrics, CFG)
    assert not ok and reason == "pupil_axis_ratio 0.5 < 0.85"  # the first failing rule wins
    metrics["pupil_axis_ratio"] = 0.9
    assert evaluate_rules(metrics, CFG) == (False, "pupil_circularity 0.5 < 0.9")
    metrics["pupil_circularity"] = 0.95
    assert evaluate_rules(metrics, CFG) == (True, "")
    metrics["bleed_fraction"] = float("nan")  # unmeasurable counts as failing
    assert evaluate_rules(metrics, CFG)[1].startswith("bleed_fraction")


def test_yaml_thresholds_equal_defaults():
    assert load_config("configs/circularity.yaml").circularity == CircularityConfig()


@pytest.fixture(scope="module")
def synthetic_results():
    """200 good eyes and 60 of each defect, with their ground truth."""
    kinds = [None] * 200 + [d for d in EXPECTED_RULES for _ in range(60)]
    images, records = generate_irises(len(kinds), 128, seed=1, defects=kinds)
    return [(analyze_image(to_unit(img[0]), CFG), rec) for img, rec in zip(images, records, strict=True)]


def test_accuracy_on_good_eyes(synthetic_results):
    good = [(m, r) for m, r in synthetic_results if r["defect"] is None]
    assert len(good) == 200 and all(m["pupil_found"] and m["iris_found"] for m, _ in good)
    pupil_c = np.mean([np.hypot(m["pupil_cx"] - r["pupil_cx"], m["pupil_cy"] - r["pupil_cy"]) for m, r in good])
    pupil_r = np.mean([abs(m["pupil_r"] - r["pupil_r"]) / r["pupil_r"] for m, r in good])
    iris_c = np.mean([np.hypot(m["iris_cx"] - r["iris_cx"], m["iris_cy"] - r["iris_cy"]) for m, r in good])
    iris_r = np.mean([abs(m["iris_r"] - r["iris_r"]) / r["iris_r"] for m, r in good])
    assert pupil_c < 1.0 and pupil_r < 0.03 and iris_c < 2.0 and iris_r < 0.04
    assert sum(m["pass"] for m, _ in good) >= 0.95 * len(good)


@pytest.mark.parametrize("defect", list(EXPECTED_RULES))
def test_defects_fail_for_the_right_reason(synthetic_results, defect):
    found = [m for m, r in synthetic_results if r["defect"] == defect]
    reasons = Counter(m["reason"].split(" ")[0] if m["reason"] else "pass" for m in found)
    right = sum(reasons[k] for k in EXPECTED_RULES[defect])
    assert right >= 0.9 * len(found), reasons


def test_offcenter_and_oval_measures_match_truth(synthetic_results):
    off = [(m, r) for m, r in synthetic_results if r["defect"] == "offcenter"]
    err = [abs(m["concentricity"] - r["concentricity"]) for m, r in off]
    assert np.median(err) < 0.02
    oval = [(m, r) for m, r in synthetic_results if r["defect"] == "oval"]
    err = [abs(m["pupil_axis_ratio"] - r["pupil_axis_ratio"]) for m, r in oval]
    assert np.median(err) < 0.03


def test_analyze_batch_is_analyze_image_on_each_hwc_image():
    images, _ = generate_irises(3, 64, seed=5, channels=3, defects=0.5)
    cfg = CircularityConfig()
    expected = [analyze_image(to_unit(img).transpose(1, 2, 0), cfg) for img in images]
    got = analyze_batch(images, cfg)
    for e, g in zip(expected, got, strict=True):
        assert e.keys() == g.keys()
        assert all(e[k] == g[k] or (e[k] != e[k] and g[k] != g[k]) for k in e)  # NaN == NaN here


def test_round_pupil_without_bleed_uses_exactly_the_pupil_shape_thresholds():
    cfg = CircularityConfig()
    good = {"pupil_found": True, "pupil_circularity": cfg.min_pupil_circularity,
            "pupil_axis_ratio": cfg.min_pupil_axis_ratio, "bleed_fraction": cfg.max_bleed_fraction,
            "iris_found": False, "iris_r": float("nan"), "sharpness": 0.0}  # iris and quality do not matter
    assert round_pupil_without_bleed(good, cfg)
    for key, bad in [("pupil_found", False), ("pupil_circularity", cfg.min_pupil_circularity - 1e-6),
                     ("pupil_axis_ratio", cfg.min_pupil_axis_ratio - 1e-6),
                     ("bleed_fraction", cfg.max_bleed_fraction + 1e-6), ("bleed_fraction", float("nan"))]:
        assert not round_pupil_without_bleed({**good, key: bad}, cfg), key
