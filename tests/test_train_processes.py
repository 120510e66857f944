"""Resume after kill -9 is bit-exact; 2-process DDP on CPU: identical ranks, exact gradients.

These run `train-diffusion` in subprocesses (one torch thread each), like a user would.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from guided_diffusion.training.checkpoint import load_for_inference
from guided_diffusion.training.distributed import Dist
from guided_diffusion.training.factory import create_diffusion, create_model
from guided_diffusion.training.loop import params_sha256
from guided_diffusion.training.step import forward_backward
from pipeline.common.config import load_config
from pipeline.common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

CONFIG = {
    "data": {"image_size": 16, "synthetic_count": 40},
    "model": {"model_channels": 16, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [8],
              "num_head_channels": 16, "dropout": 0.1},
    # 10 steps so the loss-aware sampler leaves its uniform warm-up (10 losses per t) mid-run.
    "diffusion": {"steps": 10, "noise_schedule": "cosine", "timestep_sampler": "loss_aware"},
    "train": {"batch_size": 8, "lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 3, "max_steps": STEPS,
              "ema_rates": [0.99, 0.9], "log_every": 2, "save_every": 4, "sample_every": 8, "stats_every": 6,
              "keep_last": 2, "sample_count": 2, "sample_steps": 3},
}


def write_config(tmp_path: Path, **train) -> Path:
    cfg = {k: dict(v) for k, v in CONFIG.items()}
    cfg["train"].update(train)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli.train_diffusion", *args, "--device", "cpu"]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_files(run_dir: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    return {p.name: load_file(str(p)) for p in sorted(ckpt.glob("*.safetensors"))}


def log_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "it_s"} for row in csv.DictReader(f)]


def test_kill_9_and_resume_is_bit_exact(tmp_path):
    cfg = write_config(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run and the one to be killed run side by side (one thread each).
    whole = subprocess.Popen(command("--config", str(cfg), "--out", str(straight)), cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(command("--config", str(cfg), "--out", str(killed)), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere after the first checkpoint, not on it
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    stopped_at = int(latest.read_text().strip()[5:])
    assert 4 <= stopped_at < STEPS
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]

    run("--resume", str(killed))
    a, b = final_files(straight, STEPS), final_files(killed, STEPS)
    assert sorted(a) == ["ema_0.9.safetensors", "ema_0.99.safetensors", "model.safetensors"] == sorted(b)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    state_a, state_b = (torch.load(d / "checkpoints" / f"step_{STEPS:07d}" / "state.pt", weights_only=True)
                        for d in (straight, killed))
    for sa, sb in zip(state_a["optimizer"]["state"].values(), state_b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert torch.equal(state_a["timestep_sampler"]["losses"], state_b["timestep_sampler"]["losses"])
    assert state_a["timestep_sampler"]["counts"].min() == 10  # the sampler really became loss-aware
    assert log_rows(straight) == log_rows(killed)
    assert (straight / "stats.csv").read_text() == (killed / "stats.csv").read_text()


def _ddp(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.cli.train_diffusion", "--device", "cpu", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_ddp_run(out: Path, steps: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == steps
    digests = summary["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # each rank hashed its own weights
    model, _, info = load_for_inference(out, ema_rate=0)
    assert info["step"] == steps
    assert params_sha256(model) == digests[0]  # and the checkpoint holds those weights


def test_ddp_two_cpu_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    cfg = write_config(tmp_path, max_steps=6, save_every=3, sample_every=6, microbatch=2)
    proc = _ddp(tmp_path, out, "--config", str(cfg), "--out", str(out))
    assert "2 processes" in proc.stderr
    _check_ddp_run(out, 6)
    assert [int(r["step"]) for r in log_rows(out)] == [2, 4, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]


@pytest.mark.slow
def test_ddp_resume_continues(tmp_path):
    out = tmp_path / "ddp"
    cfg = write_config(tmp_path, max_steps=8)
    _ddp(tmp_path, out, "--config", str(cfg), "--out", str(out))
    _ddp(tmp_path, out, "--resume", str(out), "--set", "train.max_steps=12")
    _check_ddp_run(out, 12)


GRAD_MODEL = ["data.image_size=16", "model.model_channels=16", "model.num_res_blocks=1", "model.channel_mult=[1,2]",
              "model.attention_resolutions=[]", "diffusion.steps=50"]


def _model_and_batch():
    """The same perturbed tiny U-Net (so every parameter gets a gradient) and batch in every process."""
    torch.manual_seed(0)
    cfg = load_config(None, GRAD_MODEL)
    model, diffusion = create_model(cfg), create_diffusion(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(12, 1, 16, 16, generator=g) * 2 - 1
    batch = (x, torch.randint(0, 50, (12,), generator=g), torch.randn(x.shape, generator=g),
             torch.rand(12, generator=g) + 0.5)
    return model, diffusion, batch


def _ddp_gradient_worker(rank: int, port: int, result_dir: str) -> None:
    """One rank: DDP forward/backward of its half of the batch in micro-batches; save the synced grads."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, diffusion, (x, t, noise, w) = _model_and_batch()
    half = slice(rank * 6, rank * 6 + 6)
    net = torch.nn.parallel.DistributedDataParallel(model)
    forward_backward(net, diffusion, x[half], t[half], w[half], noise[half], microbatch=2)
    torch.save([p.grad for p in model.parameters()], Path(result_dir) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_ddp_micro_batched_gradient_equals_the_global_batch_gradient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_gradient_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    model, diffusion, (x, t, noise, w) = _model_and_batch()
    (w * diffusion.training_losses(model, x, t, noise=noise)["loss"]).mean().backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        got = torch.cat([g.flatten() for g in grads])
        assert float((got - reference).norm() / reference.norm()) <= 1e-5


def _from_main_worker(rank: int, port: int, result_dir: str) -> None:
    """One rank: each decides something of its own; from_main gives every rank rank 0's decision
    (only rank 0 decides), and rank 0's error."""
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    decided = []

    def decide() -> dict:
        decided.append(rank)
        return {"precision": "bf16" if rank == 0 else "fp32", "rank": rank}

    got = Dist(rank, 2, rank).from_main(decide)

    def refuse() -> None:
        raise UserError(f"rank {rank} refuses")

    try:
        Dist(rank, 2, rank).from_main(refuse)
        refused = None
    except UserError as exc:
        refused = str(exc)
    torch.save({"got": got, "decided": decided, "refused": refused}, Path(result_dir) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_ranks_take_rank_0s_speed_verdicts(tmp_path):
    """precision / conv_algorithm auto time a self-check per machine: two ranks that timed their own
    could pick different kernels near the margin; with from_main they take rank 0's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_from_main_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [r["got"] for r in results] == [{"precision": "bf16", "rank": 0}] * 2
    assert [r["decided"] for r in results] == [[0], []]
    assert [r["refused"] for r in results] == ["rank 0 refuses"] * 2  # rank 0's error on both, neither left waiting
    assert Dist().from_main(lambda: "alone") == "alone"
