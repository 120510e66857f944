"""`train-diffusion --resume` against the faults Colab users meet: a damaged newest checkpoint
(falls back to the newest complete one, bit-exact from there) and a dataset that changed under
the run (refused unless data.allow_change; the same files at another path are fine)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from guided_diffusion.training.checkpoint import load_for_inference
from pipeline.common.config import DataConfig
from pipeline.common.errors import UserError
from pipeline.common.files import sha256_file
from pipeline.data.fingerprint import dataset_changes, dataset_fingerprint
from tests.test_train_cli import run
from tests.test_train_cli import write_config as write_tiny_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the module's shared runs and its tests alike (same arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(folder: Path, **data) -> Path:
    """The tiny config of tests/test_train_cli.py with these `data` settings (no health probes)."""
    return write_tiny_config(folder, data=data, train={"stats_every": 100})


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
    assert not [r for r in caplog.records if "other kernels" in r.getMessage()]
    assert_same_checkpoint(ckpt(out, 9), ckpt(runs["straight"], 9))


def test_a_resume_whose_auto_settings_choose_other_kernels_says_so(runs, tmp_path, caplog):
    """precision / conv_algorithm `auto` are speed verdicts timed per machine: deleting their cache or
    another thread count can flip them between sessions, and the names in the config stay `auto`."""
    out = tmp_path / "run"
    shutil.copytree(runs["six"], out)
    path = ckpt(out, 6)
    state = torch.load(path / "state.pt", weights_only=True)
    now = state["resolved"]  # what this machine chose for the run's steps
    assert now["precision"] in ("fp32", "bf16") and now["conv_algorithm"] in ("direct", "winograd")
    other = {"precision": "bf16" if now["precision"] == "fp32" else "fp32",
             "conv_algorithm": "winograd" if now["conv_algorithm"] == "direct" else "direct"}
    torch.save({**state, "resolved": other}, path / "state.pt")  # as another session's verdicts would have saved
    hashes = json.loads((path / "hashes.json").read_text())
    (path / "hashes.json").write_text(json.dumps({**hashes, "state.pt": sha256_file(path / "state.pt")}))
    assert run("--resume", str(out), "--set", "train.max_steps=7") == 0
    said = [r.getMessage() for r in caplog.records if "other kernels" in r.getMessage()]
    assert said == [f"resuming: the checkpoint's steps ran with other kernels than these will (precision "
                    f"{other['precision']} → {now['precision']}; conv_algorithm {other['conv_algorithm']} → "
                    f"{now['conv_algorithm']}), so the run is not bit-exact from here; set train.precision / "
                    "model.conv_algorithm to the checkpoint's to keep it"]
    assert torch.load(ckpt(out, 7) / "state.pt", weights_only=True)["resolved"] == now


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


def test_sampling_a_damaged_run_fails_loudly_and_names_the_older_checkpoints(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["six"], out)
    flip_a_byte(ckpt(out, 6) / "ema_0.99.safetensors")
    with pytest.raises(UserError) as exc:
        load_for_inference(out)
    assert str(exc.value) == (f"checkpoint {ckpt(out, 6)} is corrupt or truncated (ema_0.99.safetensors: sha256 does "
                              f"not match hashes.json); older checkpoints of this run: step_0000003 (give one's "
                              f"folder, e.g. {ckpt(out, 3)}, to sample from it)")
    with pytest.raises(UserError, match=r"has no EMA rate 0.5 \(saved: 0.9, 0.99; 0 = raw weights\)$"):
        load_for_inference(out, ema_rate=0.5)  # not damage: no hint
    with pytest.raises(UserError, match=r"truncated \(ema_0.99.safetensors: sha256 does not match hashes.json\)$"):
        load_for_inference(ckpt(out, 6))  # a checkpoint named itself: no other to suggest
    assert load_for_inference(ckpt(out, 3))[2]["step"] == 3


# -------------------------------------------------------------------------------- the dataset


def write_pngs(folder: Path, n: int, seed: int = 0, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"eye_{i:03d}.png"), rng.integers(0, 256, (size, size), np.uint8))


def train_on_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A 3-step run on a folder of 24 PNGs: (run dir, data folder)."""
    data, out = tmp_path / "data", tmp_path / "run"
    write_pngs(data, 24)
    cfg = write_config(tmp_path, path=str(data))
    assert run("--config", str(cfg), "--out", str(out), "--set", "train.max_steps=3") == 0
    return out, data


CHANGES = {
    "one file added": (lambda d: write_pngs(d / "new", 1, seed=1), "24 → 25 images; added new/eye_000.png"),
    "one file replaced": (lambda d: write_pngs(d, 1, seed=2, size=20), "changed size eye_000.png"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_folder_is_refused_unless_allowed(tmp_path, capsys, caplog, change):
    out, data = train_on_folder(tmp_path)
    alter, named = CHANGES[change]
    alter(data)
    capsys.readouterr()
    assert run("--resume", str(out), "--set", "train.max_steps=4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot resume {out}: the dataset changed since step_0000003: ")
    assert named in err[0] and "data.allow_change=true" in err[0]
    assert run("--resume", str(out), "--set", "train.max_steps=4", "--set", "data.allow_change=true") == 0
    assert any("resuming on a changed dataset" in r.getMessage() and named in r.getMessage() for r in caplog.records)
    state = torch.load(ckpt(out, 4) / "state.pt", weights_only=True)
    assert state["num_images"] == state["dataset"]["count"] == (25 if "added" in change else 24)  # the new files
    # The permission is not remembered: the next change is refused again.
    write_pngs(data / "later", 1)
    assert run("--resume", str(out), "--set", "train.max_steps=5") == 2
    assert "added later/eye_000.png" in capsys.readouterr().err


def test_the_same_files_at_another_path_are_accepted(tmp_path, caplog):
    out, data = train_on_folder(tmp_path)
    moved = tmp_path / "local_copy"
    shutil.copytree(data, moved)
    shutil.rmtree(data)
    caplog.set_level(logging.INFO)
    assert run("--resume", str(out), "--set", "train.max_steps=4", "--set", f"data.path={moved}") == 0
    assert any(r.getMessage().startswith(f"data.path moved from {str(data)!r} to {str(moved)!r}: the same 24 image files")
               for r in caplog.records)


def test_a_changed_synthetic_set_is_refused_unless_allowed(runs, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    shutil.copytree(runs["six"], out)
    more = ("--set", "train.max_steps=7", "--set", "data.synthetic_count=32")
    assert run("--resume", str(out), *more) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.synthetic_count: 24 → 32" in err[0] and "data.allow_change=true" in err[0]
    assert run("--resume", str(out), *more, "--set", "data.allow_change=true") == 0
    assert any("resuming on a changed dataset (data.allow_change): 24 → 32 images" in r.getMessage()
               for r in caplog.records)
    state = torch.load(ckpt(out, 7) / "state.pt", weights_only=True)
    assert state["dataset"]["count"] == 32 and state["num_images"] == 32


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning(runs, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(runs["six"], out)
    for step in (3, 6):  # as an older version wrote them
        path = ckpt(out, step)
        state = torch.load(path / "state.pt", weights_only=True)
        del state["dataset"]
        torch.save(state, path / "state.pt")
        hashes = json.loads((path / "hashes.json").read_text())
        (path / "hashes.json").write_text(json.dumps({**hashes, "state.pt": sha256_file(path / "state.pt")}))
    assert run("--resume", str(out), "--set", "train.max_steps=7") == 0
    assert any("has no dataset fingerprint" in r.getMessage() for r in caplog.records)
    assert torch.load(ckpt(out, 7) / "state.pt", weights_only=True)["dataset"]["path"] == "synthetic"


# ------------------------------------------------------------------------------ fingerprints


def test_fingerprint_sees_names_and_sizes_not_times_or_place(tmp_path):
    write_pngs(tmp_path / "a", 5)
    first = dataset_fingerprint(DataConfig(path=str(tmp_path / "a")))
    assert first["count"] == 5 and first["files"].splitlines()[0].startswith("eye_000.png\t")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy)  # new mtimes
    moved = dataset_fingerprint(DataConfig(path=str(tmp_path / "b")))
    assert moved["sha256"] == first["sha256"] and dataset_changes(first, moved) == []
    for i in range(5, 10):
        write_pngs(tmp_path / "b" / f"more{i}", 1, seed=i)
    (tmp_path / "b" / "eye_004.png").unlink()
    grown = dataset_fingerprint(DataConfig(path=str(tmp_path / "b")))
    assert dataset_changes(first, grown) == [
        f"data.path {str(tmp_path / 'a')!r} → {str(tmp_path / 'b')!r}", "5 → 9 images",
        "added more5/eye_000.png, more6/eye_000.png, more7/eye_000.png and 2 more", "removed eye_004.png"]
    synthetic = dataset_fingerprint(DataConfig(synthetic_count=10, seed=1))
    assert dataset_changes(synthetic, dataset_fingerprint(DataConfig(synthetic_count=10, seed=2))) == [
        "synthetic seed 1 → 2"]
