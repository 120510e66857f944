"""generate --format png|bmp|tiff and --bits 8|16 (issue 19): the same pixels in every file type,
16 bits only where the format has them, and every reader of a generate folder still finds the images.

The images come from conftest's untrained 32 px checkpoint seeded with synthetic irises at strength
0.5, so their pixels are varied (not clipped flat) and fine-grained enough to tell 16 from 8 bits.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.check.folder import read_image
from pipeline.cli import circularity_check
from pipeline.cli import generate as gen_cli
from pipeline.common.config import config_from_dict, dump_config, load_config
from pipeline.common.errors import UserError
from pipeline.common.images import write_image
from pipeline.data.synthetic import generate_irises
from pipeline.demo import write_summary_figure

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 3


@pytest.fixture(scope="module")
def priors(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("priors")
    for i, img in enumerate(generate_irises(N, 32, seed=5)[0]):
        write_image(folder / f"p{i}.png", img, bits=16)
    return folder


def _generate(run: Path, priors: Path, out: Path, *extra: str) -> int:
    with pytest.raises(SystemExit) as exc:
        gen_cli.main(["--from-images", str(priors), "--diffusion", str(run), "--n", str(N), "--steps", "5",
                      "--strength", "0.5", "--seed", "3", "--batch-size", "1", "--device", "cpu",
                      "--out", str(out), *extra])
    return exc.value.code


def _pixels(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def test_bmp_and_tiff_hold_exactly_the_png_pixels(tiny_run, priors, tmp_path):
    for fmt in ("png", "bmp", "tiff"):
        assert _generate(tiny_run, priors, tmp_path / fmt, "--format", fmt, "--save-priors") == 0
    for fmt, suffix in (("bmp", ".bmp"), ("tiff", ".tif")):
        out = tmp_path / fmt
        names = [f"{i:06d}{suffix}" for i in range(N)]
        assert sorted(p.name for p in out.iterdir() if p.is_file()) == [*names, "grid.png", "metadata.json"]
        assert sorted(p.name for p in (out / "priors").iterdir()) == names
        for i, name in enumerate(names):
            for sub in ("", "priors"):
                png = _pixels(tmp_path / "png" / sub / f"{i:06d}.png")
                got = _pixels(out / sub / name)
                assert got.dtype == np.uint8 and png.dtype == np.uint8 and got.shape == png.shape == (32, 32)
                np.testing.assert_array_equal(got, png)
        assert (out / "grid.png").read_bytes() == (tmp_path / "png" / "grid.png").read_bytes()
        meta = json.loads((out / "metadata.json").read_text())
        assert (meta["format"], meta["bits"]) == (fmt, 8) and meta["config"]["generate"]["format"] == fmt
    assert len(np.unique(_pixels(tmp_path / "png" / "000000.png"))) > 50  # varied pixels, not a flat or clipped image


def test_16_bit_tiff_equals_16_bit_png_and_png16_still_works(tiny_run, priors, tmp_path):
    assert _generate(tiny_run, priors, tmp_path / "png16", "--bits", "16") == 0
    assert _generate(tiny_run, priors, tmp_path / "tif16", "--format", "tiff", "--bits", "16") == 0
    assert _generate(tiny_run, priors, tmp_path / "alias", "--png16") == 0  # deprecated spelling of --bits 16
    for i in range(N):
        png, tif = _pixels(tmp_path / "png16" / f"{i:06d}.png"), _pixels(tmp_path / "tif16" / f"{i:06d}.tif")
        assert png.dtype == tif.dtype == np.uint16
        np.testing.assert_array_equal(tif, png)
        assert np.any(png % 257)  # true 16-bit values, not 8-bit ones widened
        assert (tmp_path / "alias" / f"{i:06d}.png").read_bytes() == (tmp_path / "png16" / f"{i:06d}.png").read_bytes()
    meta = json.loads((tmp_path / "tif16" / "metadata.json").read_text())
    assert (meta["format"], meta["bits"]) == ("tiff", 16)
    assert json.loads((tmp_path / "alias" / "metadata.json").read_text())["bits"] == 16


@pytest.mark.parametrize("extra, message", [
    (["--format", "bmp", "--bits", "16"], "--bits 16 needs --format png or tiff: BMP has no 16-bit grey"),
    (["--format", "bmp", "--png16"], "BMP has no 16-bit grey"),
    (["--set", "generate.format=bmp", "--set", "generate.bits=16"], "BMP has no 16-bit grey"),
    (["--format", "gif"], "--format must be one of png, bmp, tiff, got 'gif'"),
    (["--bits", "12"], "--bits must be 8 or 16, got 12"),
])
def test_impossible_format_exits_2_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    # the checkpoint does not exist: the format error comes first, before anything is loaded or made
    assert _generate(tmp_path / "no-checkpoint", tmp_path, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_circularity_check_measures_the_bmp_images_only(tiny_run, priors, tmp_path):
    out = tmp_path / "bmp"
    assert _generate(tiny_run, priors, out, "--format", "bmp", "--save-priors") == 0
    with pytest.raises(SystemExit) as exc:
        circularity_check.main([str(out), "--out", str(tmp_path / "check"), "--workers", "1"])
    assert exc.value.code == 0
    with open(tmp_path / "check" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [f"{i:06d}.bmp" for i in range(N)]  # not grid.png, not priors/
    assert json.loads((tmp_path / "check" / "summary.json").read_text())["n_analysed"] == N


def test_index_remake_writes_the_recorded_format(tiny_run, priors, tmp_path):
    out = tmp_path / "run"
    assert _generate(tiny_run, priors, out, "--format", "tiff") == 0
    first = _pixels(out / "000001.tif")
    assert _generate(tiny_run, priors, out, "--format", "tiff", "--index", "1", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["000001.tif", "grid.png", "metadata.json"]
    np.testing.assert_array_equal(_pixels(out / "000001.tif"), first)
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["format"], meta["bits"], meta["indices"]) == ("tiff", 8, [1])


def test_rgb_keeps_its_channel_order_in_every_format(tmp_path):
    rgb = generate_irises(1, 32, seed=1, channels=3)[0][0]
    rgb[0, :4, :4], rgb[2, :4, :4] = 1.0, -1.0  # a red corner, so a swapped R and B would show
    for bits, suffixes in ((8, (".png", ".bmp", ".tif")), (16, (".png", ".tif"))):
        files = [tmp_path / f"rgb{bits}{s}" for s in suffixes]
        for path in files:
            write_image(path, rgb, bits=bits)
        decoded = [read_image(path) for path in files]  # RGB order, as circularity-check reads them
        assert decoded[0][0, 0, 0] == 2**bits - 1 and decoded[0][0, 0, 2] == 0
        for other in decoded[1:]:
            np.testing.assert_array_equal(other, decoded[0])
    with pytest.raises(UserError, match="cannot hold 16-bit pixels"):
        write_image(tmp_path / "deep.bmp", rgb, bits=16)
    assert not list(tmp_path.glob("*deep*"))


@pytest.mark.parametrize("saved, bits", [
    ({"png16": True}, 16),
    ({"png16": False}, 8),
    ({"png16": True, "bits": 8}, 8),  # an explicit bits wins
    ({"png16": False, "format": "tiff", "bits": 16}, 16),
])
def test_configs_saved_with_png16_still_load(tmp_path, saved, bits):
    """Checkpoints (and generate/demo outputs) saved before issue 19 hold generate.png16, and their
    config.yaml is re-read strictly (resume, generate's checkpoint loading)."""
    old = dump_config(config_from_dict({})).replace("  format: png\n  bits: 8\n", "")
    assert "format:" not in old
    path = tmp_path / "config.yaml"
    path.write_text(old.replace("generate:\n", "generate:\n" + "".join(f"  {k}: {json.dumps(v)}\n"
                                                                      for k, v in saved.items())))
    cfg = load_config(path)
    assert cfg.generate.bits == bits and cfg.generate.format == saved.get("format", "png")
    assert "png16" not in dump_config(cfg)
    with pytest.raises(UserError, match="generate.png16"):
        config_from_dict({"generate": {"png16": "maybe"}})


def test_demo_reads_its_samples_in_the_recorded_format(tmp_path):
    img = generate_irises(1, 16, seed=0)[0][0]
    for folder in ("from_vae/priors", "from_vae", "from_noise"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            write_image(tmp_path / folder / f"{i:06d}.bmp", img)
    for folder in ("from_vae", "from_noise"):
        (tmp_path / folder / "metadata.json").write_text(json.dumps({"format": "bmp", "bits": 8}))
    summary = write_summary_figure(tmp_path, 2, 16, 1)
    assert _pixels(summary).shape[0] > 0
