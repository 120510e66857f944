"""benchmarks/gpu_sweep.sh: its smoke size end to end (on the CPU when there is no GPU), with a
control model and a DDPM point, and its argument check."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_sweep.sh"


def _run(args: list[str], out: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=900)


def test_unknown_argument_is_one_error_line(tmp_path):
    result = _run(["--fast"], tmp_path / "out")
    assert result.returncode == 2 and result.stderr.strip() == "error: unknown argument --fast (use --smoke or nothing)"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smoke_run_writes_every_result(tmp_path):
    out = tmp_path / "out"
    result = _run(["--smoke"], out, CONFIG="configs/sweep-64.yaml", CONTROL="0.5", DDPM_STEPS="1000",
                  SMOKE_TRAIN_S="800")  # a cap a loaded CI machine cannot reach: the runs end by their steps
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    assert set(sweep["models"]) == {"clean", "defects"} and sweep["n"] == 6 and sweep["control_defects"] == 0.5
    labels = [r["label"] for r in sweep["models"]["clean"]]
    assert labels == ["noise DDIM 5", "noise DDPM 8", "VAE s=0", "VAE s=0.6", "VAE s=1"]
    with np.load(out / "sweep" / "images.npz") as images:
        assert len(images.files) == len(labels) + 4 and images["clean|VAE s=0.6"].shape == (6, 1, 32, 32)
    report = json.loads((out / "sweep" / "paired.json").read_text())
    assert ["clean|VAE s=0.6", "defects|VAE s=0.6"] in [[c["a"], c["b"]] for c in report["comparisons"]]
    with tarfile.open(out / "training.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"config.yaml", "sweep.md", "paired.md", "./diffusion/log.csv", "./control/log.csv", "./vae/log.csv"} <= names
    log = (out / "run.log").read_text()
    assert "training: diffusion exit 0, control exit 0" in log and "| clean | VAE s=0.6 |" in log
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8  # what a lent GPU machine sends back
