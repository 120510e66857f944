"""How long a diffusion run takes at a measured speed: hours per checkpoint and for the whole run.

The speed is optimizer steps per second, as `log.csv`'s `it_s` column records it (one figure per
`train.log_every` steps). `measured_it_s` reads that column, leaving out the first row of a session,
which includes the start-up (cuDNN autotuning, the allocator growing); `train-diffusion --plan
--it-s X` prints `format_run_hours` under the memory plan. The Colab training notebook measures X
on its GPU with a short timing run before it trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guided_diffusion.training.logs import read_log
from guided_diffusion.training.loop import total_steps
from pipeline.common.config import TrainConfig
from pipeline.common.errors import UserError

SECONDS_PER_HOUR = 3600.0


def _check_speed(it_s: float) -> None:
    if not (math.isfinite(it_s) and it_s > 0):
        raise UserError(f"the training speed must be > 0 steps per second, got {it_s}")


def hours_per_checkpoint(it_s: float, tc: TrainConfig) -> float:
    """Hours between two checkpoints of `train.save_every` steps at `it_s` optimizer steps per
    second: save_every / it_s / 3600 (train.save_every_minutes may save sooner; see `RunHours`)."""
    _check_speed(it_s)
    return tc.save_every / it_s / SECONDS_PER_HOUR


@dataclass(frozen=True)
class RunHours:
    """A run's length in hours at one speed."""

    it_s: float  # optimizer steps per second
    save_every: int  # steps
    save_every_minutes: float  # 0 → off
    total_steps: int
    done: int  # steps already trained (a resumed run)

    @property
    def per_checkpoint(self) -> float:
        """Hours between checkpoints counted in steps (train.save_every)."""
        return self.save_every / self.it_s / SECONDS_PER_HOUR

    @property
    def between_saves(self) -> float:
        """The most work a disconnect can cost, in hours: per_checkpoint, or less when
        train.save_every_minutes saves first."""
        if self.save_every_minutes > 0:
            return min(self.per_checkpoint, self.save_every_minutes / 60)
        return self.per_checkpoint

    @property
    def total(self) -> float:
        return self.total_steps / self.it_s / SECONDS_PER_HOUR

    @property
    def left(self) -> float:
        return max(self.total_steps - self.done, 0) / self.it_s / SECONDS_PER_HOUR


def run_hours(it_s: float, tc: TrainConfig, steps_per_epoch: int, done: int = 0) -> RunHours:
    """The run of `tc` (train.max_steps / train.epochs of `steps_per_epoch` steps) at `it_s`."""
    _check_speed(it_s)
    if steps_per_epoch < 1 and tc.epochs > 0:
        raise UserError("the dataset has fewer images than one batch (train.batch_size)")
    return RunHours(it_s, tc.save_every, tc.save_every_minutes, total_steps(tc, steps_per_epoch), done)


def _hours(h: float) -> str:
    """`123 h`, `10.26 h`, `0.53 h (32 min)`, `0.00 h (2 s)`."""
    if h >= 100:
        return f"{h:.0f} h"
    if h >= 1:
        return f"{h:.2f} h"
    return f"{h:.2f} h ({h * 60:.0f} min)" if h * 60 >= 1 else f"{h:.2f} h ({h * 3600:.0f} s)"


def format_run_hours(h: RunHours) -> str:
    """Two lines: hours per checkpoint, and for the run (and what is left of it)."""
    line = f"at {h.it_s:.3g} it/s: a checkpoint every {h.save_every} steps (train.save_every) = {_hours(h.per_checkpoint)}"
    if h.save_every_minutes > 0 and h.between_saves < h.per_checkpoint:
        line += f"; train.save_every_minutes {h.save_every_minutes:g} saves every {_hours(h.between_saves)}"
    run = f"the run: {h.total_steps} steps = {_hours(h.total)}"
    if h.done:
        run += f"; {max(h.total_steps - h.done, 0)} steps left after step {h.done} = {_hours(h.left)}"
    return f"{line}\n{run}"


def measured_it_s(log_csv: str | Path, skip: int = 1) -> float | None:
    """The median `it_s` of a log.csv's rows after the first `skip` (start-up); None when the file
    has no such row (or none with a speed)."""
    path = Path(log_csv)
    if not path.is_file():
        return None
    speeds = read_log(path)["it_s"][skip:]
    speeds = speeds[np.isfinite(speeds) & (speeds > 0)]
    return float(np.median(speeds)) if len(speeds) else None
