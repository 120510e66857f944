"""`train-vae` under the faults Colab users meet: a resumed or extended learning-rate schedule,
SIGINT/SIGTERM (once: finish the step, save, exit 130/143; twice: abort at once), a failing save."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_vae_train import TINY_SETS

from pipeline.cli.train_vae import main

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # batches per epoch of the tiny runs: 32 training images (40, 20 % held out) in batches of 8


def _args(*sets: str) -> list[str]:
    return [a for s in (*TINY_SETS, *sets) for a in ("--set", s)]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `train-vae argv` run in this process."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def _load(path: Path):
    import keras

    return keras.saving.load_model(path, safe_mode=True)


def _position(path: Path) -> tuple[int, int]:
    """(finished epochs, optimizer steps) of a saved run."""
    model = _load(path)
    return int(model.trained_epochs.numpy()), int(model.optimizer.iterations.numpy())


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def _assert_same_weights(a: Path, b: Path) -> None:
    ma, mb = _load(a), _load(b)
    for x, y in zip([*ma.weights, *ma.optimizer.variables], [*mb.weights, *mb.optimizer.variables], strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), x.path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch tiny run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(run), *_args("vae.epochs=3")])
    assert exc.value.code == 0
    return run


def test_an_extended_run_follows_the_schedule_of_its_new_length(reference, tmp_path, capsys):
    """Planned for 2 epochs, extended to 3 on resume: the third epoch runs on the 3-epoch cosine,
    not at the 2-epoch schedule's floor (and log.csv shows each epoch's rate)."""
    run = tmp_path / "run"
    assert _run(["--out", str(run), *_args("vae.epochs=2")], capsys)[0] == 0
    assert _run(["--resume", str(run), "--set", "vae.epochs=3"], capsys)[0] == 0
    extended, planned = _load(run / "last.keras").optimizer, _load(reference / "last.keras").optimizer
    for step in range(2 * STEPS, 3 * STEPS):
        extended.iterations.assign(step)
        planned.iterations.assign(step)
        assert float(extended.learning_rate) == pytest.approx(float(planned.learning_rate), rel=1e-6), step
    lr = [float(r["lr"]) for r in _rows(reference)]
    assert lr[0] > lr[1] > lr[2] > 0
    assert float(_rows(run)[2]["lr"]) == pytest.approx(lr[2], rel=1e-6)


def _signal_after(monkeypatch, hook: str, when, signum: int = signal.SIGINT) -> None:
    """Send `signum` to this process from KLWarmup.`hook` (the first callback) when `when(model, arg)`."""
    from vae.callbacks import KLWarmup

    original = getattr(KLWarmup, hook)

    def send(self, arg, logs=None):
        original(self, arg, logs)
        if when(self.model, arg):
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(KLWarmup, hook, send)


@pytest.mark.slow  # ~40 s; the default run keeps the mid-epoch case / the failing checkpoint save
def test_an_interrupt_at_an_epoch_end_resumes_exactly(reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _signal_after(monkeypatch, "on_epoch_end", lambda model, epoch: epoch == 0)
    code, err = _run(["--out", str(run), *_args("vae.epochs=3")], capsys)
    assert code == 130 and str(run / "last.keras") in err and f"train-vae --resume {run}" in err, err
    assert _position(run / "last.keras") == (1, STEPS)
    monkeypatch.undo()
    assert _run(["--resume", str(run)], capsys)[0] == 0
    _assert_same_weights(run / "last.keras", reference / "last.keras")
    assert _rows(run) == _rows(reference)


def test_an_interrupt_mid_epoch_saves_that_step_and_resumes_exactly(reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _signal_after(monkeypatch, "on_train_batch_end",
                  lambda model, batch: int(model.optimizer.iterations.numpy()) == STEPS + 2)
    code, err = _run(["--out", str(run), *_args("vae.epochs=3")], capsys)
    assert code == 130 and str(run / "last.keras") in err and f"train-vae --resume {run}" in err, err
    assert _position(run / "last.keras") == (1, STEPS + 2)  # epoch 1 after its 2nd batch
    assert not list(run.glob(".*tmp*"))
    monkeypatch.undo()
    assert _run(["--resume", str(run)], capsys)[0] == 0
    _assert_same_weights(run / "last.keras", reference / "last.keras")
    rows, ref = _rows(run), _rows(reference)
    assert [rows[0], rows[2]] == [ref[0], ref[2]]
    # Epoch 1's row: validation and lr are of the same end-of-epoch model; its training means
    # cover only the batches run after the resume.
    assert {k: rows[1][k] for k in rows[1] if k.startswith("val_") or k == "lr"} == \
           {k: ref[1][k] for k in ref[1] if k.startswith("val_") or k == "lr"}


@pytest.mark.slow  # ~25 s; the default run has the diffusion trainer's second-signal test
def test_a_second_signal_aborts_at_once_and_keeps_the_last_complete_save(tmp_path, monkeypatch, capsys):
    """The second SIGINT lands while the first one's checkpoint is being written."""
    from vae.model import IrisVAE

    real_save = IrisVAE.save

    def save(self, path, *args, **kwargs):
        if int(self.optimizer.iterations.numpy()) % STEPS:  # the mid-epoch save of the interrupt
            Path(path).write_bytes(b"half a zip")
            os.kill(os.getpid(), signal.SIGINT)
        real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(IrisVAE, "save", save)
    _signal_after(monkeypatch, "on_train_batch_end",
                  lambda model, batch: int(model.optimizer.iterations.numpy()) == STEPS + 1)
    run = tmp_path / "run"
    code, err = _run(["--out", str(run), *_args("vae.epochs=3")], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    monkeypatch.undo()
    assert _position(run / "last.keras") == (1, STEPS)
    assert not list(run.glob(".*tmp*"))


def _full_disk(path) -> None:
    Path(path).write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow  # ~30 s; the default run has train-diffusion's injected-ENOSPC tests
def test_a_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """The disk fills while last.keras of epoch 1 is written: one line naming the sizes, the old file kept."""
    from vae.model import IrisVAE

    real_save = IrisVAE.save

    def save(self, path, *args, **kwargs):
        if int(self.trained_epochs.numpy()) == 2:
            _full_disk(path)
        real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(IrisVAE, "save", save)
    run = tmp_path / "run"
    code, err = _run(["--out", str(run), *_args("vae.epochs=3")], capsys)
    line = err.replace("\r", "\n").strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"error: cannot write {run / 'last.keras'}: No space left"), err
    assert " MB, " in line and " MB free" in line and "previous last.keras is kept" in line, line
    monkeypatch.undo()
    assert _position(run / "last.keras") == (1, STEPS)
    assert not list(run.glob(".*tmp*"))


@pytest.mark.slow  # ~40 s; the default run keeps the mid-epoch case / the failing checkpoint save
def test_a_full_disk_elsewhere_in_the_run_folder_is_one_line_too(tmp_path, monkeypatch, capsys):
    """The first write of an epoch's end is the sample grid: a full disk there is a one-line error too."""
    from vae import callbacks

    real_write = callbacks.write_image

    def write_image(path, image):
        if path.name == "epoch_001.png":
            _full_disk(path)
        real_write(path, image)

    monkeypatch.setattr(callbacks, "write_image", write_image)
    run = tmp_path / "run"
    code, err = _run(["--out", str(run), *_args("vae.epochs=3")], capsys)
    line = err.replace("\r", "\n").strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"error: cannot write in {run}: No space left"), err
    assert f"the last complete checkpoint is {run / 'last.keras'}" in line, line
    monkeypatch.undo()
    assert _position(run / "last.keras") == (1, STEPS)


def test_resume_refuses_a_changed_number_of_batches_per_epoch(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    code, err = _run(["--resume", str(run), "--set", "vae.epochs=4", "--set", "vae.batch_size=4"], capsys)
    assert code == 2 and "vae.batch_size" in err.strip().splitlines()[-1], err


@pytest.mark.slow  # ~30 s each: a real train-vae process; the default run signals train-diffusion's
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_command_stops_it_after_saving(reference, tmp_path, capsys, signum):
    """A real `train-vae` process, signalled once its first epoch's sample grid is written: exit 128 + signum, a whole
    last.keras where it says, and (checked once) a resume that ends on the uninterrupted weights."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "CI": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.train_vae", "--out", str(run),
                             *_args("vae.epochs=3")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "samples" / "epoch_000.png").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (out, err[-3000:])
    assert f"{run / 'last.keras'} holds the run at" in err, err[-3000:]
    epochs, steps = _position(run / "last.keras")
    assert 1 <= epochs < 3 and steps < 3 * STEPS
    assert not list(run.glob(".*tmp*"))
    if signum == signal.SIGINT:
        assert _run(["--resume", str(run)], capsys)[0] == 0
        _assert_same_weights(run / "last.keras", reference / "last.keras")


def test_a_log_without_the_lr_column_takes_it_on_resume(tmp_path):
    """A run from before the lr column, resumed: the new column joins the header, old rows leave it empty."""
    from vae.callbacks import read_log, write_log

    path = tmp_path / "log.csv"
    write_log(path, [{"epoch": "0", "loss": "2.0"}])
    write_log(path, [*read_log(path), {"epoch": "1", "loss": "1.0", "lr": "0.001"}])
    assert path.read_text().splitlines() == ["epoch,loss,lr", "0,2.0,", "1,1.0,0.001"]
