"""The state of one diffusion training run: what `prepare` checked and built (`Setup`), and what
one call of `train` carries from step to step (`Session`): optimizer, EMAs, grad scaler, progress
counters, rank 0's logs. Opened from scratch or restored from a checkpoint; saved as one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from guided_diffusion.training.checkpoint import (
    TrainingCheckpoint,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from guided_diffusion.training.distributed import Dist
from guided_diffusion.training.ema import EMA
from guided_diffusion.training.logs import (
    LOG_FIELDS,
    STATS_FIELDS,
    CsvLog,
    LossWindow,
    TensorBoard,
    plot_losses,
)
from guided_diffusion.training.memory_plan import Plan, Settings
from guided_diffusion.training.resume import warn_lossy_resume
from guided_diffusion.training.save_policy import SaveTimer
from guided_diffusion.training.step import autocast_for, grad_scaler_for
from guided_diffusion.winograd import conv_algorithm
from pipeline.common.config import Config


@dataclass
class Setup:
    """A validated run: config, data, networks and derived sizes (built before any file is touched)."""

    cfg: Config
    device: torch.device
    precision: str
    images: torch.Tensor  # (N, C, H, W) float32 on CPU
    model: nn.Module
    diffusion: object
    timestep_sampler: object
    settings: Settings  # micro-batch per process, EMA place, checkpointing (the memory plan's on CUDA)
    plan: Plan | None  # the memory plan (CUDA only)
    steps_per_epoch: int
    total_steps: int
    dataset: dict | None = None  # the dataset's fingerprint (filled in by the caller), saved in each checkpoint

    @property
    def microbatch(self) -> int:
        return self.settings.microbatch


@dataclass
class Outputs:
    """What rank 0 writes as it trains."""

    log_csv: CsvLog
    stats_csv: CsvLog
    board: TensorBoard

    @classmethod
    def open(cls, run_dir: Path, resume_step: int | None) -> Outputs:
        """Open (or, resuming at `resume_step`, truncate and reopen) the logs of `run_dir`."""
        return cls(CsvLog(run_dir / "log.csv", LOG_FIELDS, resume_step=resume_step),
                   CsvLog(run_dir / "stats.csv", STATS_FIELDS, resume_step=resume_step),
                   TensorBoard(run_dir / "tensorboard", purge_step=resume_step))

    def close(self) -> None:
        for f in (self.log_csv, self.stats_csv, self.board):
            f.close()


def new_progress() -> dict:
    """The counters a checkpoint carries from session to session."""
    return {"best_loss": math.inf, "best_step": 0, "bad_total": 0, "bad_in_row": 0, "overflow_steps": 0,
            "elapsed_s": 0.0}


@dataclass
class Session:
    """One call of `train`: what its pieces share. Only rank 0 has `outputs`."""

    s: Setup
    dist: Dist
    run_dir: Path
    net: nn.Module  # s.model, wrapped in DistributedDataParallel under DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], AbstractContextManager]
    ema: EMA
    window: LossWindow  # the losses since the last log.csv row
    progress: dict = field(default_factory=new_progress)
    outputs: Outputs | None = None
    start: int = 0  # the step this session starts at
    last_ckpt: Path | None = None
    save_timer: SaveTimer = field(default_factory=SaveTimer)  # train.save_every_minutes, from the last save
    started: float = 0.0  # perf_counter() when the first step began
    accounted_at: float = 0.0  # time up to here is in progress["elapsed_s"]
    window_start: float = 0.0
    window_steps: int = 0


def resolved(s: Setup) -> dict[str, str]:
    """What the `auto` settings chose for this session's steps (saved with each checkpoint; a resume
    that chooses otherwise says so)."""
    return {"precision": s.precision, "conv_algorithm": conv_algorithm(s.model, s.device.type, s.precision)}


def open_session(s: Setup, run_dir: Path, dist: Dist, resume: TrainingCheckpoint | None) -> Session:
    """AdamW, EMAs and grad scaler for `s.model` (restored from `resume`), DDP, rank 0's outputs."""
    tc = s.cfg.train
    optimizer = torch.optim.AdamW(list(s.model.parameters()), lr=tc.lr, betas=tuple(tc.adam_betas),
                                  weight_decay=tc.weight_decay)
    r = Session(s, dist, run_dir, s.model, optimizer, grad_scaler_for(s.precision, s.device),
                autocast_for(s.precision, s.device), EMA(s.model, tc.ema_rates, tc.ema_warmup, offload=s.settings.ema_device == "cpu", every=tc.ema_every),
                LossWindow(s.diffusion.num_timesteps))
    if resume is not None:
        restore(r, resume)
    if dist.world_size > 1:  # after restoring: DDP starts every rank from rank 0's weights
        device_ids = [s.device.index] if s.device.type == "cuda" else None
        r.net = nn.parallel.DistributedDataParallel(s.model, device_ids=device_ids)
    if dist.main:
        r.outputs = Outputs.open(run_dir, r.start if resume else None)
    r.started = r.accounted_at = r.window_start = time.perf_counter()
    return r


def restore(r: Session, resume: TrainingCheckpoint) -> None:
    """Continue from a checkpoint: weights, optimizer, EMAs, scaler, timestep sampler, RNGs, progress."""
    tc, state = r.s.cfg.train, resume.train_state
    if r.dist.main:
        warn_lossy_resume(resume, resolved(r.s))
    r.s.model.load_state_dict(resume.model_state)
    if state["optimizer"] is not None:  # None: a final checkpoint of train.final_optimizer false
        r.optimizer.load_state_dict(state["optimizer"])
    for group in r.optimizer.param_groups:  # settings from the (possibly edited) config win
        group.update(betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
    for rate, shadow in resume.ema_states.items():
        r.ema.load_shadow(rate, shadow)
    r.ema.num_updates = state["ema_num_updates"]
    if r.scaler is not None and state.get("scaler"):
        r.scaler.load_state_dict(state["scaler"])
    r.s.timestep_sampler.load_state_dict(state["timestep_sampler"])
    restore_rng_state(state["rng"])
    r.progress.update(state["progress"])
    if r.progress["bad_in_row"] >= tc.max_bad_steps:  # it stopped for divergence: count afresh
        r.progress["bad_in_row"] = 0
    r.start, r.last_ckpt = state["step"], resume.path


def save(r: Session, done: int) -> Path:
    """Rank 0: checkpoint the state after `done` steps (now `r.last_ckpt`), flush the logs, redraw loss.png.

    EMA weights are saved in train.save_dtype. The run's final checkpoint, with train.final_optimizer
    false, leaves out the optimizer state and saves the model weights in save_dtype too.
    """
    s, tc = r.s, r.s.cfg.train
    slim = done == s.total_steps and not tc.final_optimizer
    r.progress["elapsed_s"] += time.perf_counter() - r.accounted_at
    r.accounted_at = time.perf_counter()
    train_state = {
        "step": done, "epoch": done // s.steps_per_epoch, "batch_in_epoch": done % s.steps_per_epoch,
        "optimizer": None if slim else r.optimizer.state_dict(), "scaler": r.scaler.state_dict() if r.scaler else None,
        "timestep_sampler": s.timestep_sampler.state_dict(), "ema_num_updates": r.ema.num_updates,
        "rng": capture_rng_state(), "progress": dict(r.progress), "num_images": len(s.images),
        "dataset": s.dataset, "world_size": r.dist.world_size, "torch_version": str(torch.__version__),
        "resolved": resolved(s),
    }
    path = r.last_ckpt = save_checkpoint(r.run_dir, done, s.cfg, s.model.state_dict(), r.ema.shadows, train_state,
                                         tc.keep_last, model_dtype=tc.save_dtype if slim else "fp32",
                                         ema_dtype=tc.save_dtype)
    r.save_timer.reset()
    r.outputs.log_csv.flush()
    r.outputs.stats_csv.flush()
    plot_losses(r.run_dir / "log.csv", r.run_dir / "loss.png")
    return path
