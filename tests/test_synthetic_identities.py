"""Synthetic identities (pipeline.data.synthetic_identities): captures of one eye share its iris
texture, other eyes do not."""

import json

import cv2
import numpy as np
import pytest

from pipeline.cli.synthetic_irises import main
from pipeline.common.errors import UserError
from pipeline.common.images import to_uint8
from pipeline.data.synthetic_identities import iter_identities, render_capture

IDS, CAPTURES = 10, 3
ANGLES = 360  # polar samples: one a degree, from +x towards +y
BAND = np.linspace(0.35, 0.65, 8)  # the middle of the annulus, 0 = pupil edge, 1 = limbus


@pytest.fixture(scope="module")
def captures():
    return list(iter_identities(IDS, CAPTURES, 128, seed=0))


def _unrolled(img: np.ndarray, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Daugman's rubber sheet from the TRUE circles: (radius in BAND, angle) samples and where they
    are usable (within ±30° of horizontal, off the lids and glints), columns turned back by the
    recorded rotation so that they index the eye's own angle."""
    theta = np.arange(ANGLES) * (2 * np.pi / ANGLES)
    cos, sin = np.cos(theta), np.sin(theta)
    inner_x, inner_y = rec["pupil_cx"] + rec["pupil_r"] * cos, rec["pupil_cy"] + rec["pupil_r"] * sin
    outer_x, outer_y = rec["iris_cx"] + rec["iris_r"] * cos, rec["iris_cy"] + rec["iris_r"] * sin
    x = np.outer(1 - BAND, inner_x) + np.outer(BAND, outer_x)
    y = np.outer(1 - BAND, inner_y) + np.outer(BAND, outer_y)
    polar = cv2.remap(img[0], x.astype(np.float32), y.astype(np.float32), cv2.INTER_LINEAR)
    up, lo = rec["upper_lid"], rec["lower_lid"]
    usable = (np.abs(sin) < 0.5) & (y > up["y"] + up["curvature"] * (x - up["x"]) ** 2 + 1)
    usable &= y < lo["y"] - lo["curvature"] * (x - lo["x"]) ** 2 - 1
    for gx, gy, gr in rec["reflections"]:
        usable &= np.hypot(x - gx, y - gy) > gr + 2
    back = -round(rec["rotation_deg"] * ANGLES / 360)
    return np.roll(polar, back, axis=1), np.roll(usable, back, axis=1)


def _pearson(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    both = a[1] & b[1]
    assert both.sum() > 300  # a sizeable common band
    return float(np.corrcoef(a[0][both], b[0][both])[0, 1])


def test_captures_are_reproducible_and_match_render_capture(captures):
    assert len(captures) == IDS * CAPTURES
    assert [(r["identity"], r["capture"]) for _, r in captures] == [(i, c) for i in range(IDS) for c in range(CAPTURES)]
    img, rec = render_capture(4, 2, 128, seed=0)
    assert img.shape == (1, 128, 128) and img.dtype == np.float32 and img.min() >= -1 and img.max() <= 1
    assert np.array_equal(img, captures[4 * CAPTURES + 2][0]) and rec == captures[4 * CAPTURES + 2][1]
    again, _ = render_capture(4, 2, 128, seed=0)
    other_seed, _ = render_capture(4, 2, 128, seed=1)
    assert np.array_equal(img, again) and not np.array_equal(img, other_seed)


def test_captures_of_one_eye_differ_as_images(captures):
    for identity in range(IDS):
        group = captures[identity * CAPTURES : (identity + 1) * CAPTURES]
        images = [img for img, _ in group]
        records = [rec for _, rec in group]
        assert all(np.abs(a - b).mean() > 0.01 for i, a in enumerate(images) for b in images[i + 1 :])
        assert len({round(r["pupil_iris_ratio"], 4) for r in records}) == CAPTURES
        assert len({r["noise_sigma"] for r in records}) == CAPTURES
    records = [rec for _, rec in captures]
    assert all(0.25 <= r["pupil_iris_ratio"] <= 0.55 and r["defect"] is None for r in records)
    assert all(abs(r["rotation_deg"]) <= 10 for r in records)
    assert len({r["rotation_deg"] for r in records}) > 5


def test_genuine_textures_correlate_and_impostors_do_not(captures):
    """Unrolled with their true circles and turned back, captures of one eye share its texture; two
    eyes' textures do not. (A ±30° band holds only about ten of the texture's crypts and furrows,
    so single impostor pairs can reach |r| ≈ 0.5; their median stays small.)"""
    sheets = [_unrolled(img, rec) for img, rec in captures]
    genuine, impostor = [], []
    for i in range(len(sheets)):
        for j in range(i + 1, len(sheets)):
            same = captures[i][1]["identity"] == captures[j][1]["identity"]
            (genuine if same else impostor).append(_pearson(sheets[i], sheets[j]))
    genuine, impostor = np.array(genuine), np.abs(impostor)
    assert genuine.min() > 0.6 and np.median(genuine) > 0.8
    assert np.median(impostor) < 0.2
    assert genuine.min() > impostor.max()  # the two distributions do not overlap


def test_bad_arguments_are_user_errors_before_any_drawing():
    for args, msg in [((-1, 2), "number of identities"), ((2, -1), "captures per identity"),
                      ((2, 2, 8), "size"), ((2, 2, 64, -1), "seed")]:
        with pytest.raises(UserError, match=msg):
            iter_identities(*args)
    with pytest.raises(UserError, match="identity must be >= 0"):
        render_capture(-1, 0)


def test_cli_writes_identities_with_labels(tmp_path, capsys):
    out = tmp_path / "ids"
    with pytest.raises(SystemExit) as exc:
        main([str(out), "--identities", "3", "--captures", "2", "--size", "48", "--seed", "5"])
    assert exc.value.code == 0
    labels = json.loads((out / "labels.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    assert [(lab["identity"], lab["capture"]) for lab in labels] == [(i, c) for i in range(3) for c in range(2)]
    for i, (lab, (img, rec)) in enumerate(zip(labels, iter_identities(3, 2, 48, seed=5), strict=True)):
        assert lab == {"file": f"{i:06d}.png", **rec}
        assert np.array_equal(cv2.imread(str(out / lab["file"]), cv2.IMREAD_UNCHANGED), to_uint8(img[0]))
    assert "3 eyes" in capsys.readouterr().out
