"""iris-demo --serve without a browser: options and their one-line errors, the device choice, the
models named at the top of the page, and `render` on an explicitly given VAE + diffusion pair."""

import re
import shutil
import sys

import numpy as np
import pytest

from pipeline import serve
from pipeline.cli import demo as demo_cli
from pipeline.common.config import Config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _exit(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        demo_cli.main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture
def no_server(monkeypatch):
    """Record what `serve` would have been started with, instead of starting a server."""
    calls = []
    monkeypatch.setattr(serve, "serve", lambda cfg, models, device, **kw: calls.append((models, device, kw)))
    return calls


def test_render_with_explicit_pair(trained_pair):
    vae, diffusion = trained_pair
    models = serve.find_models(vae, diffusion, demo_dir="no-demo-here")
    grid, rows, summary = serve.render(Config(), models, strength=0.0, seed=3, n=2, steps=5)
    assert grid.dtype == np.uint8 and grid.ndim == 2
    assert [r[0] for r in rows] == [0, 1] and all(r[1] in ("pass", "fail") for r in rows)
    passed = sum(r[1] == "pass" for r in rows)
    assert re.fullmatch(rf"{passed} of 2 pass circularity-check \(strength 0, seed 3, 5 steps, cpu, [0-9.]+ s\)",
                        summary)
    scale = serve.TILE // 32
    left = grid[scale * 2 : scale * 34 : scale, scale * 2 : scale * 34 : scale]
    right = grid[scale * 2 : scale * 34 : scale, scale * 36 : scale * 68 : scale]
    np.testing.assert_array_equal(left, right)  # strength 0: the result is the prior
    moved, _, summary = serve.render(Config(), models, strength=0.6, seed=3, n=2, steps=5)
    assert not np.array_equal(moved, grid) and "(strength 0.6," in summary


def test_models_are_described(trained_pair):
    vae, diffusion = trained_pair
    models = serve.find_models(str(vae), str(diffusion), demo_dir="no-demo-here")
    assert models.checkpoint.name == "step_0000002" and models.steps_trained == 2 and models.timesteps == 100
    text = "\n".join(models.describe())
    assert f"VAE `{vae}`: 32x32 grey, latent dim 8" in text
    assert f"diffusion `{diffusion}` (checkpoint `step_0000002`): 32x32 grey, 2 steps trained, T = 100" in text
    assert "resized" not in text


def test_serve_takes_explicit_paths_host_port_share_device(trained_pair, no_server, capsys):
    vae, diffusion = trained_pair
    code, _ = _exit(["--serve", "--vae", str(vae), "--diffusion", str(diffusion), "--device", "cpu",
                     "--host", "0.0.0.0", "--port", "8080", "--share"], capsys)
    assert code == 0
    (models, device, kw), = no_server
    assert (models.vae, models.diffusion, device) == (vae, diffusion, "cpu")
    assert kw == {"host": "0.0.0.0", "port": 8080, "share": True}


def test_serve_defaults_and_demo_folder(trained_pair, no_server, tmp_path, capsys, monkeypatch):
    vae, diffusion = trained_pair
    demo = tmp_path / "demo"
    (demo / "vae").mkdir(parents=True)
    shutil.copy(vae, demo / "vae" / "vae.keras")
    shutil.copytree(diffusion, demo / "diffusion")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert _exit(["--serve", "--out", str(demo)], capsys)[0] == 0
    # --vae given: the diffusion run still comes from the demo folder
    assert _exit(["--serve", "--out", str(demo), "--vae", str(vae)], capsys)[0] == 0
    (first, device, kw), (second, _, _) = no_server
    assert first.vae == demo / "vae" / "vae.keras" and first.diffusion == demo / "diffusion"
    assert second.vae == vae and second.diffusion == demo / "diffusion"
    assert device == "cpu" and kw == {"host": "127.0.0.1", "port": 7860, "share": False}


def test_auto_device_is_cuda_when_torch_sees_a_gpu(monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    with caplog.at_level("INFO", logger="pipeline.serve"):
        assert serve.pick_device("auto") == "cuda"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert serve.pick_device("auto") == "cpu"
        assert serve.pick_device("cpu") == "cpu"
    assert caplog.messages == ["generating on cuda (Fake GPU)", "generating on cpu (no CUDA GPU found)",
                               "generating on cpu"]


def _bad_paths(tmp_path, vae, diffusion) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    not_zip = tmp_path / "fake.keras"
    not_zip.write_text("not a model")
    other = tmp_path / "weights.h5"
    other.write_text("x")
    return {
        "missing vae": (["--vae", str(tmp_path / "nope.keras"), "--diffusion", str(diffusion)],
                        f"VAE file not found: {tmp_path / 'nope.keras'}"),
        "vae not .keras": (["--vae", str(other), "--diffusion", str(diffusion)], "must be a .keras file"),
        "vae not a model": (["--vae", str(not_zip), "--diffusion", str(diffusion)], "is corrupt"),
        "diffusion without checkpoints": (["--vae", str(vae), "--diffusion", str(empty)],
                                          f"{empty} is not a diffusion run: no checkpoint found"),
        "diffusion missing": (["--vae", str(vae), "--diffusion", str(tmp_path / "gone")], "diffusion run not found"),
        "diffusion is a file": (["--vae", str(vae), "--diffusion", str(vae)], "is a file, not a train-diffusion run"),
        "no demo": (["--out", str(tmp_path / "nothing")], "run 'iris-demo --out"),
        "bad port": (["--vae", str(vae), "--diffusion", str(diffusion), "--port", "70000"], "--port must be in"),
        "bad device": (["--vae", str(vae), "--diffusion", str(diffusion), "--device", "tpu"], "unknown device 'tpu'"),
    }


def test_serve_errors_are_one_line_before_any_server(trained_pair, no_server, tmp_path, capsys):
    for name, (argv, message) in _bad_paths(tmp_path, *trained_pair).items():
        code, err = _exit(["--serve", *argv], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert message in err, (name, err)
    assert no_server == []


def test_cuda_asked_for_without_a_gpu(trained_pair, no_server, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    vae, diffusion = trained_pair
    code, err = _exit(["--serve", "--vae", str(vae), "--diffusion", str(diffusion), "--device", "cuda"], capsys)
    assert code == 2 and err == "error: device 'cuda' requested but CUDA is not available on this machine\n"
    assert no_server == []


def test_serve_options_need_serve(capsys):
    code, err = _exit(["--share", "--port", "8000"], capsys)
    assert (code, err) == (2, "error: --port, --share go with --serve\n")


def test_missing_gradio_is_one_line(trained_pair, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if Gradio were not installed
    vae, diffusion = trained_pair
    code, err = _exit(["--serve", "--vae", str(vae), "--diffusion", str(diffusion), "--device", "cpu"], capsys)
    assert code == 2 and "pip install gradio" in err and err.count("\n") == 1


def test_help_has_an_example_of_each_option(capsys):
    with pytest.raises(SystemExit) as exc:
        demo_cli.main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0
    for example in ("iris-demo --serve --vae runs/vae/vae.keras --diffusion runs/diffusion\n",
                    "--device cuda\n", "--share\n", "--host 0.0.0.0 --port 8080\n", "iris-demo --serve --out runs/demo "):
        assert example in text, example
