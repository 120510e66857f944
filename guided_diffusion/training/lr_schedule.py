"""Learning-rate schedules as pure functions of the optimizer step.

`lr_at(step, steps_per_epoch, total_steps, cfg)` is the learning rate used for the update of
(0-based) step `step`:

- constant: `cfg.lr`.
- gear: piecewise constant from `cfg.gear = [[at, lr], ...]` (the seed's "3e-4, then 1e-4");
  `at` counts steps or epochs (`cfg.gear_unit`), must start at 0 and increase strictly. The rate
  of the last pair whose `at` ≤ the current position applies.
- cosine: `min_lr + ½(lr − min_lr)(1 + cos(π·step/total_steps))`, so step 0 uses `lr` and the
  value reaches `min_lr` at `total_steps`.

A linear warm-up multiplies any of them by `(step + 1) / warmup_steps` for the first
`warmup_steps` steps.
"""

from __future__ import annotations

import math

from pipeline.common.config import TrainConfig
from pipeline.common.errors import UserError

SCHEDULES = ("constant", "gear", "cosine")
GEAR_UNITS = ("steps", "epochs")


def check_schedule(cfg: TrainConfig) -> None:
    """Raise `UserError` if the schedule settings are unusable."""
    if cfg.lr_schedule not in SCHEDULES:
        raise UserError(f"unknown train.lr_schedule '{cfg.lr_schedule}'; valid: {', '.join(SCHEDULES)}")
    if cfg.lr <= 0:
        raise UserError(f"train.lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0:
        raise UserError(f"train.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.lr_schedule == "cosine" and not 0 <= cfg.min_lr <= cfg.lr:
        raise UserError(f"train.min_lr must be in [0, train.lr], got {cfg.min_lr}")
    if cfg.lr_schedule != "gear":
        return
    if cfg.gear_unit not in GEAR_UNITS:
        raise UserError(f"unknown train.gear_unit '{cfg.gear_unit}'; valid: {', '.join(GEAR_UNITS)}")
    if not cfg.gear:
        raise UserError("train.lr_schedule is 'gear' but train.gear is empty; give [[0, lr], [at, lr], ...]")
    for i, pair in enumerate(cfg.gear):
        if len(pair) != 2:
            raise UserError(f"train.gear[{i}] must be a pair [at, lr], got {pair}")
        if pair[1] <= 0:
            raise UserError(f"train.gear[{i}] has a learning rate <= 0: {pair}")
    ats = [pair[0] for pair in cfg.gear]
    if ats[0] != 0:
        raise UserError(f"train.gear must start at 0, got first 'at' = {ats[0]:g}")
    if any(b <= a for a, b in zip(ats[:-1], ats[1:], strict=True)):
        raise UserError(f"train.gear 'at' values must increase strictly, got {[f'{a:g}' for a in ats]}")


def _gear_lr(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    position = step / steps_per_epoch if cfg.gear_unit == "epochs" else step
    lr = cfg.gear[0][1]
    for at, rate in cfg.gear:
        if position >= at:
            lr = rate
    return float(lr)


def _cosine_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, steps_per_epoch: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) under `cfg`'s schedule and warm-up."""
    if cfg.lr_schedule == "gear":
        lr = _gear_lr(step, steps_per_epoch, cfg)
    elif cfg.lr_schedule == "cosine":
        lr = _cosine_lr(step, total_steps, cfg)
    else:
        lr = cfg.lr
    if step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr
