"""`train-diffusion` end to end, in process: outputs, resume, NaN guard, bad input, loss going down."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from guided_diffusion.training import loop
from pipeline.cli.train_diffusion import main

TINY = {
    "data": {"image_size": 16, "synthetic_count": 24},
    "model": {"model_channels": 16, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [8],
              "num_head_channels": 16},
    "diffusion": {"steps": 50, "noise_schedule": "cosine"},
    "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 6, "ema_rates": [0.99, 0.9], "log_every": 1,
              "save_every": 3, "sample_every": 100, "stats_every": 2, "sample_count": 2, "sample_steps": 3},
}



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def write_config(tmp_path: Path, **sections) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "cpu"])
    return exc.value.code


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def weights(ckpt: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / name))


def test_run_writes_every_output_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("--config", str(write_config(tmp_path)), "--out", str(out)) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "trained to step 6" in stdout and "step_0000006" in stdout
    for name in ("config.yaml", "log.csv", "stats.csv", "loss.png", "summary.json", "samples/step_0000006.png"):
        assert (out / name).is_file(), name
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000003", "step_0000006"]
    files = sorted(p.name for p in (out / "checkpoints" / "step_0000006").iterdir())
    assert files == ["config.yaml", "ema_0.9.safetensors", "ema_0.99.safetensors", "hashes.json",
                     "model.safetensors", "state.pt"]
    rows = read_rows(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["lr"]) == 1e-3 and r["bad_steps"] == "0" and float(r["loss"]) > 0 for r in rows)
    stats = read_rows(out / "stats.csv")
    assert {r["step"] for r in stats} == {"2", "4", "6"}
    assert {"middle_block", "out", "input_blocks.1"} <= {r["block"] for r in stats}

    # Finished: resuming without a higher limit is refused; with one it continues where it stopped.
    assert run("--resume", str(out)) == 2
    assert "already trained 6 of 6 steps" in capsys.readouterr().err
    assert run("--resume", str(out), "--set", "train.max_steps=8") == 0
    assert [int(r["step"]) for r in read_rows(out / "log.csv")] == list(range(1, 9))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000008"


def test_nan_steps_are_skipped_counted_and_stop_the_run(tmp_path, capsys, monkeypatch):
    bad_steps = {3, 6, 7, 8}  # 1-based optimizer steps whose forward pass returns NaN
    seen = {"hooked": False, "forwards": 0}
    original = loop.create_model

    def poisoned_model(cfg):
        model = original(cfg)
        if not seen["hooked"]:  # only the training model, not the sampling copy
            def hook(module, args, output):
                seen["forwards"] += 1
                return output * float("nan") if seen["forwards"] in bad_steps else output
            model.register_forward_hook(hook)
            seen["hooked"] = True
        return model

    monkeypatch.setattr(loop, "create_model", poisoned_model)
    out = tmp_path / "run"
    cfg = write_config(tmp_path, train={"max_steps": 20, "max_bad_steps": 3, "save_every": 1, "keep_last": 0})
    assert run("--config", str(cfg), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training diverged: 3 non-finite steps in a row at step 8")
    assert str(out / "checkpoints" / "step_0000008") in err[-1]

    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_0000008"
    for name in ("model.safetensors", "ema_0.99.safetensors"):
        before, skipped = weights(ck / "step_0000002", name), weights(ck / "step_0000003", name)
        assert all(torch.equal(before[k], skipped[k]) for k in before)  # step 3 changed nothing
        good, stopped = weights(ck / "step_0000005", name), weights(ck / "step_0000008", name)
        assert all(torch.equal(good[k], stopped[k]) for k in good)  # nor did 6, 7, 8
        after = weights(ck / "step_0000004", name)
        assert any(not torch.equal(skipped[k], after[k]) for k in after)  # a good step does
    rows = read_rows(out / "log.csv")
    assert [int(r["bad_steps"]) for r in rows] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert rows[2]["loss"] == "" and rows[3]["loss"] != ""
    state = torch.load(ck / "step_0000008" / "state.pt", weights_only=True)
    assert state["ema_num_updates"] == 4 and state["progress"]["bad_in_row"] == 3


def test_bf16_autocast_and_micro_batches_on_cpu(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, train={"max_steps": 1, "precision": "bf16", "microbatch": 4, "save_every": 1})
    assert run("--config", str(cfg), "--out", str(out)) == 0
    rows = read_rows(out / "log.csv")
    assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"]))
    assert all(v.dtype == torch.float32 for v in weights(out / "checkpoints" / "step_0000001").values())


def test_channels_last_trains_saves_and_resumes(tmp_path):
    # model.channels_last once crashed at the first save: hashing a 1x1 convolution's weight, whose
    # channels_last strides count as contiguous, by viewing its bytes
    out = tmp_path / "run"
    cfg = write_config(tmp_path, model={"channels_last": True}, train={"max_steps": 2, "save_every": 2})
    assert run("--config", str(cfg), "--out", str(out)) == 0
    assert run("--resume", str(out), "--set", "train.max_steps=3") == 0
    assert [int(r["step"]) for r in read_rows(out / "log.csv")] == [1, 2, 3]


def _bad_folder(tmp_path: Path) -> str:
    empty = tmp_path / "empty_images"
    empty.mkdir(exist_ok=True)
    return str(empty)


@pytest.mark.parametrize("overrides, message", [
    (["train.microbatch=3"], "train.batch_size 8 is not divisible by train.microbatch 3"),
    (["train.microbatch=16"], "train.microbatch 16 is larger than the batch of 8"),
    (["train.lr_schedule=exponential"], "unknown train.lr_schedule 'exponential'"),
    (["train.lr_schedule=gear", "train.gear=[[0, 1e-3], [5, 1e-4], [2, 1e-5]]"], "must increase strictly"),
    (["train.max_steps=0", "train.epochs=0"], "set train.max_steps or train.epochs"),
    (["data.path=/no/such/folder"], "data folder not found: /no/such/folder"),
    (["data.path=EMPTY"], "is empty"),
    (["train.precision=fp16"], "fp16 needs a CUDA device"),
    # a bad setting is reported before the data is read (a slow folder never delays the mistake)
    (["train.microbatch=3", "data.path=/no/such/folder"], "not divisible by train.microbatch 3"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, overrides, message):
    overrides = [o.replace("EMPTY", _bad_folder(tmp_path)) for o in overrides]
    out = tmp_path / "run"
    sets = [a for o in overrides for a in ("--set", o)]
    assert run("--config", str(write_config(tmp_path)), "--out", str(out), *sets) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_is_not_touched_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("--config", str(write_config(tmp_path)), "--out", str(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_cuda_requested_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(write_config(tmp_path)), "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_bad_resumes_are_one_line_errors(tmp_path, capsys):
    cfg = write_config(tmp_path, train={"max_steps": 3})
    assert run("--resume", str(tmp_path / "missing")) == 2
    assert "run directory not found" in capsys.readouterr().err
    out = tmp_path / "run"
    assert run("--config", str(cfg), "--out", str(out)) == 0
    capsys.readouterr()
    assert run("--resume", str(out), "--set", "model.model_channels=32", "--set", "train.max_steps=5") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model.model_channels: 16 → 32" in err
    # A damaged checkpoint (state.pt cut short) is reported, and nothing is written.
    state = out / "checkpoints" / "step_0000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = (out / "log.csv").read_text()
    assert run("--resume", str(out), "--set", "train.max_steps=5") == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert (out / "log.csv").read_text() == before
    shutil.rmtree(out / "checkpoints")
    assert run("--resume", str(out), "--set", "train.max_steps=5") == 2
    assert "no checkpoint found" in capsys.readouterr().err


def _loss_ratio(out: Path, window: int) -> float:
    losses = np.array([float(r["loss"]) for r in read_rows(out / "log.csv")])
    return float(losses[-window:].mean() / losses[:window].mean())


def test_short_training_lowers_the_loss(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, data={"synthetic_count": 64},
                       train={"max_steps": 60, "lr": 2e-3, "save_every": 60, "stats_every": 60})
    assert run("--config", str(cfg), "--out", str(out)) == 0
    assert _loss_ratio(out, 10) <= 0.5


@pytest.mark.slow
def test_tiny_cpu_config_lowers_the_loss(tmp_path):
    out = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    assert run("--config", str(config), "--out", str(out), "--set", "train.max_steps=300",
               "--set", "train.log_every=10", "--set", "data.synthetic_count=256") == 0
    assert _loss_ratio(out, 3) <= 0.5
