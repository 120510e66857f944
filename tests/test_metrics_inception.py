"""Real FID/KID through clean-fid (`pipeline.check.inception`, `--metrics inception`): our
preprocessing and extractor against clean-fid's own functions on a stand-in network (no real
weights: a tiny random TorchScript with the file's interface), our FID/KID against clean-fid's
formulas, and the CLIs' errors and labels. Nothing is downloaded."""

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.check.inception import WEIGHTS_NAME, InceptionFeatures, to_rgb_uint8
from pipeline.check.metrics import fid_from_features, kid
from pipeline.cli.circularity_check import main as circularity_check
from pipeline.common.images import write_image
from pipeline.data.synthetic import generate_irises

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import strength_sweep as sweep  # noqa: E402

TOL = 1e-5  # a wrong resize, no uint8 rounding or a [0, 1] range each move these features by > 5e-4


def _cleanfid():
    return pytest.importorskip("cleanfid.inception_torchscript", reason="clean-fid (the extra `metrics`) "
                               "is not installed: pip install -e '.[metrics]'")


class _StandIn(torch.nn.Module):
    """clean-fid's weights file's interface (`.layers`: (N, 3, 299, 299) normalised → 2048 values per
    image), with spatially resolved random features so that resizing differences show."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 9, stride=4), torch.nn.Tanh(),
                                          torch.nn.AdaptiveAvgPool2d(16))  # 8 × 16 × 16 = 2048

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    _cleanfid()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.jit.script(_StandIn()).save(str(path))
    return path


@pytest.fixture(scope="module")
def eyes(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Grey and RGB synthetic eyes in [-1, 1], and the same eyes written as 8-bit PNGs."""
    grey, _ = generate_irises(3, 128, seed=3)
    rgb, _ = generate_irises(2, 96, seed=4, channels=3)
    folder = tmp_path_factory.mktemp("eyes")
    files = []
    for i, img in enumerate([*grey, *rgb]):
        files.append(folder / f"e{i}.png")
        write_image(files[-1], img)
    return grey, rgb, files


def _cleanfid_features(weights: Path, files: list[Path]) -> np.ndarray:
    """clean-fid's own "clean" path for image files: `cleanfid.utils.ResizeDataset.__getitem__` (PIL
    read, convert("RGB"), build_resizer("clean"), float32 HWC → CHW as ToTensor does) into
    `InceptionV3W`. (cleanfid.utils imports torchvision, so its 4 lines are spelled out here.)"""
    from PIL import Image

    inception_torchscript = _cleanfid()
    from cleanfid.resize import build_resizer

    fn_resize = build_resizer("clean")
    batch = [torch.from_numpy(fn_resize(np.array(Image.open(f).convert("RGB"))).transpose(2, 0, 1).copy())
             for f in files]
    model = inception_torchscript.InceptionV3W(str(weights.parent), download=False)
    with torch.no_grad():
        return model(torch.stack(batch)).double().numpy()


def test_features_match_clean_fid(weights, eyes, tmp_path):
    grey, rgb, files = eyes
    ref = _cleanfid_features(weights, files)
    ours = InceptionFeatures(weights, batch_size=2)
    assert ours(grey).shape == (3, 2048)
    np.testing.assert_allclose(ours(grey), ref[:3], atol=TOL)  # in memory, [-1, 1] model output
    np.testing.assert_allclose(ours(rgb), ref[3:], atol=TOL)
    np.testing.assert_allclose(ours.from_files(files), ref, atol=TOL)  # the same eyes read back
    # A weights file under another name is found as well.
    renamed = tmp_path / "my_inception.pt"
    renamed.write_bytes(weights.read_bytes())
    np.testing.assert_allclose(InceptionFeatures(renamed)(grey), ref[:3], atol=TOL)
    # The comparison can fail: skipping the uint8 rounding, or resizing bilinearly (the old recipe),
    # moves these features by far more than TOL.
    from cleanfid.resize import build_resizer

    unrounded = np.repeat((grey + 1) * 127.5, 3, axis=1)  # (N, 3, H, W) float in [0, 255]
    resized = [build_resizer("clean")(img.transpose(1, 2, 0)).transpose(2, 0, 1).copy() for img in unrounded]
    with torch.no_grad():
        bilinear = torch.nn.functional.interpolate(torch.from_numpy(unrounded), size=(299, 299), mode="bilinear")
        for wrong in (torch.from_numpy(np.stack(resized)), bilinear):
            assert np.abs(ours._model(wrong).double().numpy() - ref[:3]).max() > 50 * TOL


def test_stored_pixels_become_rgb_uint8():
    grey16 = np.array([[0, 257 * 200, 65535]], np.uint16)
    assert to_rgb_uint8(grey16).tolist() == [[[0] * 3, [200] * 3, [255] * 3]]
    assert to_rgb_uint8(np.array([[0.0, 0.5, 1.0]])).tolist() == [[[0] * 3, [128] * 3, [255] * 3]]
    rgba = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(to_rgb_uint8(rgba), rgba[:, :, :3])


def _cleanfid_formulas() -> dict:
    """clean-fid's `frechet_distance`, `fid_from_feats` and `kernel_distance`, compiled from its own
    source (cleanfid.fid imports torchvision at module level, so it cannot be imported here)."""
    inception_torchscript = _cleanfid()
    import scipy.linalg

    source = Path(inception_torchscript.__file__).with_name("fid.py").read_text()
    wanted = {"frechet_distance", "fid_from_feats", "kernel_distance"}
    funcs = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {f.name for f in funcs} == wanted
    namespace = {"np": np, "linalg": scipy.linalg}
    exec(compile(ast.Module(funcs, type_ignores=[]), "cleanfid/fid.py", "exec"), namespace)
    return namespace


def test_fid_and_kid_match_clean_fid_formulas():
    lib = _cleanfid_formulas()
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((32, 32)) / 4
    f1 = rng.standard_normal((300, 32)) @ mix
    f2 = 1.3 * rng.standard_normal((300, 32)) @ mix + 0.2
    assert fid_from_features(f1, f2) == pytest.approx(lib["fid_from_feats"](f1, f2), rel=1e-6)
    assert fid_from_features(f1, f2) > 0.05  # not a comparison of two zeros
    # KID: with subsets holding every point, both are the whole-set unbiased MMD², whatever the order.
    ours = kid(f1, f2, subsets=1, subset_size=300)[0]
    assert ours == pytest.approx(lib["kernel_distance"](f1, f2, num_subsets=1, max_subset_size=300), rel=1e-9)
    assert ours > 1e-3


def _exit_code(fn, argv) -> int:
    with pytest.raises(SystemExit) as exc:
        fn([str(a) for a in argv])
    return exc.value.code


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_circularity_check_inception_errors(eyes, tmp_path, capsys, monkeypatch):
    folder = eyes[2][0].parent
    base = [folder, "--reference", folder, "--metrics", "inception", "--out", tmp_path / "o"]
    monkeypatch.setitem(sys.modules, "cleanfid.inception_torchscript", None)  # as if not installed
    assert _exit_code(circularity_check, base) == 2
    assert _error_line(capsys) == "error: --metrics inception needs clean-fid: pip install -e '.[metrics]'"
    monkeypatch.undo()
    _cleanfid()
    assert _exit_code(circularity_check, [*base, "--inception-weights", tmp_path / "missing.pt"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: Inception weights not found: {tmp_path / 'missing.pt'}") and "curl -L" in line
    import pipeline.check.inception as inception

    monkeypatch.setattr(inception, "library_cache", lambda: tmp_path / "cache" / WEIGHTS_NAME)
    assert _exit_code(circularity_check, base) == 2
    assert "clean-fid's cache" in _error_line(capsys)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert _exit_code(circularity_check, [*base, "--inception-weights", tmp_path / "junk.pt"]) == 2
    assert "cannot load" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_circularity_check_inception_run(weights, eyes, tmp_path, capsys):
    grey, _, files = eyes
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, img in enumerate(generate_irises(4, 128, seed=8)[0]):
        write_image(reference / f"r{i}.png", img)
    out = tmp_path / "cmp"
    argv = [files[0].parent, "--reference", reference, "--metrics", "inception", "--inception-weights", weights,
            "--out", out, "--workers", 1]
    assert _exit_code(circularity_check, argv) == 0
    printed = capsys.readouterr().out
    assert "on inception-v3 (clean-fid) features" in printed and "not Inception" in printed  # both, labelled
    dist = json.loads((out / "comparison.json").read_text())["distances"]
    assert dist["features"] == "inception-v3 (clean-fid)" and dist["inception_weights"] == str(weights)
    assert dist["fid"] > 0 and dist["proxy_fd"] > 0
    ours = InceptionFeatures(weights)  # the numbers are those of the stand-in's features of the two folders
    feats = ours.from_files(sorted(files)), ours.from_files(sorted(reference.glob("*.png")))
    assert dist["fid"] == pytest.approx(fid_from_features(*feats), rel=1e-9)
    assert dist["kid_mean"] == pytest.approx(kid(*feats, subsets=100, subset_size=1000)[0], rel=1e-9)


def test_strength_sweep_inception_errors(tmp_path, capsys):
    argv = ["--out", tmp_path / "sweep", "--inception-weights", tmp_path / "x.pt"]
    assert _exit_code(sweep.main, argv) == 2
    assert "--metrics inception" in _error_line(capsys)
    _cleanfid()
    assert _exit_code(sweep.main, [*argv, "--metrics", "inception"]) == 2  # before any training
    assert "Inception weights not found" in _error_line(capsys)
    assert not (tmp_path / "sweep").exists()
