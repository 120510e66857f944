"""A failed save (disk full, I/O error) and fp16 overflow steps in `train-diffusion`, in process:
the failure is injected into the checkpoint writers (or, where a private tmpfs can be mounted, a
real full disk), the overflow into the gradient under a real GradScaler on the CPU.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from fault_runs import (
    ENV,
    REPO,
    assert_same_training,
    command,
    in_process,
    latest,
    read_rows,
    write_config,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

from guided_diffusion.training import checkpoint, faults, loop, session
from guided_diffusion.training.checkpoint import load_training_checkpoint
from guided_diffusion.training.logs import LOG_FIELDS, CsvLog
from pipeline.common import files

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


def test_a_really_full_disk(tmp_path):
    """A 1.9 MiB disk of its own (a tmpfs in a private mount namespace): the first checkpoint fits,
    the second does not. The real writers' errors must be recognised as a full disk."""
    if not _can_mount_tmpfs():
        pytest.skip("needs unshare and a private tmpfs mount")
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
