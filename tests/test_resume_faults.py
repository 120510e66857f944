"""`train-diffusion --resume` against the faults Colab users meet: a damaged newest checkpoint
falls back to the newest complete one, bit-exact from there."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cli.train_diffusion import main

TINY = {
    "data": {"image_size": 16, "synthetic_count": 24},
    "model": {"model_channels": 16, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [8],
              "num_head_channels": 16},
    "diffusion": {"steps": 50, "noise_schedule": "cosine"},
    "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 6, "ema_rates": [0.99, 0.9], "log_every": 1,
              "save_every": 3, "sample_every": 100, "stats_every": 100, "sample_count": 2, "sample_steps": 3},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the module's shared runs and its tests alike (same arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(folder: Path) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "cpu"])
    return exc.value.code


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Weights, EMAs and optimizer state bit for bit."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and len(names) == 3
    for name in names:
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa = torch.load(a / "state.pt", weights_only=True)["optimizer"]
    ob = torch.load(b / "state.pt", weights_only=True)["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in state.items())


# ------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 9-step run, and a 6-step one (checkpoints at 3 and 6) to damage and resume."""
    base = tmp_path_factory.mktemp("runs")
    cfg = write_config(base)
    assert run("--config", str(cfg), "--out", str(base / "straight"), "--set", "train.max_steps=9") == 0
    assert run("--config", str(cfg), "--out", str(base / "six")) == 0
    return {"straight": base / "straight", "six": base / "six"}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: safetensors still parses it, the hash does not match
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model": (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
    "flipped byte in an EMA": (lambda c: flip_a_byte(c / "ema_0.9.safetensors"),
                               "ema_0.9.safetensors: sha256 does not match hashes.json"),
    "deleted state.pt": (lambda c: (c / "state.pt").unlink(), "state.pt is missing"),
    "latest names a missing dir": (shutil.rmtree, "step_0000006 is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_ends_bit_identical(runs, tmp_path, caplog, damage):
    out = tmp_path / "run"
    shutil.copytree(runs["six"], out)
    harm, why = DAMAGE[damage]
    harm(ckpt(out, 6))
    assert run("--resume", str(out), "--set", "train.max_steps=9") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    fallback = [w for w in warnings if w.startswith(f"resuming from {ckpt(out, 3)}: the newer step_0000006 ")]
    assert len(fallback) == 1 and why in fallback[0] and "3 steps will be trained again" in fallback[0], warnings
    assert_same_checkpoint(ckpt(out, 9), ckpt(runs["straight"], 9))
    steps = [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 10))


def test_an_intact_run_resumes_without_a_fallback(runs, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(runs["six"], out)
    assert run("--resume", str(out), "--set", "train.max_steps=9") == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("resuming from")]
    assert_same_checkpoint(ckpt(out, 9), ckpt(runs["straight"], 9))


def test_every_checkpoint_damaged_is_a_one_line_error(runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs["six"], out)
    truncate(ckpt(out, 6) / "model.safetensors")
    (ckpt(out, 3) / "hashes.json").unlink()
    before = (out / "log.csv").read_text()
    assert run("--resume", str(out), "--set", "train.max_steps=9") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot resume {out}: no complete checkpoint (")
    assert "step_0000006 is corrupt or truncated (model.safetensors" in err[0]
    assert "step_0000003 is incomplete: hashes.json is missing" in err[0]
    assert (out / "log.csv").read_text() == before
