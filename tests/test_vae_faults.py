"""`train-vae` under the faults Colab users meet: a failing save."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from test_vae_train import TINY_SETS

from pipeline.cli.train_vae import main

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


def _full_disk(path) -> None:
    Path(path).write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


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


def test_a_full_disk_elsewhere_in_the_run_folder_is_one_line_too(tmp_path, monkeypatch, capsys):
    """The first write of an epoch's end is the sample grid: a full disk there is a one-line error too."""
    from vae import callbacks

    real_write = callbacks.write_png

    def write_png(path, image):
        if path.name == "epoch_001.png":
            _full_disk(path)
        real_write(path, image)

    monkeypatch.setattr(callbacks, "write_png", write_png)
    run = tmp_path / "run"
    code, err = _run(["--out", str(run), *_args("vae.epochs=3")], capsys)
    line = err.replace("\r", "\n").strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"error: cannot write in {run}: No space left"), err
    assert f"the last complete checkpoint is {run / 'last.keras'}" in line, line
    monkeypatch.undo()
    assert _position(run / "last.keras") == (1, STEPS)
