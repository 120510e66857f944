"""Any-size seeding (issue 18): priors of another size or channel count than the diffusion model.

`fit_priors` is checked against closed forms (block means, a linear ramp, BT.601 weights) and
cv2 called directly; the end-to-end tests seed a 32 px untrained diffusion checkpoint (conftest's
`tiny_run`; strength 0 returns the priors, so its weights do not matter) with a folder of 16 px PNGs.
"""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest

from pipeline import generate as gen_mod
from pipeline.cli import generate as gen_cli
from pipeline.common.config import config_from_dict
from pipeline.common.errors import UserError
from pipeline.common.images import write_image_uint
from pipeline.common.resize import fit_priors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rand(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ------------------------------------------------------------------------------------ fit_priors


def test_shrinking_by_two_is_the_2x2_block_mean():
    priors = _rand((2, 1, 128, 128))
    out, info = fit_priors(priors, (1, 64, 64))
    blocks = priors.reshape(2, 1, 64, 2, 64, 2).astype(np.float64).mean(axis=(3, 5))
    np.testing.assert_allclose(out, blocks, atol=1e-6)
    assert out.dtype == np.float32
    assert info == {"from": [1, 128, 128], "to": [1, 64, 64], "method": "area", "channels": "kept"}


def test_non_square_sides_are_judged_separately():
    priors = _rand((1, 1, 12, 18))
    out, info = fit_priors(priors, (1, 6, 6))  # both shrink: area, blocks of 2 x 3
    np.testing.assert_allclose(out, priors.reshape(1, 1, 6, 2, 6, 3).mean(axis=(3, 5)), atol=1e-6)
    assert info["method"] == "area"
    out, info = fit_priors(priors, (1, 6, 36))  # height shrinks, width grows: cubic
    assert out.shape == (1, 1, 6, 36) and info["method"] == "cubic"
    assert info["from"] == [1, 12, 18] and info["to"] == [1, 6, 36]


def test_enlarging_keeps_a_constant_and_stays_in_range():
    const = np.full((1, 1, 16, 16), 0.37, np.float32)
    out, info = fit_priors(const, (1, 40, 40))
    assert info["method"] == "cubic" and out.shape == (1, 1, 40, 40)
    np.testing.assert_allclose(out, 0.37, atol=1e-6)
    edges = np.where(np.indices((16, 16)).sum(axis=0) % 2 == 0, 1.0, -1.0).astype(np.float32)[None, None]
    out, _ = fit_priors(edges, (1, 48, 48))  # a checkerboard at ±1: cubic overshoots, the result may not
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.max() == 1.0 and out.min() == -1.0  # clipped, not rescaled


def test_enlarging_a_ramp_is_linear_inside():
    ramp = np.linspace(-0.9, 0.9, 16, dtype=np.float32)
    out, _ = fit_priors(np.tile(ramp, (16, 1))[None, None], (1, 32, 32))
    centres = (np.arange(32) + 0.5) / 2 - 0.5  # output pixel centres in input pixel coordinates
    step = ramp[1] - ramp[0]
    inside = slice(4, -4)
    for row in out[0, 0, 4:-4]:
        err = np.abs(row - np.interp(centres, np.arange(16), ramp))[inside]
        assert err.max() < 0.1 * step, err.max()  # nearest neighbour would be off by step / 4


def test_equal_size_returns_the_same_values():
    priors = _rand((3, 3, 20, 20))
    out, info = fit_priors(priors, (3, 20, 20))
    np.testing.assert_array_equal(out, priors)
    assert info == {"from": [3, 20, 20], "to": [3, 20, 20], "method": "none", "channels": "kept"}


def test_grey_to_rgb_repeats():
    grey = _rand((2, 1, 8, 8))
    out, info = fit_priors(grey, (3, 8, 8))
    assert out.shape == (2, 3, 8, 8) and info["channels"] == "grey→rgb (repeated)" and info["method"] == "none"
    for c in range(3):
        np.testing.assert_array_equal(out[:, c], grey[:, 0])
    small, _ = fit_priors(grey, (3, 4, 4))  # resized and repeated: every channel the grey block mean
    for c in range(3):
        np.testing.assert_allclose(small[:, c], grey[:, 0].reshape(2, 4, 2, 4, 2).mean(axis=(2, 4)), atol=1e-6)


def test_rgb_to_grey_is_bt601_luminance():
    rgb = _rand((2, 3, 8, 8))
    out, info = fit_priors(rgb, (1, 8, 8))
    assert out.shape == (2, 1, 8, 8) and info["channels"] == "rgb→grey (BT.601)"
    np.testing.assert_allclose(out[:, 0], 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2], atol=1e-6)


@pytest.mark.parametrize("have, want", [(1, 2), (3, 4), (2, 1), (4, 3)])
def test_other_channel_counts_are_user_errors(have, want):
    with pytest.raises(UserError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        fit_priors(_rand((1, have, 8, 8)), (want, 8, 8))


# ------------------------------------------------------------------------------------ end to end


def _write_folder(folder, sizes, seed=0) -> list[np.ndarray]:
    """8-bit grey PNGs of the given (H, W) sizes; returns their pixels as [-1, 1] floats."""
    folder.mkdir()
    rng, pixels = np.random.default_rng(seed), []
    for i, (h, w) in enumerate(sizes):
        u8 = rng.integers(0, 256, (h, w), dtype=np.uint8)
        write_image_uint(folder / f"p{i}.png", u8)
        pixels.append(u8.astype(np.float32) / 255 * 2 - 1)
    return pixels


def test_small_prior_folder_seeds_a_larger_model_exactly(tiny_run, tmp_path, caplog):
    native = np.stack(_write_folder(tmp_path / "priors", [(16, 16)] * 3))[:, None]  # (3, 1, 16, 16)
    cfg = config_from_dict({"generate": {"n": 3, "steps": 5, "strength": 0.0}})
    with caplog.at_level(logging.INFO, logger="pipeline.generate"):
        result = gen_mod.generate(cfg, tiny_run, source="images", images_dir=tmp_path / "priors", device="cpu",
                                  progress=False)
    assert result.images.shape == result.priors.shape == (3, 1, 32, 32)
    np.testing.assert_array_equal(result.images, fit_priors(native, (1, 32, 32))[0])
    by_cv2 = np.stack([np.clip(cv2.resize(img[0], (32, 32), interpolation=cv2.INTER_CUBIC), -1, 1) for img in native])
    np.testing.assert_allclose(result.images[:, 0], by_cv2, atol=1e-6)
    assert result.metadata["prior"]["resized"] == {"from": [1, 16, 16], "to": [1, 32, 32], "method": "cubic",
                                                   "channels": "kept"}
    assert "priors 16x16x1 resized to 32x32x1 (cubic)" in caplog.messages


def test_cli_records_the_resize_and_larger_folders_shrink(tiny_run, tmp_path):
    native = np.stack(_write_folder(tmp_path / "priors", [(64, 64)] * 2))[:, None]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        gen_cli.main(["--from-images", str(tmp_path / "priors"), "--diffusion", str(tiny_run), "--n", "2",
                      "--steps", "5", "--strength", "0", "--device", "cpu", "--out", str(out)])
    assert exc.value.code == 0
    resized = json.loads((out / "metadata.json").read_text())["prior"]["resized"]
    assert resized == {"from": [1, 64, 64], "to": [1, 32, 32], "method": "area", "channels": "kept"}
    written = cv2.imread(str(out / "000001.png"), cv2.IMREAD_UNCHANGED)
    blocks = native[1, 0].reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.abs(written.astype(np.float64) - (blocks + 1) / 2 * 255).max() <= 0.5 + 1e-3  # 8-bit rounding


def test_mixed_size_prior_folder_exits_2_and_writes_nothing(tiny_run, tmp_path, capsys):
    _write_folder(tmp_path / "priors", [(16, 16), (16, 16), (20, 24)])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        gen_cli.main(["--from-images", str(tmp_path / "priors"), "--diffusion", str(tiny_run), "--n", "3",
                      "--strength", "0", "--device", "cpu", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert "prior images must all have one size: p0.png is 16x16, p2.png is 24x20" in err[0]
    assert not out.exists()
