"""What a training run does when trouble comes from outside the maths: a signal asks it to stop, a
save fails, or an fp16 step overflows.

- **SIGINT / SIGTERM** (Ctrl-C, a notebook's stop button, a job scheduler, `kill`): `train` records
  the signal (`pipeline.common.interrupts.GracefulStop`) and finishes the step it is in; then
  `stop_if_interrupted` saves a checkpoint (unless that step was just saved) and raises
  `TrainingInterrupted`, which the console script turns into exit code 130 / 143. A second signal
  aborts at once; the last complete checkpoint survives that, as saves are atomic. Under DDP the
  ranks combine their signals after every step (an all-reduce of one integer), so all of them stop
  after the same step, whichever got the signal.
- **A failed save** (disk full, I/O error, no permission): `save_checkpoint` leaves the earlier
  checkpoints and `latest` as they were and removes its temp files; `save_or_report` then stops
  with one line naming the checkpoint's size and the free space, or, with train.on_save_error warn,
  logs that and trains on, so the next save tries again. A save nothing comes after (the run's
  last, or the one of a stop) always stops on failure.
- **fp16 overflow**: with a GradScaler, a step whose loss is finite but whose scaled gradient
  overflowed is the scaler finding its scale (`is_overflow`): it is skipped, the scale lowered, and
  counted in progress["overflow_steps"], not as a bad step toward train.max_bad_steps.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch

from guided_diffusion.training.checkpoint import CHECKPOINTS, CheckpointWriteError, step_dir_name
from guided_diffusion.training.session import Session, save
from pipeline.common.errors import UserError
from pipeline.common.interrupts import GracefulStop, TrainingInterrupted

log = logging.getLogger(__name__)

# At a loss scale of 1 or below a non-finite gradient is no longer the scale settling (the gradient
# overflows without any scaling): from there an overflow counts as a bad step.
MIN_SETTLING_SCALE = 1.0


class SaveFailed(UserError):
    """A checkpoint could not be saved and the run stopped; the earlier checkpoints are intact."""


def is_overflow(scaler: torch.amp.GradScaler | None, loss_finite: bool) -> bool:
    """Whether a step with a non-finite gradient is an fp16 overflow under the loss scale rather than
    a bad step: a GradScaler scaled a finite loss by more than MIN_SETTLING_SCALE."""
    return scaler is not None and loss_finite and scaler.get_scale() > MIN_SETTLING_SCALE


def save_or_report(r: Session, done: int, retry_later: bool) -> Path | None:
    """Rank 0: `save(r, done)`, returning the checkpoint. If writing fails: with train.on_save_error
    warn and `retry_later` (a later save will come), log a warning and return None; else raise
    `SaveFailed`, one line with the size, the free space and the checkpoint to resume from."""
    try:
        return save(r, done)
    except (CheckpointWriteError, OSError) as exc:
        r.save_timer.reset()  # a time-based save tries again after train.save_every_minutes, not every step
        what = str(exc) if isinstance(exc, CheckpointWriteError) else f"could not save step {done} ({exc})"
        if retry_later and r.s.cfg.train.on_save_error == "warn":
            log.warning("%s; training on, the next save tries again (train.on_save_error warn)", what)
            return None
        if r.last_ckpt is None:
            then = "no earlier checkpoint exists: free some space and start again"
        else:
            then = f"the last complete checkpoint {r.last_ckpt} is intact: free some space, then " \
                   f"train-diffusion --resume {r.run_dir}"
        raise SaveFailed(f"{what}; {then}") from None


def stop_if_interrupted(r: Session, stop: GracefulStop, done: int) -> None:
    """After step `done`: if any rank got SIGINT/SIGTERM, every rank stops here. Rank 0 first saves
    (unless step `done` was just saved); then `TrainingInterrupted` on every rank."""
    signum = r.dist.max_int(stop.requested or 0, r.s.device)  # the ranks agree, all at this step
    if not signum:
        return
    ckpt = r.run_dir / CHECKPOINTS / step_dir_name(done)
    if r.dist.main and (r.last_ckpt is None or r.last_ckpt.name != ckpt.name):
        save_or_report(r, done, retry_later=False)
    r.dist.barrier()  # the checkpoint is complete before any rank exits
    raise TrainingInterrupted(f"interrupted by {signal.Signals(signum).name} after step {done}: checkpoint {ckpt}; "
                              f"resume with train-diffusion --resume {r.run_dir}", signum)
