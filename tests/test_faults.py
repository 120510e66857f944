"""Faults a Colab user meets while `train-diffusion` runs: SIGINT/SIGTERM (stop after the step,
checkpoint, exit 130/143, resume bit-exact), SIGKILL at any moment, a full disk at a save, and fp16
loss-scale overflow steps.

The signal tests run `train-diffusion` in subprocesses (one torch thread each) and time each signal
by the rows of log.csv (one per step, written as it goes); the disk and overflow tests run in
process, with the failure injected into the checkpoint writer or the gradient.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from guided_diffusion.training import checkpoint, faults, loop, session
from guided_diffusion.training.checkpoint import load_training_checkpoint
from guided_diffusion.training.logs import LOG_FIELDS, CsvLog
from pipeline.cli.train_diffusion import main
from pipeline.common import files

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
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


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli.train_diffusion", *args, "--device", "cpu"]


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


def interrupt(run_dir: Path, proc: subprocess.Popen, signum: int, at: int) -> int:
    """Send `signum` once the run has logged step `at`; check the clean stop; return its step."""
    wait_for_step(proc, run_dir, at)
    before = logged_steps(run_dir)
    proc.send_signal(signum)
    after = logged_steps(run_dir)
    code, err = finish(proc)
    name = signal.Signals(signum).name
    assert code == 128 + signum, err[-3000:]
    found = re.fullmatch(rf"interrupted by {name} after step (\d+): checkpoint (\S+); resume with "
                         rf"train-diffusion --resume {re.escape(str(run_dir))}", err.strip().splitlines()[-1])
    assert found, err[-2000:]
    stopped = int(found[1])
    assert before <= stopped <= after + 1  # the step the signal came in, finished
    assert found[2] == str(run_dir / "checkpoints" / f"step_{stopped:07d}")
    assert latest(run_dir) == f"step_{stopped:07d}" and logged_steps(run_dir) == stopped  # nothing after it
    assert leftovers(run_dir) == []
    return stopped


def test_sigint_then_sigterm_stop_after_the_step_save_and_resume_bit_exact(tmp_path):
    """Ctrl-C at one random step, `kill` at another after resuming: each stops after the step it came
    in, checkpointed; the run resumed to the end is the uninterrupted one, bit for bit."""
    rng, cfg = random.Random(0), write_config(tmp_path)
    reference, run_dir = tmp_path / "straight", tmp_path / "run"
    straight = start("--config", str(cfg), "--out", str(reference))  # alongside, one thread each
    first = interrupt(run_dir, start("--config", str(cfg), "--out", str(run_dir)), signal.SIGINT, rng.randint(2, 6))
    second = interrupt(run_dir, start("--resume", str(run_dir)), signal.SIGTERM, rng.randint(first + 1, STEPS - 8))
    assert first < second < STEPS
    run_to_end("--resume", str(run_dir))
    code, err = finish(straight)
    assert code == 0, err[-3000:]
    assert_same_training(reference, run_dir, STEPS)


@pytest.mark.slow
def test_six_signals_at_random_steps_then_bit_exact(tmp_path):
    """SIGINT or SIGTERM at six random steps of one run (the step just saved, or not), resumed each time."""
    steps, rng = 40, random.Random(6)
    cfg = write_config(tmp_path, max_steps=steps, save_every=4)
    reference, run_dir = tmp_path / "straight", tmp_path / "run"
    run_to_end("--config", str(cfg), "--out", str(reference))
    proc, stops = start("--config", str(cfg), "--out", str(run_dir)), []
    for left in range(5, -1, -1):  # signals still to come after this one
        first = stops[-1] + 1 if stops else 2
        at = rng.randint(first, max(first, steps - 8 - 4 * left))
        stops.append(interrupt(run_dir, proc, rng.choice([signal.SIGINT, signal.SIGTERM]), at))
        proc = start("--resume", str(run_dir))
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert len(set(stops)) == 6, stops
    assert_same_training(reference, run_dir, steps)


@pytest.mark.slow
def test_twenty_runs_killed_at_random_moments_resume_bit_exact(tmp_path):
    """SIGKILL at a random moment (in a step, a save, its fsync or the `latest` swap) of 20 runs that
    save every step; each resumed to the end must match the uninterrupted run bit for bit."""
    steps, rng = 6, random.Random(20)
    cfg = write_config(tmp_path, max_steps=steps, save_every=1)
    reference = tmp_path / "straight"
    run_to_end("--config", str(cfg), "--out", str(reference))
    restarted = missed = 0
    for i in range(20):
        run_dir = tmp_path / f"run{i}"
        proc = start("--config", str(cfg), "--out", str(run_dir))
        wait_for_step(proc, run_dir, rng.randint(1, steps - 1))
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        if finish(proc)[0] == 0:  # it finished first
            missed += 1
            continue
        if (run_dir / "checkpoints" / "latest").exists():
            run_to_end("--resume", str(run_dir))
        else:  # killed before its first checkpoint was complete: nothing to resume
            restarted += 1
            run_to_end("--config", str(cfg), "--out", str(run_dir), "--overwrite")
        assert_same_training(reference, run_dir, steps)
        assert leftovers(run_dir) == []
    assert restarted <= 5 and missed <= 3, (restarted, missed)


# ------------------------------------------------------------------------- DDP: one rank signalled


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes in /proc")
def test_ddp_ranks_stop_after_the_same_step_when_one_is_signalled(tmp_path):
    run_dir = tmp_path / "ddp"
    cfg = write_config(tmp_path, max_steps=40)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.cli.train_diffusion", "--device", "cpu", "--config", str(cfg), "--out", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, run_dir, 3)
    rank1 = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
    os.kill(rank1, signal.SIGTERM)  # rank 1 only: rank 0, which saves, learns of it from the all-reduce
    _, err = finish(proc)
    stops = re.findall(r"interrupted by SIGTERM after step (\d+): checkpoint (\S+);", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]
    stopped = int(stops[0][0])
    assert 3 <= stopped < 40 and latest(run_dir) == f"step_{stopped:07d}"
    assert logged_steps(run_dir) == stopped
    load_training_checkpoint(run_dir / "checkpoints" / latest(run_dir))


# ------------------------------------------------------------- a second signal during the save


def in_process(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "cpu"])
    return exc.value.code


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_during_the_save_leaves_the_last_checkpoint(tmp_path, monkeypatch, signum, code):
    cfg = write_config(tmp_path, max_steps=8, save_every=3)
    reference, run_dir = tmp_path / "straight", tmp_path / "run"
    assert in_process("--config", str(cfg), "--out", str(reference)) == 0

    draw, write = loop.draw_batch, checkpoint.save_file

    def first_signal(s, dist, step):
        if step == 4:  # in step 5: the run stops after it and saves step 5
            os.kill(os.getpid(), signum)
        return draw(s, dist, step)

    def slow_write(tensors, path, metadata=None):
        write(tensors, path, metadata=metadata)
        if "step_0000005" in path:  # the stop's save, half written: the user presses again
            os.kill(os.getpid(), signum)
            time.sleep(30)
            raise AssertionError("the second signal did not abort the save")

    monkeypatch.setattr(loop, "draw_batch", first_signal)
    monkeypatch.setattr(checkpoint, "save_file", slow_write)
    assert in_process("--config", str(cfg), "--out", str(run_dir)) == code
    monkeypatch.undo()
    assert latest(run_dir) == "step_0000003" and leftovers(run_dir) == []
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_0000003"]
    load_training_checkpoint(run_dir / "checkpoints" / "step_0000003")  # complete: every hash matches

    # Had the process died outright, the next save clears what it left.
    stale = run_dir / "checkpoints" / ".step_0000005.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert in_process("--resume", str(run_dir)) == 0
    assert leftovers(run_dir) == []
    assert_same_training(reference, run_dir, 8)


# ----------------------------------------------------------------------------- a full disk


def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class _FullDiskFile(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 1000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise _enospc(self.name)
        return super().write(data)


def fail_safetensors(monkeypatch, step: int, times: int = 1) -> None:
    """The EMA file of checkpoint `step` fails as safetensors reports a full disk, `times` times."""
    write, left = checkpoint.save_file, [times]

    def writer(tensors, path, metadata=None):
        if f"step_{step:07d}" in path and "ema_" in path and left[0]:
            left[0] -= 1
            Path(path).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        write(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", writer)


def fail_state_file(monkeypatch, step: int) -> None:
    """torch.save of checkpoint `step`'s state.pt meets a full disk (a RuntimeError, the OSError its context)."""
    def opener(path, mode="r", *args, **kwargs):
        if f"step_{step:07d}" in str(path):
            return _FullDiskFile(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", opener, raising=False)


def fail_latest_pointer(monkeypatch, step: int) -> None:
    """The checkpoint is complete, but syncing the new `latest` pointer fails (EIO)."""
    sync = files.fsync_file

    def fsync(path):
        if Path(path).name == ".latest.tmp" and Path(path).read_text().strip() == f"step_{step:07d}":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        sync(path)

    monkeypatch.setattr(files, "fsync_file", fsync)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("inject", "reason"), [(fail_safetensors, "No space left on device"),
                                                (fail_state_file, "No space left on device"),
                                                (fail_latest_pointer, "Input/output error")])
def test_a_failed_save_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, inject,
                                                                         reason):
    run_dir = tmp_path / "run"
    inject(monkeypatch, 6)
    assert in_process("--config", str(write_config(tmp_path, max_steps=9, save_every=3)), "--out", str(run_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then the error
    assert [line for line in err if line.startswith("error")] == err[-1:], err
    ckpts = run_dir / "checkpoints"
    found = re.fullmatch(
        rf"error: could not write checkpoint {re.escape(str(ckpts / 'step_0000006'))} \({reason}\): it needs about "
        rf"([\d.]+) (KiB|MiB), [\d.]+ [KMGT]?i?B is free there; the last complete checkpoint "
        rf"{re.escape(str(ckpts / 'step_0000003'))} is intact: free some space, then train-diffusion --resume "
        rf"{re.escape(str(run_dir))}", err[-1])
    assert found, err[-1]
    size = sum(p.stat().st_size for p in (ckpts / "step_0000003").iterdir())
    assert abs(float(found[1]) * (2**20 if found[2] == "MiB" else 2**10) - size) < 0.05 * size
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000003"]  # no temp files, no step 6
    assert latest(run_dir) == "step_0000003" and not list(run_dir.glob(".*.tmp"))
    load_training_checkpoint(ckpts / "step_0000003")
    monkeypatch.undo()
    assert in_process("--resume", str(run_dir)) == 0  # once there is room again
    assert latest(run_dir) == "step_0000009"


@pytest.mark.usefixtures("one_torch_thread")
def test_on_save_error_warn_trains_on_and_the_next_save_succeeds(tmp_path, caplog, monkeypatch):
    cfg = write_config(tmp_path, max_steps=9, save_every=3, keep_last=0, on_save_error="warn")
    reference, run_dir = tmp_path / "straight", tmp_path / "run"
    assert in_process("--config", str(cfg), "--out", str(reference)) == 0
    fail_safetensors(monkeypatch, 6)
    assert in_process("--config", str(cfg), "--out", str(run_dir)) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "could not write" in r.getMessage()]
    assert len(warned) == 1 and "No space left on device" in warned[0] and "the next save tries again" in warned[0]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000003", "step_0000009"]
    # A failed save changes nothing of the training: the weights are the uninterrupted run's.
    assert_same_training(reference, run_dir, 9)


@pytest.mark.usefixtures("one_torch_thread")
def test_on_save_error_warn_still_stops_when_the_last_save_fails(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    fail_safetensors(monkeypatch, 6)
    cfg = write_config(tmp_path, max_steps=6, save_every=3, on_save_error="warn")
    assert in_process("--config", str(cfg), "--out", str(run_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error")] == err[-1:]
    assert err[-1].startswith("error: could not write checkpoint") and "step_0000003 is intact" in err[-1]


def test_on_save_error_is_checked(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert in_process("--config", str(cfg), "--out", str(tmp_path / "run"), "--set", "train.on_save_error=retry") == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: train.on_save_error must be one of stop, warn, got 'retry'"


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--map-root-user", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a private tmpfs mount")
def test_a_really_full_disk(tmp_path):
    """A 1.9 MiB disk of its own (a tmpfs in a private mount namespace): the first checkpoint fits,
    the second does not. The real writers' errors must be recognised as a full disk."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    cfg = write_config(tmp_path, max_steps=6, save_every=3)
    train = " ".join(command("--config", str(cfg), "--out", str(disk / "run")))
    script = (f"mount -t tmpfs -o size=1900k tmpfs {disk} && cd {REPO} && {train}; echo rc=$?; "
              f"cp -a {disk}/run {copy}")
    proc = subprocess.run(["unshare", "-m", "--map-root-user", "sh", "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert "rc=2" in proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: could not write checkpoint \S+step_0000006 \(No space left on device\): it needs about "
                    r"[\d.]+ MiB, [\d.]+ KiB is free there; the last complete checkpoint \S+step_0000003 is intact",
                    last), last
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["latest", "step_0000003"]
    load_training_checkpoint(copy / "checkpoints" / "step_0000003")


# ------------------------------------------------------------------------- fp16 overflow steps


def test_is_overflow_needs_a_scaler_a_finite_loss_and_a_scale_above_one():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert faults.is_overflow(scaler, loss_finite=True)
    assert not faults.is_overflow(scaler, loss_finite=False)
    assert not faults.is_overflow(None, loss_finite=True)
    assert not faults.is_overflow(torch.amp.GradScaler("cpu", init_scale=1.0), loss_finite=True)


def inf_gradients(monkeypatch, steps: set[int], scale: float | None) -> None:
    """Make the gradient (not the loss) of the 1-based `steps` infinite; give the run a real
    GradScaler (on the CPU) starting at `scale`, or none."""
    current = {"done": 0}
    draw, create = loop.draw_batch, loop.create_model

    def counting_draw(s, dist, step):
        current["done"] = step + 1
        return draw(s, dist, step)

    def model_with_hook(cfg):
        model = create(cfg)
        first = next(model.parameters())
        first.register_hook(lambda g: g * float("inf") if current["done"] in steps else g)
        return model

    monkeypatch.setattr(loop, "draw_batch", counting_draw)
    monkeypatch.setattr(loop, "create_model", model_with_hook)
    if scale is not None:
        monkeypatch.setattr(session, "grad_scaler_for", lambda precision, device: torch.amp.GradScaler(
            "cpu", init_scale=scale))


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.usefixtures("one_torch_thread")
def test_fp16_overflow_steps_are_counted_apart_and_do_not_stop_the_run(tmp_path, monkeypatch):
    inf_gradients(monkeypatch, {2, 3, 4, 5}, scale=2.0**10)
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, max_steps=8, save_every=1, keep_last=0, max_bad_steps=3)
    assert in_process("--config", str(cfg), "--out", str(run_dir)) == 0  # 4 in a row, max_bad_steps 3
    rows = read_rows(run_dir)
    assert [int(r["overflow_steps"]) for r in rows] == [0, 1, 2, 3, 4, 4, 4, 4]
    assert all(r["bad_steps"] == "0" for r in rows)
    ck = run_dir / "checkpoints"
    state = torch.load(ck / "step_0000008" / "state.pt", weights_only=True)
    assert state["progress"]["overflow_steps"] == 4 and state["progress"]["bad_total"] == 0
    assert state["scaler"]["scale"] == 2.0**10 / 2**4  # halved by each overflow
    assert state["ema_num_updates"] == 4
    one, five = load_file(str(ck / "step_0000001" / "model.safetensors")), load_file(str(ck / "step_0000005" / "model.safetensors"))
    assert all(torch.equal(one[k], five[k]) for k in one)  # the overflow steps changed nothing
    # The count is part of the checkpoint: a resume goes on from it.
    assert in_process("--resume", str(run_dir), "--set", "train.max_steps=10") == 0
    assert [int(r["overflow_steps"]) for r in read_rows(run_dir)][-2:] == [4, 4]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("scale", [None, 1.0])
def test_non_finite_gradients_without_a_settling_scale_are_bad_steps(tmp_path, capsys, monkeypatch, scale):
    """No scaler (fp32, bf16), or a scale already down to 1: a non-finite gradient is a bad step, as ever."""
    inf_gradients(monkeypatch, {2, 3, 4, 5}, scale=scale)
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, max_steps=8, save_every=100, max_bad_steps=3)
    assert in_process("--config", str(cfg), "--out", str(run_dir)) == 2
    assert "training diverged: 3 non-finite steps in a row at step 4" in capsys.readouterr().err
    rows = read_rows(run_dir)
    assert [int(r["bad_steps"]) for r in rows] == [0, 1, 2, 3] and all(r["overflow_steps"] == "0" for r in rows)


def test_a_log_csv_of_an_older_version_gets_the_new_column_at_resume(tmp_path):
    """A run started before log.csv had `overflow_steps` resumes into today's columns."""
    path = tmp_path / "log.csv"
    old = [f for f in LOG_FIELDS if f != "overflow_steps"]
    path.write_text(",".join(old) + "\n" + "".join(f"{s},0,0.5,,,,,0.001,1.0,9.0,0\n" for s in (1, 2, 3)) + "4,0,0.")
    log = CsvLog(path, LOG_FIELDS, resume_step=2)
    log.write({"step": 3, "loss": 0.25, "bad_steps": 0, "overflow_steps": 1})
    log.close()
    rows = read_rows(tmp_path)
    assert list(rows[0]) == list(LOG_FIELDS)
    assert [(r["step"], r["loss"], r["overflow_steps"]) for r in rows] == [("1", "0.5", ""), ("2", "0.5", ""),
                                                                           ("3", "0.25", "1")]
