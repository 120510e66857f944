"""`prepare-data`: iris-centred crops of rasterised eyes with known circles, their labels, rejects,
the cache and its use as `data.path`, the cut-off geometry against brute force, and bad input."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.check.analyze import analyze_image
from pipeline.cli.prepare_data import main
from pipeline.common.config import CircularityConfig, DataConfig, PrepareConfig
from pipeline.common.errors import UserError
from pipeline.common.images import from_uint
from pipeline.data.fingerprint import dataset_changes, dataset_fingerprint
from pipeline.data.folders import load_image_array
from pipeline.data.iris_crop import CropBox, crop_square, disk_outside_fraction, reflect_indices
from pipeline.data.prepared import read_cache, write_cache
from pipeline.prepare import LABEL_KEYS, QUALITY, Rejected, prepare_frame

REPO = Path(__file__).resolve().parents[1]
SIZE, MARGIN = 128, 1.2


def eye_frame(w: int, h: int, pupil: tuple, iris: tuple, seed: int = 0, bits: int = 8,
              rgb: bool = False) -> np.ndarray:
    """A rasterised NIR eye: bright skin with a slow illumination gradient, a grey textured iris
    disk, a black pupil disk with a glint, anti-aliased edges at sub-pixel (cx, cy, r); pixel (0, 0)'s
    centre is (0, 0). `pupil`/`iris` None leave that disk out."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.72 + 0.12 * xx / w - 0.06 * yy / h

    def paint(img, circle, level):
        cover = np.clip(circle[2] - np.hypot(xx - circle[0], yy - circle[1]) + 0.5, 0.0, 1.0)
        return img * (1 - cover) + cover * level

    if iris is not None:
        tex = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5)
        img = paint(img, iris, 0.42 + 0.05 * tex)
    if pupil is not None:
        img = paint(img, pupil, 0.07)
        img = paint(img, (pupil[0] + 0.4 * pupil[2], pupil[1] - 0.3 * pupil[2], max(1.5, 0.12 * pupil[2])), 0.98)
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0.0, 1.0)
    if rgb:
        img = np.clip(img[:, :, None] * np.array([1.0, 0.93, 0.85]), 0.0, 1.0)
    return np.round(img * (2**bits - 1)).astype(np.uint16 if bits == 16 else np.uint8)


def write(path: Path, img: np.ndarray, params: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, img[:, :, ::-1] if img.ndim == 3 else img, params or [])
    assert ok
    path.write_bytes(buf.tobytes())


# name → (width, height, pupil, iris, options); all kept, sorted by name as prepare-data numbers them
KEPT = {
    "a_centre.png": (320, 240, (150.3, 121.7, 16.2), (151.1, 120.4, 52.6), {}),
    "b_left_edge.png": (320, 240, (52.6, 118.2, 15.1), (50.3, 120.2, 48.4), {}),  # crop padded, iris inside
    "c_top_cut.png": (320, 240, (160.4, 46.9, 14.3), (161.2, 45.3, 50.1), {}),  # crop padded, 1.6 % of iris outside
    "d_16bit.TIF": (320, 240, (170.2, 110.6, 17.3), (168.7, 111.9, 55.4), {"bits": 16}),
    "e_rgb.jpg": (320, 240, (140.8, 130.1, 15.6), (142.0, 129.3, 50.7), {"rgb": True}),
    "sub/f_vga.bmp": (640, 480, (402.6, 251.2, 35.4), (400.2, 250.3, 112.7), {}),
}
REJECTED = {
    "g_blank.png": "no pupil",
    "h_corrupt.png": "unreadable",
    "i_tiny.png": "too small",
    "j_cut.png": "iris cut by frame",
    "k_no_iris.png": "no limbus",
}


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("frames")
    for i, (name, (w, h, pupil, iris, opts)) in enumerate(KEPT.items()):
        params = [cv2.IMWRITE_JPEG_QUALITY, 97] if name.endswith(".jpg") else None
        write(src / name, eye_frame(w, h, pupil, iris, seed=i, **opts), params)
    write(src / "g_blank.png", np.full((240, 320), 180, np.uint8))
    (src / "h_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    write(src / "i_tiny.png", eye_frame(20, 20, (10, 10, 3), (10, 10, 7)))
    write(src / "j_cut.png", eye_frame(320, 240, (150.5, 26.2, 15.0), (151.0, 25.4, 50.0)))  # 19 % outside
    write(src / "k_no_iris.png", eye_frame(320, 240, (160.2, 120.7, 18.0), None))
    (src / "notes.txt").write_text("not an image")
    write(src / ".hidden.png", eye_frame(320, 240, (160, 120, 16), (160, 120, 50)))
    return src


def run(argv: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def prepared(frames, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "out"
    with pytest.raises(SystemExit) as exc:
        main([str(frames), str(out), "--workers", "1"])
    assert exc.value.code == 0
    return out


def crop_circle(circle: tuple, label: dict) -> np.ndarray:
    """A frame circle in the crop's pixels, from the label's box and scale."""
    left, top = label["crop_box"][:2]
    s = label["scale"]
    return np.array([(circle[0] - left + 0.5) * s - 0.5, (circle[1] - top + 0.5) * s - 0.5, circle[2] * s])


def test_crops_are_centred_on_the_known_iris(prepared):
    labels = json.loads((prepared / "labels.json").read_text())
    assert [lab["source"] for lab in labels] == list(KEPT)
    assert [lab["file"] for lab in labels] == [f"images/{i:06d}.png" for i in range(len(KEPT))]
    for lab, (name, (w, h, pupil, iris, _)) in zip(labels, KEPT.items(), strict=True):
        assert lab["frame_size"] == [w, h] and set(LABEL_KEYS) <= set(lab) <= {*LABEL_KEYS, *QUALITY}, name
        known_iris, known_pupil = crop_circle(iris, lab), crop_circle(pupil, lab)
        centre = (SIZE - 1) / 2
        assert math.hypot(known_iris[0] - centre, known_iris[1] - centre) < 0.02 * SIZE, name
        assert abs(known_iris[2] - SIZE / (2 * MARGIN)) < 0.03 * SIZE / (2 * MARGIN), name
        # The labels are the measured circles, carried into the crop with the box and scale used.
        np.testing.assert_allclose(lab["iris"], known_iris, atol=0.01 * SIZE, err_msg=name)
        np.testing.assert_allclose(lab["pupil"], known_pupil, atol=0.01 * SIZE, err_msg=name)
        assert abs(lab["iris"][2] / known_iris[2] - 1) < 0.01 and abs(lab["pupil"][2] / known_pupil[2] - 1) < 0.03
        left, top, right, bottom = lab["crop_box"]
        assert right - left == bottom - top == round(SIZE / lab["scale"])
        # …and the crop itself shows the iris where the label says.
        crop = cv2.imread(str(prepared / lab["file"]), cv2.IMREAD_UNCHANGED)
        assert crop.shape == (SIZE, SIZE) and crop.dtype == (np.uint16 if "16bit" in name else np.uint8), name
        m = analyze_image(crop, CircularityConfig())
        measured = np.array([m["iris_cx"], m["iris_cy"], m["iris_r"]])
        np.testing.assert_allclose(measured, lab["iris"], atol=0.01 * SIZE, err_msg=name)


def test_padding_and_the_iris_outside_are_recorded(prepared):
    labels = {lab["source"]: lab for lab in json.loads((prepared / "labels.json").read_text())}
    centred = labels["a_centre.png"]
    assert centred["padding"] == {"left": 0, "top": 0, "right": 0, "bottom": 0}
    assert centred["padded_fraction"] == 0.0 and centred["iris_outside"] == 0.0
    left = labels["b_left_edge.png"]
    assert left["padding"]["left"] == -left["crop_box"][0] > 0 and left["iris_outside"] == 0.0
    top = labels["c_top_cut.png"]
    pad = top["padding"]["top"]
    assert pad == -top["crop_box"][1] > 0 and sum(top["padding"].values()) == pad
    assert top["padded_fraction"] == pytest.approx(pad / (top["crop_box"][3] - top["crop_box"][1]))
    _, h, _, (cx, cy, r), _ = KEPT["c_top_cut.png"]
    assert top["iris_outside"] == pytest.approx(disk_outside_fraction(cx, cy, r, 320, h), abs=0.005)
    assert 0.005 < top["iris_outside"] < 0.1


def test_rejects_name_the_reason(prepared):
    with open(prepared / "rejects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"]: r["reason"] for r in rows} == REJECTED
    assert all(r["detail"] for r in rows)
    summary = json.loads((prepared / "summary.json").read_text())
    assert summary["frames"] == len(KEPT) + len(REJECTED) and summary["kept"] == len(KEPT)
    assert {k: v for k, v in summary["rejects"].items() if v} == {reason: 1 for reason in REJECTED.values()}
    assert summary["rejects"]["occluded"] == 0 and summary["config"]["size"] == SIZE
    assert summary["seconds"] > 0 and summary["frames_per_second"] > 0 and summary["bits"] == 16


def test_the_cache_holds_images_labels_and_settings(prepared):
    with np.load(prepared / "dataset.npz", allow_pickle=False) as npz:
        images, labels, config = npz["images"], json.loads(str(npz["labels"])), json.loads(str(npz["config"]))
    assert labels == json.loads((prepared / "labels.json").read_text())
    assert images.shape == (len(KEPT), 1, SIZE, SIZE) and images.dtype == np.uint16  # one frame was 16-bit
    for i, lab in enumerate(labels):
        png = cv2.imread(str(prepared / lab["file"]), cv2.IMREAD_UNCHANGED)
        expected = png if png.dtype == np.uint16 else png.astype(np.uint16) * 257
        np.testing.assert_array_equal(images[i, 0], expected, err_msg=lab["file"])
    sixteen = cv2.imread(str(prepared / labels[3]["file"]), cv2.IMREAD_UNCHANGED)
    assert np.count_nonzero(sixteen % 257) > 0.5 * sixteen.size  # real 16-bit levels, not 8-bit ones scaled
    assert config == {k: v for k, v in vars(PrepareConfig()).items() if k != "workers"}


def test_cut_off_fraction_matches_brute_force():
    rng = np.random.default_rng(3)
    circles = [(30.0, 100.0, 50.0), (-10.0, -10.0, 40.0), (310.0, 230.0, 60.0), (160.0, 120.0, 200.0),
               (5.0, 120.0, 130.0), *(tuple(v) for v in rng.uniform([-40, -40, 5], [360, 280, 120], (6, 3)))]
    for cx, cy, r in circles:
        n = 3000  # sample points on a fine grid over the circle's bounding box
        xs = cx - r + (np.arange(n) + 0.5) * 2 * r / n
        ys = cy - r + (np.arange(n) + 0.5) * 2 * r / n
        disk = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 <= r * r
        inside = ((xs >= -0.5) & (xs <= 319.5))[None, :] & ((ys >= -0.5) & (ys <= 239.5))[:, None]
        brute = 1 - np.count_nonzero(disk & inside) / np.count_nonzero(disk)
        assert disk_outside_fraction(cx, cy, r, 320, 240) == pytest.approx(brute, abs=2e-3), (cx, cy, r)
    assert disk_outside_fraction(160, 120, 50, 320, 240) == 0.0
    assert disk_outside_fraction(500, 120, 50, 320, 240) == 1.0


def test_reflect_padding_matches_numpy_at_any_distance():
    for n in (1, 2, 5):
        for start, length in ((-7, 20), (0, n), (-1, 3), (n - 2, 2 * n + 3)):
            expected = np.pad(np.arange(n), (max(0, -start) + 3 * n, 3 * n + start + length), mode="reflect")
            got = reflect_indices(start, length, n)
            offset = max(0, -start) + 3 * n + start
            np.testing.assert_array_equal(got, expected[offset : offset + length])
    frame = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    padded = np.pad(frame, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(crop_square(frame, CropBox(-3, -2, 8)), padded[2:10, 1:9])


def test_workers_give_the_same_dataset(frames, prepared, tmp_path, capsys):
    code, out, _ = run([frames, tmp_path / "two", "--workers", 2], capsys)
    assert code == 0
    assert (tmp_path / "two" / "dataset.npz").read_bytes() == (prepared / "dataset.npz").read_bytes()
    assert (tmp_path / "two" / "labels.json").read_text() == (prepared / "labels.json").read_text()
    assert out.startswith(f"kept {len(KEPT)} of {len(KEPT) + len(REJECTED)} frames; rejected: unreadable 1, "
                          "too small 1, no pupil 1, no limbus 1, iris cut by frame 1; ")
    assert "frames/s)" in out and f"wrote {tmp_path / 'two'}/ (images/" in out


def test_flags_and_settings(frames, tmp_path, capsys):
    code, _, _ = run([frames, tmp_path / "o", "--workers", 1, "--size", 48, "--margin", 1.5,
                      "--set", "prepare.channels=3", "--set", "prepare.max_iris_outside=0.5"], capsys)
    assert code == 0
    cache = read_cache(tmp_path / "o" / "dataset.npz")
    assert cache.images.shape == (len(KEPT) + 1, 3, 48, 48)  # the cut frame passes a laxer limit
    assert cache.config["margin"] == 1.5 and cache.config["channels"] == 3
    for lab in cache.labels:
        assert lab["iris"][2] == pytest.approx(48 / (2 * 1.5), rel=0.03)
    rgb = cv2.imread(str(tmp_path / "o" / cache.labels[4]["file"]), cv2.IMREAD_UNCHANGED)
    assert rgb.shape == (48, 48, 3) and (rgb[:, :, 0] != rgb[:, :, 2]).any()  # the RGB frame stays in colour


def test_an_occluded_iris_is_rejected_and_an_unmeasured_one_kept(monkeypatch):
    import pipeline.prepare as prepare

    frame = eye_frame(320, 240, *KEPT["a_centre.png"][2:4])
    measure = prepare.analyze_with_geometry
    for usable, kept in ((0.2, False), (0.8, True), (math.nan, True)):
        def with_usable(img, cfg, usable=usable):
            metrics, geometry = measure(img, cfg)
            return {**metrics, "usable_iris_area": usable, "margin_adequacy": 0.9}, geometry

        monkeypatch.setattr(prepare, "analyze_with_geometry", with_usable)
        if kept:
            crop, label = prepare_frame(frame, PrepareConfig(), CircularityConfig())
            assert crop.shape == (1, SIZE, SIZE) and label["margin_adequacy"] == 0.9
            assert ("usable_iris_area" in label) == (usable == usable)  # NaN is left out
        else:
            with pytest.raises(Rejected) as exc:
                prepare_frame(frame, PrepareConfig(), CircularityConfig())
            assert exc.value.reason == "occluded" and "0.200 < 0.5" in exc.value.detail


def test_bad_input_exits_2_with_one_line_and_no_output(frames, prepared, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames here")
    cases = [
        ([tmp_path / "missing", tmp_path / "o"], "folder not found"),
        ([frames / "a_centre.png", tmp_path / "o"], "not a folder"),
        ([empty, tmp_path / "o"], "no images in"),
        ([frames, prepared], "already exists; pass --overwrite"),
        ([frames, tmp_path / "o", "--size", 4], "prepare.size must be >= 8"),
        ([frames, tmp_path / "o", "--margin", 0.8], "prepare.margin"),
        ([frames, tmp_path / "o", "--workers", -1], "workers must be"),
        ([frames, tmp_path / "o", "--set", "prepare.nope=1"], "unknown config key 'prepare.nope'"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, message in cases:
        code, _, err = run(argv, capsys)
        lines = err.replace("\r", "\n").strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and message in lines[-1], (argv, err)
        assert not any(line.startswith("Traceback") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp folder left
    assert (prepared / "dataset.npz").is_file()


def test_nothing_kept_writes_the_rejects_and_exits_2(tmp_path, capsys):
    src = tmp_path / "src"
    out = src / "prepared"  # inside the source: never read back as frames
    write(src / "blank.png", np.full((240, 320), 200, np.uint8))
    write(src / "small.png", np.zeros((30, 40), np.uint8))
    code, stdout, err = run([src, out], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"error: no frame kept of 2; see {out / 'rejects.csv'}"
    assert stdout.startswith("kept 0 of 2 frames; rejected: too small 1, no pupil 1;")
    assert sorted(p.name for p in out.iterdir()) == ["rejects.csv", "summary.json"]
    # --overwrite replaces a finished output whole; the output's own crops are not taken for frames.
    write(src / "eye.png", eye_frame(320, 240, *KEPT["a_centre.png"][2:4]))
    for _ in range(2):
        code, stdout, _ = run([src, out, "--overwrite"], capsys)
        assert code == 0 and stdout.startswith("kept 1 of 3 frames;")
    assert len(read_cache(out / "dataset.npz").labels) == 1


def test_runs_as_a_module_with_help():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.prepare_data", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: prepare-data ")
    assert "SRC OUT" in done.stdout and "--overwrite" in done.stdout and "--margin" in done.stdout
    assert 'prepare-data = "pipeline.cli.prepare_data:main"' in (REPO / "pyproject.toml").read_text()


def test_data_path_takes_the_cache(prepared, tmp_path, caplog):
    with np.load(prepared / "dataset.npz", allow_pickle=False) as npz:
        expected = from_uint(npz["images"])
    for path in (prepared / "dataset.npz", prepared):
        with caplog.at_level("INFO"):
            images = load_image_array(DataConfig(path=str(path), image_size=SIZE, cache=False))
        np.testing.assert_array_equal(images, expected)
        assert "loaded 6 prepared images" in caplog.text and "resized" not in caplog.text
        caplog.clear()
    with caplog.at_level("INFO"):
        small = load_image_array(DataConfig(path=str(prepared), image_size=32, channels=3, cache=False))
    assert small.shape == (len(KEPT), 3, 32, 32) and small.dtype == np.float32
    assert "128x128x1 resized to 32x32x3 (area, grey→rgb (repeated))" in caplog.text
    np.testing.assert_allclose(small[:, 0].mean(axis=(1, 2)), expected[:, 0].mean(axis=(1, 2)), atol=2e-3)
    # The fingerprint follows the cache's bytes wherever it lies, whether named by folder or file.
    moved = tmp_path / "moved.npz"
    moved.write_bytes((prepared / "dataset.npz").read_bytes())
    prints = [dataset_fingerprint(DataConfig(path=str(p))) for p in (prepared, prepared / "dataset.npz", moved)]
    assert len({f["sha256"] for f in prints}) == 1 and {f["count"] for f in prints} == {len(KEPT)}
    cache = read_cache(moved)
    write_cache(tmp_path / "fewer.npz", cache.images[:5], cache.labels[:5], cache.config)
    fewer = dataset_fingerprint(DataConfig(path=str(tmp_path / "fewer.npz")))
    assert dataset_changes(prints[2], fewer) == [f"data.path {str(moved)!r} → {str(tmp_path / 'fewer.npz')!r}",
                                                 f"{len(KEPT)} → 5 images"]


def test_a_foreign_or_missing_cache_is_a_user_error(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    for name, message in (("other.npz", "not a prepare-data cache"), ("broken.npz", "cannot read"),
                          ("absent.npz", "data file not found")):
        with pytest.raises(UserError, match=message) as exc:
            load_image_array(DataConfig(path=str(tmp_path / name), cache=False))
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="not a prepare-data cache"):
        dataset_fingerprint(DataConfig(path=str(tmp_path / "other.npz")))


def test_trainers_take_the_prepared_data(prepared, tmp_path, one_torch_thread, caplog):
    """prepare-data → train-vae (data.path = the .npz) and train-diffusion (data.path = the folder,
    then --resume, which checks the cache's fingerprint) for a few steps on tiny models."""
    from pipeline.cli import train_diffusion, train_vae

    vae_sets = ["data.image_size=32", "vae.latent_dim=4", "vae.base_channels=4", "vae.channel_mult=[1, 2]",
                "vae.batch_size=4", "vae.val_fraction=0.2", "vae.kl_warmup_epochs=0", "vae.epochs=1"]
    argv = ["--out", str(tmp_path / "vae"), "--set", f"data.path={prepared / 'dataset.npz'}"]
    caplog.set_level("INFO")
    with pytest.raises(SystemExit) as exc:
        train_vae.main([*argv, *(a for s in vae_sets for a in ("--set", s))])
    assert exc.value.code == 0 and (tmp_path / "vae" / "vae.keras").is_file()

    diffusion_sets = ["data.image_size=16", "model.model_channels=16", "model.num_res_blocks=1",
                      "model.channel_mult=[1, 2]", "model.attention_resolutions=[]", "diffusion.steps=20", "diffusion.noise_schedule=cosine",
                      "train.batch_size=4", "train.max_steps=2", "train.save_every=2", "train.sample_every=100",
                      "train.stats_every=100", "train.sample_steps=2", "train.sample_count=2", "train.ema_rates=[0.9]",
                      f"data.path={prepared}"]
    run_dir = tmp_path / "diffusion"
    for extra in (["--out", str(run_dir)], ["--resume", str(run_dir), "--set", "train.max_steps=3"]):
        sets = diffusion_sets if extra[0] == "--out" else []
        with pytest.raises(SystemExit) as exc:
            train_diffusion.main([*extra, *(a for s in sets for a in ("--set", s)), "--device", "cpu"])
        assert exc.value.code == 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    loaded = f"loaded {len(KEPT)} prepared images from {prepared / 'dataset.npz'} (the cache, not its PNGs; "
    assert caplog.text.count(loaded) >= 2
    assert "128x128x1 resized to 32x32x1 (area)" in caplog.text and "resized to 16x16x1" in caplog.text
