"""What the fault tests share: a tiny config, `train-diffusion` as a subprocess or in process, and
the checks of a run directory (latest checkpoint, leftover temp files, bit-identical training)."""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cli.train_diffusion import main
from tests.test_train_processes import ENV, REPO, command

STEPS = 20

# Tiny enough that a step takes a few hundredths of a second; dropout and the loss-aware sampler
# make the exact continuation depend on every RNG and sampler state being restored.
CONFIG = {
    "data": {"image_size": 16, "synthetic_count": 16},
    "model": {"model_channels": 8, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [],
              "num_head_channels": 8, "dropout": 0.1},
    "diffusion": {"steps": 10, "noise_schedule": "cosine", "timestep_sampler": "loss_aware"},
    "train": {"batch_size": 4, "lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 3, "max_steps": STEPS,
              "ema_rates": [0.99, 0.9], "log_every": 1, "save_every": 1000, "sample_every": 1000,
              "stats_every": 7, "keep_last": 2, "sample_count": 2, "sample_steps": 3},
}


def write_config(directory: Path, **train) -> Path:
    cfg = {k: dict(v) for k, v in CONFIG.items()}
    cfg["train"].update(train)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(command(*args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def run_to_end(*args: str) -> None:
    code, err = finish(start(*args))
    assert code == 0, err[-3000:]


def logged_steps(run_dir: Path) -> int:
    """The complete rows of log.csv (one per step with log_every 1)."""
    try:
        text = (run_dir / "log.csv").read_text()
    except FileNotFoundError:
        return 0
    return max(0, sum(1 for line in text.splitlines(keepends=True) if line.endswith("\n")) - 1)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while logged_steps(run_dir) < step:
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.monotonic() < deadline, f"no step {step} in time"
        time.sleep(0.005)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def leftovers(run_dir: Path) -> list[str]:
    """Temp files and directories of interrupted saves."""
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


def assert_same_training(a: Path, b: Path, step: int) -> None:
    """Bit-identical weights, EMAs, optimizer and sampler state and log rows at `step`."""
    ca, cb = (d / "checkpoints" / f"step_{step:07d}" for d in (a, b))
    names = sorted(p.name for p in ca.glob("*.safetensors"))
    assert names == sorted(p.name for p in cb.glob("*.safetensors")) and len(names) == 3
    for name in names:
        wa, wb = load_file(str(ca / name)), load_file(str(cb / name))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = (torch.load(c / "state.pt", weights_only=True) for c in (ca, cb))
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert torch.equal(sa["timestep_sampler"]["losses"], sb["timestep_sampler"]["losses"])
    assert sa["rng"]["torch_cpu"].equal(sb["rng"]["torch_cpu"])

    def rows(d: Path) -> list[dict]:
        with open(d / "log.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k != "it_s"} for r in csv.DictReader(f)]

    assert rows(a) == rows(b)


def in_process(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "cpu"])
    return exc.value.code


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))
