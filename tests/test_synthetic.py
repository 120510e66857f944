"""The procedural iris generator: determinism, value ranges, ground truth against the pixels, CLI."""

import json

import cv2
import numpy as np
import pytest

from pipeline.cli.synthetic_irises import main
from pipeline.common.errors import UserError
from pipeline.common.images import to_uint8
from pipeline.data.synthetic import DEFECTS, generate_irises

DARK = 0.12  # a pixel is "pupil-dark" below pupil_value + DARK (pupil and iris floor differ by ≥ 0.29)


@pytest.fixture(scope="module")
def good128():
    return generate_irises(24, 128, seed=11)


def _dark_mask(img, rec):
    return img < rec["pupil_value"] + DARK


def _glint_mask(shape, rec, pad=2.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for gx, gy, gr in rec["reflections"]:
        mask |= np.hypot(xx - gx, yy - gy) <= gr + pad
    return mask


def _dist(shape, cx, cy):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(xx - cx, yy - cy), xx, yy


def test_same_seed_same_images_and_subsets_are_stable():
    a, ra = generate_irises(6, 48, seed=3, defects=0.5)
    b, rb = generate_irises(6, 48, seed=3, defects=0.5)
    c, _ = generate_irises(6, 48, seed=4, defects=0.5)
    head, rhead = generate_irises(3, 48, seed=3, defects=0.5)
    assert np.array_equal(a, b) and ra == rb
    assert not np.array_equal(a, c)
    assert np.array_equal(head, a[:3]) and rhead == ra[:3]
    assert len({im.tobytes() for im in a}) == 6  # images differ from each other


@pytest.mark.parametrize("size,channels", [(32, 1), (64, 3), (128, 1), (256, 1)])
def test_shape_dtype_range(size, channels):
    imgs, recs = generate_irises(3, size, seed=1, channels=channels, defects=[None, "bleed", "oval"])
    assert imgs.shape == (3, channels, size, size) and imgs.dtype == np.float32
    assert imgs.min() >= -1.0 and imgs.max() <= 1.0
    assert imgs.std() > 0.2  # not flat: dark pupil, bright glints and sclera
    for img, rec in zip(imgs, recs, strict=True):
        d, _, _ = _dist((size, size), rec["pupil_cx"], rec["pupil_cy"])
        assert img[0][d <= max(1.0, rec["pupil_r"])].min() < rec["pupil_value"] + DARK
        assert 0.28 * size <= rec["iris_r"] <= 0.42 * size
        assert abs(rec["iris_cx"] - (size - 1) / 2) <= 0.08 * size
        assert abs(rec["iris_cy"] - (size - 1) / 2) <= 0.08 * size


def test_rgb_is_grey_with_a_slight_tint():
    imgs, _ = generate_irises(2, 64, seed=2, channels=3)
    diff = np.abs(imgs[:, 0] - imgs[:, 1]).mean()
    assert 0.0 < diff < 0.1
    assert np.corrcoef(imgs[:, 0].ravel(), imgs[:, 2].ravel())[0, 1] > 0.95


def test_good_geometry_in_range(good128):
    _, recs = good128
    for r in recs:
        assert r["defect"] is None and r["pupil_axis_ratio"] == 1.0
        offset = np.hypot(r["pupil_cx"] - r["iris_cx"], r["pupil_cy"] - r["iris_cy"])
        assert offset <= 0.08 * r["iris_r"]
        assert 0.2 <= r["pupil_r"] / r["iris_r"] <= 0.7
        assert offset + r["pupil_r"] < r["iris_r"]


def test_pupil_pixels_dark_and_centroid_matches_record(good128):
    imgs, recs = good128
    size = imgs.shape[-1]
    for img, rec in zip(imgs[:, 0], recs, strict=True):
        d, xx, yy = _dist(img.shape, rec["pupil_cx"], rec["pupil_cy"])
        glints = _glint_mask(img.shape, rec)
        core = (d <= rec["pupil_r"] - 2.5 * size / 128) & ~glints
        assert np.mean(_dark_mask(img, rec)[core]) > 0.97
        # Pixels darker than halfway between pupil and the iris just outside it, versus the
        # rasterised recorded disk (a blurred edge crosses the halfway level at the true edge),
        # both with the glints cut out.
        ring = (d > rec["pupil_r"] + 2.5) & (d < rec["pupil_r"] + 4.5) & ~glints
        level = np.median(img[ring])
        region = (d <= rec["pupil_r"] + 2.5) & ~glints
        measured = (img < (level + rec["pupil_value"]) / 2) & region
        expected = (d <= rec["pupil_r"]) & region
        assert abs(xx[measured].mean() - xx[expected].mean()) < 0.5
        assert abs(yy[measured].mean() - yy[expected].mean()) < 0.5
        # Area by linear unmixing (blur and zero-mean noise preserve it): each pixel's pupil
        # fraction is (iris level − value) / (iris level − pupil level).
        area = ((level - img[region]) / (level - rec["pupil_value"])).sum()
        assert abs(area / expected.sum() - 1.0) < 0.08
        assert abs(measured.sum() / expected.sum() - 1.0) < 0.08


def test_iris_is_brighter_than_pupil_and_limbus_is_an_edge(good128):
    imgs, recs = good128
    for img, rec in zip(imgs[:, 0], recs, strict=True):
        d, _, _ = _dist(img.shape, rec["iris_cx"], rec["iris_cy"])
        pr, ir = rec["pupil_r"], rec["iris_r"]
        annulus = (d > pr + 3) & (d < ir - 3)
        assert np.median(img[annulus]) > rec["pupil_value"] + 0.3
        # Few pupil-dark pixels in the iris of a good image (lashes are thin and lighter).
        assert np.mean(_dark_mask(img, rec)[annulus]) < 0.01


def test_defects_follow_the_request():
    names = [None, *DEFECTS, None]
    _, recs = generate_irises(len(names), 32, seed=0, defects=names)
    assert [r["defect"] for r in recs] == names
    _, recs = generate_irises(5, 32, seed=0, defects=1.0)
    assert all(r["defect"] in DEFECTS for r in recs)
    _, recs = generate_irises(5, 32, seed=0, defects=0.0)
    assert all(r["defect"] is None for r in recs)
    _, recs = generate_irises(200, 16, seed=5, defects=0.5)
    kinds = [r["defect"] for r in recs]
    assert 70 <= sum(k is not None for k in kinds) <= 130
    assert set(kinds) == {None, *DEFECTS}


def _measure(img, rec):
    """Dark-pupil geometry from pixels: centroid, axis ratio from second moments, radial deviation."""
    d, xx, yy = _dist(img.shape, rec["pupil_cx"], rec["pupil_cy"])
    inside = d <= rec["pupil_r"]  # glints are counted as pupil where the record says pupil
    if rec["defect"] == "oval":
        a, b = rec["semi_axes"]
        t = np.radians(rec["pupil_angle"])
        u = (xx - rec["pupil_cx"]) * np.cos(t) + (yy - rec["pupil_cy"]) * np.sin(t)
        v = -(xx - rec["pupil_cx"]) * np.sin(t) + (yy - rec["pupil_cy"]) * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    glints = _glint_mask(img.shape, rec, pad=1.5) & inside
    iris_ring = np.abs(d - (rec["pupil_r"] + rec["iris_r"]) / 2) < 2
    dark = (img < (np.median(img[iris_ring]) + rec["pupil_value"]) / 2) | glints
    dark &= d < rec["iris_r"]
    n, labels = cv2.connectedComponents(dark.astype(np.uint8))
    lab = labels[int(round(rec["pupil_cy"])), int(round(rec["pupil_cx"]))]
    blob = labels == lab
    cx, cy = xx[blob].mean(), yy[blob].mean()
    cov = np.cov(np.stack([xx[blob] - cx, yy[blob] - cy]))
    ev = np.linalg.eigvalsh(cov)
    contour = blob & ~cv2.erode(blob.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    ang = np.arctan2(yy[contour] - cy, xx[contour] - cx)
    rad = np.hypot(xx[contour] - cx, yy[contour] - cy)
    bins = np.digitize(ang, np.linspace(-np.pi, np.pi, 49))
    outer = np.array([rad[bins == b].max() for b in np.unique(bins)])
    return cx, cy, np.sqrt(ev[0] / ev[1]), outer.std() / outer.mean(), blob.sum()


def test_defect_geometry_is_visible_in_the_pixels():
    kinds = [None, "oval", "irregular", "offcenter", "bleed"] * 3
    imgs, recs = generate_irises(len(kinds), 128, seed=7, defects=kinds)
    for img, rec in zip(imgs[:, 0], recs, strict=True):
        cx, cy, axis_ratio, radial_dev, area = _measure(img, rec)
        disk = np.pi * rec["pupil_r"] ** 2
        if rec["defect"] is None:
            assert axis_ratio > 0.95 and radial_dev < 0.05
        elif rec["defect"] == "oval":
            assert rec["pupil_axis_ratio"] <= 0.75
            assert abs(axis_ratio - rec["pupil_axis_ratio"]) < 0.05
        elif rec["defect"] == "irregular":
            assert radial_dev > 0.09
        elif rec["defect"] == "offcenter":
            off = np.hypot(cx - rec["iris_cx"], cy - rec["iris_cy"])
            assert off > 0.2 * rec["iris_r"] and axis_ratio > 0.95
        elif rec["defect"] == "bleed":
            assert area > 1.08 * disk  # tongues reach out of the round pupil into the iris


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="unknown defect"):
        generate_irises(2, 32, defects=["oval", "squashed"])
    with pytest.raises(UserError, match="2 entries for 3"):
        generate_irises(3, 32, defects=["oval", None])
    with pytest.raises(UserError, match="fraction"):
        generate_irises(3, 32, defects=1.5)
    with pytest.raises(UserError, match="channels"):
        generate_irises(3, 32, channels=2)
    with pytest.raises(UserError, match="seed"):
        generate_irises(3, 32, seed=-1)


def test_cli_writes_pngs_and_labels_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "synth"
    with pytest.raises(SystemExit) as exc:
        main([str(out), "--n", "4", "--size", "32", "--seed", "2", "--defects", "0.5"])
    assert exc.value.code == 0
    labels = json.loads((out / "labels.json").read_text())
    assert [lab["file"] for lab in labels] == [f"{i:06d}.png" for i in range(4)]
    imgs, recs = generate_irises(4, 32, seed=2, defects=0.5)
    for lab, img, rec in zip(labels, imgs, recs, strict=True):
        png = cv2.imread(str(out / lab["file"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(png, to_uint8(img[0]))
        assert lab["pupil_r"] == pytest.approx(rec["pupil_r"]) and lab["defect"] == rec["defect"]
    capsys.readouterr()

    with pytest.raises(SystemExit) as exc:
        main([str(out), "--n", "2", "--size", "32"])
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 4  # untouched

    with pytest.raises(SystemExit) as exc:
        main([str(out), "--n", "2", "--size", "32", "--overwrite", "--channels", "3"])
    assert exc.value.code == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "labels.json"]
    assert cv2.imread(str(out / "000000.png"), cv2.IMREAD_UNCHANGED).shape == (32, 32, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # no temp folders left behind


@pytest.mark.parametrize("args,msg", [
    (["--n", "0"], "--n must be >= 1"),
    (["--defects", "1.5"], "fraction"),
    (["--seed", "-3"], "seed"),
    (["--size", "8"], "size"),
    (["--identities", "-2", "--captures", "2"], "must be >= 1"),
    (["--identities", "2", "--captures", "0"], "must be >= 1"),
    (["--identities", "2"], "go together"),
    (["--captures", "2"], "go together"),
    (["--identities", "2", "--captures", "2", "--frame", "640x480"], "--frame"),
    (["--identities", "2", "--captures", "2", "--defects", "0.2"], "--defects"),
    (["--identities", "2", "--captures", "2", "--n", "5"], "--n"),
    (["--identities", "2", "--captures", "2", "--seed", "-1"], "seed"),
])
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main([str(out), "--size", "32", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written
