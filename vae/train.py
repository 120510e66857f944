"""Train the stage-1 Keras VAE into a run folder, and write priors sampled from one as PNGs
(the library side of `train-vae`; its command line is `pipeline.cli.train_vae`).

A run folder holds `config.yaml` (resolved config), `vae.keras` (best by the monitored ELBO),
`last.keras` (latest, with optimizer state, for `--resume`), `log.csv`, `loss.png` and
`samples/epoch_XXX.png` (fixed latents, one grid per epoch; epochs numbered from 0 as in log.csv).

`--resume` goes on from `last.keras` as if never stopped: the weights, Adam's state and step count
are in the file; the batch order is a function of (seed, epoch); the latent noise stream is put back
at the saved step (`_continue_noise`); the learning rate is a pure function of the step under the
config's schedule (`_learning_rate`). So a run resumed from the end of an epoch, or from the step a
signal stopped it at (`callbacks.StopOnSignal`), trains to the same weights and log as one that was
never stopped. The one difference mid-epoch: the log row of the epoch that was cut averages its
training figures over the batches run after the resume only (its val_ figures are exact). A run
resumed with more vae.epochs follows the schedule of a run planned that long from the start.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from pipeline.common.config import VAE_CONDITIONS, Config, dump_config
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir, replace_dir, temp_dir_for, write_text_atomic
from pipeline.common.images import make_grid, nchw_to_nhwc, write_image
from pipeline.common.interrupts import GracefulStop

log = logging.getLogger(__name__)

GRID_SAMPLES = 64
LR_SCHEDULES = ("constant", "cosine")
PRIORS = ("fitted", "standard")
COSINE_FLOOR = 0.05  # the cosine schedule ends at lr · COSINE_FLOOR


def _check_training_config(cfg: Config) -> None:
    v = cfg.vae
    if v.epochs < 1 or v.batch_size < 1 or v.lr <= 0:
        raise UserError(f"vae.epochs and vae.batch_size must be >= 1 and vae.lr > 0, got {v.epochs}, "
                        f"{v.batch_size}, {v.lr}")
    if v.prior not in PRIORS:
        raise UserError(f"vae.prior must be one of {', '.join(PRIORS)}, got '{v.prior}'")
    if v.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"vae.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{v.lr_schedule}'")
    if not 0 <= v.val_fraction < 1 or v.kl_warmup_epochs < 0 or v.early_stop_patience < 0:
        raise UserError("vae.val_fraction must be in [0, 1) and vae.kl_warmup_epochs, "
                        "vae.early_stop_patience >= 0")
    if v.condition not in VAE_CONDITIONS:
        raise UserError(f"vae.condition must be one of {', '.join(VAE_CONDITIONS)}, got '{v.condition}'")
    if not 0 <= v.condition_dropout < 1:
        raise UserError(f"vae.condition_dropout must be in [0, 1), got {v.condition_dropout}")


def split_indices(n: int, val_fraction: float, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(n) into sorted (train, val) indices; UserError when too few for one batch."""
    if n == 0:
        raise UserError("the dataset is empty")
    n_val = int(round(n * val_fraction))
    if n - n_val < batch_size:
        raise UserError(f"only {n - n_val} training images (of {n}) but vae.batch_size is {batch_size}; "
                        "use more images or a smaller batch")
    order = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_images(images: np.ndarray, val_fraction: float, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (train, val) NCHW arrays; UserError when too few images for one batch."""
    train_idx, val_idx = split_indices(len(images), val_fraction, batch_size, seed)
    return images[train_idx], images[val_idx]


@dataclass(frozen=True)
class ConditionSource:
    """Where a CVAE's raw conditions come from: `load()` → (N, K), one row per image of the dataset in
    its order, and `mirror(rows)` → the conditions of those images mirrored horizontally (data.hflip)."""

    load: Callable[[], np.ndarray]
    mirror: Callable[[np.ndarray], np.ndarray]


def _condition_batches(conditions: np.ndarray, batch_size: int, seed: int, hflip: bool, epoch: int,
                       mirror: Callable[[np.ndarray], np.ndarray]):
    """The raw conditions of each batch of `iterate_batches(…, start_epoch=epoch)`, in its order, the
    mirrored images' conditions through `mirror`."""
    from pipeline.common.batches import epoch_permutation, flip_mask

    n = len(conditions)
    order = epoch_permutation(n, seed, epoch)
    flips = flip_mask(n, seed, epoch) if hflip else np.zeros(n, bool)
    for begin in range(0, n - n % batch_size, batch_size):
        idx = order[begin : begin + batch_size]
        batch = np.array(conditions[idx], np.float32)
        batch[flips[idx]] = mirror(batch[flips[idx]])
        yield batch


def make_batches(images: np.ndarray, batch_size: int, seed: int, hflip: bool, start_epoch: int, skip: int = 0,
                 conditions: np.ndarray | None = None, mirror: Callable[[np.ndarray], np.ndarray] | None = None):
    """An endless `keras.utils.PyDataset` of NHWC batches in `pipeline.common.batches.iterate_batches` order
    (with `conditions`, a CVAE's: batches of (images, their raw conditions), mirrored with `mirror`).

    Global batch i is batch p % steps of epoch start_epoch + p // steps, p = skip + i, so the order
    depends only on (seed, epoch) and a resumed run sees the same batches as an uninterrupted one,
    also when it starts `skip` batches into an epoch.
    """
    import keras

    from pipeline.common.batches import iterate_batches

    class EpochBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.steps_per_epoch = len(images) // batch_size
            self._next, self._batches = None, iter(())

        @property
        def num_batches(self):
            return None  # endless: fit's steps_per_epoch cuts it into epochs

        def __getitem__(self, index: int):
            epoch, k = divmod(skip + index, self.steps_per_epoch)
            if index != self._next or k == 0:  # a new epoch, or an out-of-order read
                self._batches = islice(iterate_batches(images, batch_size, seed, shuffle=True, hflip=hflip,
                                                       drop_last=True, start_epoch=start_epoch + epoch), k, None)
                if conditions is not None:
                    self._conditions = islice(_condition_batches(conditions, batch_size, seed, hflip,
                                                                 start_epoch + epoch, mirror), k, None)
            self._next = index + 1
            batch = nchw_to_nhwc(next(self._batches))
            return (batch,) if conditions is None else ((batch, next(self._conditions)),)

    return EpochBatches()


def _learning_rate(lr: float, schedule: str, total_steps: int):
    """Adam's learning rate as a function of the step: a cosine decay to lr·COSINE_FLOOR at
    `total_steps`, or (floor 1) constant. Always a schedule object, so that `train` can put the
    config's schedule on a loaded optimizer (Keras refuses to replace a schedule by a number)."""
    import keras

    floor = COSINE_FLOOR if schedule == "cosine" else 1.0
    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=total_steps, alpha=floor)


def _load_checkpoint(path: Path):
    """The `last.keras` of a run, compiled with its optimizer state."""
    import keras

    from vae.model import IrisVAE

    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:  # damaged or foreign file
        raise UserError(f"cannot load checkpoint {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    if not isinstance(model, IrisVAE):
        raise UserError(f"{path} is not a VAE checkpoint written by train-vae")
    return model


def _resume_position(vae, steps: int, path: Path) -> tuple[int, int]:
    """(epoch, batch) a loaded run goes on from: its finished epochs and the batches done since."""
    import keras

    epoch = int(keras.ops.convert_to_numpy(vae.trained_epochs))
    step = int(keras.ops.convert_to_numpy(vae.optimizer.iterations))
    if not 0 <= step - epoch * steps < steps:
        raise UserError(f"{path} stopped at step {step} after {epoch} epochs, which does not fit {steps} batches "
                        "per epoch; resume with the vae.batch_size, vae.val_fraction and images it was trained with")
    return epoch, step - epoch * steps


def _continue_noise(vae) -> None:
    """Put the latent noise stream back where it was. Keras saves no SeedGenerator state, so a loaded
    VAE would draw the noise of step 0 again; `Sampling` draws once per training step, so the
    stream's position (the second number of the state) is the optimizer's step count."""
    import keras

    generators = [vae.sampling.seed_generator]
    if vae.conditional and vae.condition_dropout > 0:  # the condition dropout draws once per step too
        generators.append(vae.condition_input.seed_generator)
    for generator in generators:
        state = keras.ops.convert_to_numpy(generator.state).copy()
        state[1] = keras.ops.convert_to_numpy(vae.optimizer.iterations)
        generator.state.assign(state)


def _resume(cfg: Config, out: Path, steps: int):
    """The `last.keras` of `out` ready to go on, and the (epoch, batch) to go on from."""
    from vae.model import check_vae_matches

    path = out / "last.keras"
    vae = _load_checkpoint(path)
    check_vae_matches(vae, cfg, f"checkpoint {path}")
    epoch, batch = _resume_position(vae, steps, path)
    if epoch >= cfg.vae.epochs:
        raise UserError(f"{out} has already trained {epoch} of vae.epochs={cfg.vae.epochs} epochs; "
                        "raise it with --set vae.epochs=N to train longer")
    _continue_noise(vae)
    log.info("resuming %s at epoch %d, batch %d", out, epoch, batch)
    return vae, (epoch, batch)


def _load_data(cfg: Config, load_images: Callable[[], np.ndarray],
               conditions: ConditionSource | None) -> tuple[np.ndarray, ...]:
    """(train images, val images, train conditions, val conditions); the conditions are None for a plain VAE."""
    v = cfg.vae
    images = load_images()
    train_idx, val_idx = split_indices(len(images), v.val_fraction, v.batch_size, v.seed)
    if v.condition == "none":
        return images[train_idx], images[val_idx], None, None
    if conditions is None:
        raise UserError(f"vae.condition={v.condition} needs labelled images")
    c = np.asarray(conditions.load(), np.float32)
    if len(c) != len(images):
        raise UserError(f"{len(images)} images but {len(c)} conditions")
    return images[train_idx], images[val_idx], c[train_idx], c[val_idx]


def train(cfg: Config, load_images: Callable[[], np.ndarray], out: str | Path, resume: bool = False, overwrite: bool = False,
          verbose: int | str | None = None, stop: GracefulStop | None = None,
          conditions: ConditionSource | None = None) -> Path:
    """Train (or resume) a VAE into the run folder `out`; returns the folder. The images come from
    `load_images()` ((N, C, H, W) in [-1, 1]), called after the cheap checks so mistakes fail fast;
    a CVAE's (vae.condition) raw conditions (N, K) from `conditions`.
    With `stop`, a signal it records ends training early with a TrainingInterrupted (`callbacks.StopOnSignal`)."""
    _check_training_config(cfg)
    v, out = cfg.vae, Path(out)
    if resume and not (out / "last.keras").is_file():
        raise UserError(f"nothing to resume: {out / 'last.keras'} not found")
    if not resume:
        prepare_out_dir(out, overwrite)
    train_x, val_x, train_c, val_c = _load_data(cfg, load_images, conditions)

    import keras  # after the cheap checks: importing TensorFlow is slow

    from vae import callbacks as cb
    from vae.model import build_vae
    from vae.priors import prior_latents

    keras.utils.set_random_seed(v.seed)
    monitor = "val_elbo" if len(val_x) else "elbo"
    steps = len(train_x) // v.batch_size
    log_path = out / "log.csv"
    schedule = _learning_rate(v.lr, v.lr_schedule, v.epochs * steps)
    if resume:
        vae, (epoch, batch) = _resume(cfg, out, steps)
        vae.optimizer.learning_rate = schedule  # the config's, also when vae.epochs or vae.lr changed
        rows = [r for r in cb.read_log(log_path) if int(r["epoch"]) < epoch]
        cb.write_log(log_path, rows)  # forget epochs logged after the checkpoint was written
        best, wait = cb.best_and_wait([float(r.get(monitor, math.nan)) for r in rows])
    else:
        shutil.rmtree(out, ignore_errors=True)  # prepare_out_dir allowed it (--overwrite)
        out.mkdir(parents=True)
        vae = build_vae(cfg, train_c)
        vae.compile(optimizer=keras.optimizers.Adam(schedule))
        (epoch, batch), best, wait = (0, 0), math.inf, 0
    write_text_atomic(out / "config.yaml", dump_config(cfg))

    early = cb.EarlyStop(monitor, v.early_stop_patience, best, wait)
    callbacks = [  # in this order: the prior is fitted before the grid is drawn and the model saved
        cb.KLWarmup(v.beta, v.kl_warmup_epochs),
        *([cb.FitPrior(train_x, train_c)] if v.prior == "fitted" else []),
        cb.SampleGrid(out, prior_latents(v.latent_dim, GRID_SAMPLES, v.seed)),
        cb.Checkpoint(out, monitor, best),
        early,
        cb.LogLearningRate(schedule),
        cb.CsvLog(log_path),
        cb.LossPlot(log_path, out / "loss.png"),
        *([cb.StopOnSignal(stop, out / "last.keras", steps)] if stop else []),
    ]
    if verbose is None:
        verbose = 2 if os.environ.get("CI", "").lower() == "true" else "auto"

    def fit(first: int, end: int, skip: int) -> None:
        """Epochs first..end-1, the first of them from its batch `skip` on."""
        batches = make_batches(train_x, v.batch_size, v.seed, cfg.data.hflip, first, skip, train_c,
                               conditions.mirror if conditions else None)
        val = nchw_to_nhwc(val_x) if train_c is None else (nchw_to_nhwc(val_x), val_c)
        vae.fit(batches, epochs=end, initial_epoch=first, steps_per_epoch=steps - skip,
                validation_data=(val,) if len(val_x) else None, validation_batch_size=v.batch_size,
                shuffle=False, callbacks=callbacks, verbose=verbose)

    try:
        if batch:  # first finish the epoch an interrupt cut
            fit(epoch, epoch + 1, batch)
            epoch += 1
        if epoch < v.epochs and early.stopped_epoch is None:
            fit(epoch, v.epochs, 0)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"cannot write in {out}: {exc.strerror} ({shutil.disk_usage(out).free / 1e6:.1f} MB free); "
                        f"the last complete checkpoint is {out / 'last.keras'}") from None
    return out


def write_priors(vae_path: str | Path, out: str | Path, n: int, seed: int, temperature: float,
                 overwrite: bool = False, cfg: Config | None = None) -> Path:
    """Sample `n` priors into `out` as `000000.png…` and `grid.png` (built in a temp dir, then renamed)."""
    from vae.model import check_vae_matches
    from vae.priors import load_vae, prior_latents, sample_priors

    prior_latents(1, n, seed, temperature)  # validates n and temperature before any work
    out = prepare_out_dir(out, overwrite)
    vae = load_vae(vae_path)
    if cfg is not None:
        check_vae_matches(vae, cfg, f"VAE {vae_path}")
    priors = sample_priors(vae, n, seed, temperature)
    tmp = temp_dir_for(out)
    try:
        for i, img in enumerate(priors):
            write_image(tmp / f"{i:06d}.png", img)
        write_image(tmp / "grid.png", make_grid(priors))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out
