"""`model.fit` callbacks of `train-vae`: KL warm-up, fitted prior, atomic checkpoints, early stop,
sample grids, the CSV log with the learning rate, loss plot, stop on a signal."""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from pipeline.common.errors import UserError
from pipeline.common.files import fsync_file, save_figure_atomic
from pipeline.common.images import make_grid, nhwc_to_nchw, write_image
from pipeline.common.interrupts import GracefulStop, TrainingInterrupted
from vae.losses import kl_warmup_weight


class KLWarmup(keras.callbacks.Callback):
    """Set the model's `kl_weight` to β·min(1, (epoch+1)/warmup_epochs) at the start of each epoch."""

    def __init__(self, beta: float, warmup_epochs: int):
        super().__init__()
        self.beta, self.warmup_epochs = beta, warmup_epochs

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.model.kl_weight.assign(kl_warmup_weight(epoch, self.beta, self.warmup_epochs))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["kl_weight"] = kl_warmup_weight(epoch, self.beta, self.warmup_epochs)


class FitPrior(keras.callbacks.Callback):
    """After each epoch, refit the latent prior to the encoded training images (`vae.priors.fit_prior`)."""

    def __init__(self, images: np.ndarray, conditions: np.ndarray | None = None):
        super().__init__()
        self.images, self.conditions = images, conditions

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from vae.priors import fit_prior

        fit_prior(self.model, self.images, conditions=self.conditions)


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def replace_atomic(path: Path, write: Callable[[Path], None], size: int) -> None:
    """Write `path` through `write(temp)` on a temp name beside it, sync, then rename it into place,
    so `path` is always whole: the previous file until the new one is complete (a kill -9 or a
    second Ctrl-C mid-write leaves it untouched). Any failure removes the temp file; an OSError
    (a full disk, a lost Drive mount) becomes a UserError naming `size` and the free space."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        free = shutil.disk_usage(path.parent).free
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise UserError(f"cannot write {path}: {exc.strerror or exc} (it needs about {_megabytes(size)}, "
                        f"{_megabytes(free)} free){kept}") from None


def checkpoint_bytes(model: keras.Model) -> int:
    """About the size of `model.save`'s file: the bytes of the weights and the optimizer state."""
    variables = [*model.weights, *(model.optimizer.variables if model.optimizer else [])]
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """`model.save(path)` through `replace_atomic`."""
    replace_atomic(path, model.save, checkpoint_bytes(model))


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file to `dst` through `replace_atomic`."""
    replace_atomic(dst, lambda tmp: shutil.copyfile(src, tmp), src.stat().st_size)


class Checkpoint(keras.callbacks.Callback):
    """After each epoch: `last.keras` (with optimizer state), and `vae.keras` when `monitor` improved."""

    def __init__(self, out_dir: Path, monitor: str, best: float = math.inf):
        super().__init__()
        self.last, self.best_path = out_dir / "last.keras", out_dir / "vae.keras"
        self.monitor, self.best = monitor, best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.model.trained_epochs.assign(epoch + 1)
        save_model_atomic(self.model, self.last)
        value = float((logs or {}).get(self.monitor, math.nan))
        if value < self.best or not self.best_path.exists():
            self.best = value if math.isfinite(value) else self.best
            copy_atomic(self.last, self.best_path)


class EarlyStop(keras.callbacks.Callback):
    """Stop when `monitor` has not improved for `patience` epochs (state can be carried over a resume)."""

    def __init__(self, monitor: str, patience: int, best: float = math.inf, wait: int = 0):
        super().__init__()
        self.monitor, self.patience, self.best, self.wait = monitor, patience, best, wait
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = float((logs or {}).get(self.monitor, math.nan))
        if value < self.best:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.patience > 0 and self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True


def best_and_wait(values: list[float]) -> tuple[float, int]:
    """Best (lowest) value so far and the number of epochs since it, for resuming `EarlyStop`."""
    if not values:
        return math.inf, 0
    i = int(np.nanargmin(values)) if not all(math.isnan(v) for v in values) else len(values) - 1
    return values[i], len(values) - 1 - i


class SampleGrid(keras.callbacks.Callback):
    """Decode fixed prior draws after each epoch into `samples/epoch_XXX.png` (epochs numbered as in log.csv)."""

    def __init__(self, out_dir: Path, eps: np.ndarray):
        super().__init__()
        self.folder, self.eps = out_dir / "samples", eps

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from vae.priors import to_prior

        self.folder.mkdir(exist_ok=True)
        images = keras.ops.convert_to_numpy(self.model.decode(to_prior(self.model, self.eps)))
        write_image(self.folder / f"epoch_{epoch:03d}.png", make_grid(nhwc_to_nchw(images)))


def read_log(path: Path) -> list[dict[str, str]]:
    """Rows of a Keras CSVLogger file (empty when the file does not exist)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_log(path: Path, rows: list[dict[str, str]]) -> None:
    """Rewrite a log.csv with `rows` atomically; its columns are every key of the rows, in order of
    first appearance (a row without one leaves it empty)."""
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)

    replace_atomic(path, write, sum(len(str(row)) for row in rows))


class CsvLog(keras.callbacks.Callback):
    """Add each epoch's logs to log.csv as one row (the whole file rewritten through `write_log`, so
    a resumed run's rows join the kept ones under one header, new columns included)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = {"epoch": str(epoch), **{key: str(float(value)) for key, value in sorted((logs or {}).items())}}
        write_log(self.path, [*read_log(self.path), row])


class LogLearningRate(keras.callbacks.Callback):
    """Add `lr`, the learning rate of the epoch's last step under `schedule`, to the epoch's logs."""

    def __init__(self, schedule: Callable[[int], float]):
        super().__init__()
        self.schedule = schedule

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            logs["lr"] = float(keras.ops.convert_to_numpy(self.schedule(step - 1)))


def plot_losses(rows: list[dict[str, str]], path: Path) -> None:
    """Total, reconstruction and KL loss per epoch (training and validation) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="tight")
    FigureCanvasAgg(fig)
    epochs = [int(r["epoch"]) for r in rows]
    for ax, key, title in zip(fig.subplots(1, 3), ("loss", "recon", "kl"),
                              ("total (recon + weighted KL)", "reconstruction", "KL (nats)"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            if rows and prefix + key in rows[0]:
                ax.plot(epochs, [float(r[prefix + key]) for r in rows], style, label=prefix + key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    save_figure_atomic(fig, path, dpi=80)


class LossPlot(keras.callbacks.Callback):
    """Redraw `loss.png` from `log.csv` after each epoch (so a resumed run plots its whole history)."""

    def __init__(self, log_path: Path, plot_path: Path):
        super().__init__()
        self.log_path, self.plot_path = log_path, plot_path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        plot_losses(read_log(self.log_path), self.plot_path)


class StopOnSignal(keras.callbacks.Callback):
    """Leave `fit` once `stop.requested` is set (a `pipeline.common.interrupts.GracefulStop`), by
    raising TrainingInterrupted:

    - after a batch that ends no epoch: `last.keras` is saved at that step (a resume goes on from
      the next batch);
    - at an epoch's end, after the other callbacks (this one must come last): `last.keras` is that
      epoch's, written by `Checkpoint`;
    - before the first batch of a `fit`: `last.keras` is left as it is.

    A stop asked for at the end of the run's last epoch lets it finish.
    """

    def __init__(self, stop: GracefulStop, last: Path, steps_per_epoch: int):
        super().__init__()
        self.stop, self.last, self.steps_per_epoch = stop, last, steps_per_epoch

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.stop.requested is not None:
            raise self._interrupted()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.stop.requested is not None and batch + 1 < self.params["steps"]:
            save_model_atomic(self.model, self.last)
            raise self._interrupted()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.stop.requested is not None and not self.model.stop_training and epoch + 1 < self.params["epochs"]:
            raise self._interrupted()

    def _interrupted(self) -> TrainingInterrupted:
        """Where the run stopped; the live model is what `last.keras` holds at each raise above."""
        why = f"interrupted by {self.stop.signal_name()}"
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step == 0:
            return TrainingInterrupted(f"{why} before the first step; nothing was saved", self.stop.requested)
        epoch, batch = divmod(step, self.steps_per_epoch)
        where = f"epoch {epoch} after batch {batch} of {self.steps_per_epoch}" if batch else f"the end of epoch {epoch - 1}"
        return TrainingInterrupted(f"{why}: {self.last} holds the run at {where} (step {step})", self.stop.requested)
