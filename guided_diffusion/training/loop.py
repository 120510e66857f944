"""The diffusion training loop: `prepare` a run, then `train` it, resumable bit for bit.

One optimizer step (`train`, read it top to bottom): 1. draw the step's images, timesteps and
noise → 2. micro-batched forward/backward, unscale, clip → 3. AdamW + EMA update, or skip the
step if anything is NaN/Inf → 4. log, probe, checkpoint, sample. The console script
`train-diffusion` (`pipeline.cli.train_diffusion`) picks the run directory, loads the images and
calls both. A signal, a failed save or an fp16 overflow is handled as `faults` describes.

Randomness: everything a step draws (its timesteps, noise, and the global torch RNG used by
dropout) is seeded from (train.seed, rank, step), and the data order of an epoch from
(train.seed, epoch). So a run resumed at step s on any rank draws exactly what the
uninterrupted run drew; the global RNG states are saved and restored as well for anything else.

`train.batch_size` is the global batch: under DDP each of W processes takes a disjoint B/W slice
of every batch, so a config means the same optimisation on one GPU or several.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from guided_diffusion import samplers
from guided_diffusion.timestep_sampler import create_timestep_sampler
from guided_diffusion.training.checkpoint import CHECKPOINTS, TrainingCheckpoint, step_dir_name
from guided_diffusion.training.distributed import Dist
from guided_diffusion.training.factory import create_diffusion, create_model, resolve_conv_algorithm
from guided_diffusion.training.faults import is_overflow, save_or_report, stop_if_interrupted
from guided_diffusion.training.lr_schedule import check_schedule, lr_at
from guided_diffusion.training.memory_plan import gpu_budget, resolve_settings, suggestion
from guided_diffusion.training.save_policy import check_save_settings
from guided_diffusion.training.session import Session, Setup, open_session
from guided_diffusion.training.stats import ActivationProbe, block_grad_norms, health_rows
from guided_diffusion.training.step import check_batching, forward_backward, resolve_precision
from pipeline.common.batches import epoch_permutation, flip_mask
from pipeline.common.config import Config, TrainConfig
from pipeline.common.errors import UserError
from pipeline.common.images import make_grid, write_image
from pipeline.common.interrupts import GracefulStop

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; a final checkpoint of the last good weights was saved."""


# ------------------------------------------------------------------------------ small helpers


def check_length(tc: TrainConfig) -> None:
    """UserError unless train.max_steps or train.epochs sets how long to train (both >= 0, not both 0)."""
    if tc.max_steps < 0 or tc.epochs < 0:
        raise UserError("train.max_steps and train.epochs must be >= 0")
    if tc.max_steps == 0 and tc.epochs == 0:
        raise UserError("set train.max_steps or train.epochs (both are 0)")


def total_steps(tc: TrainConfig, steps_per_epoch: int) -> int:
    """Steps to train: max_steps or epochs × steps_per_epoch (≥ 1), whichever comes first."""
    check_length(tc)
    return min(n for n in (tc.max_steps, tc.epochs * steps_per_epoch) if n > 0)


def step_seed(seed: int, rank: int, step: int, stream: int) -> int:
    """A 32-bit seed that depends only on (seed, rank, step, stream)."""
    return int(np.random.SeedSequence([seed, rank, step, stream]).generate_state(1)[0])


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, index: int, dist: Dist,
                  hflip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices of this rank's slice of batch `index` of `epoch`, and which to mirror."""
    order = epoch_permutation(n, seed, epoch)
    per_rank = batch_size // dist.world_size
    start = index * batch_size + dist.rank * per_rank
    idx = order[start : start + per_rank]
    flips = flip_mask(n, seed, epoch)[idx] if hflip else np.zeros(len(idx), bool)
    return idx, flips


def load_batch(images: torch.Tensor, idx: np.ndarray, flips: np.ndarray, device: torch.device) -> torch.Tensor:
    """images[idx] with the chosen ones mirrored left-right, on `device`."""
    x = images[torch.from_numpy(idx)]
    if flips.any():
        mask = torch.from_numpy(flips)
        x[mask] = x[mask].flip(-1)
    return x.to(device, non_blocking=True)


def params_sha256(model: nn.Module) -> str:
    """sha256 over the bytes of every parameter and buffer, in state_dict order."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # logical order, any layout
    return digest.hexdigest()


@torch.no_grad()
def write_sample_grid(path: Path, cfg: Config, model: nn.Module, weights: dict[str, torch.Tensor],
                      device: torch.device, autocast, batch: int) -> None:
    """A grid of `sample_count` samples of `weights` (the slowest EMA), always from the same seed.

    The weights are swapped into the training model for the grid and the training weights put
    back bit for bit afterwards (a copy on the CPU meanwhile), so no second network lives on the
    GPU. Sampled under `autocast`, `batch` images at a time; DDIM with η = 0 draws only the
    starting noise, so the grid does not depend on `batch` (beyond float rounding).
    """
    training_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    was_training = model.training
    diffusion = create_diffusion(cfg, respacing=str(cfg.train.sample_steps))
    shape = (cfg.train.sample_count, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.train.seed))
    try:
        model.load_state_dict(weights)
        model.eval()
        chunks = []
        for start in range(0, shape[0], batch):
            chunk = noise[start : start + batch].to(device)
            with autocast():
                chunks.append(samplers.sample(model, diffusion, tuple(chunk.shape), sampler="ddim", noise=chunk,
                                              device=device).float().cpu())
    finally:
        model.load_state_dict(training_weights)
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, make_grid(torch.cat(chunks).clamp(-1, 1).numpy()))


# ------------------------------------------------------------------------------------- set-up


def prepare(cfg: Config, load_images: Callable[[], np.ndarray], device: torch.device, dist: Dist) -> Setup:
    """Check every setting, then load the dataset (`load_images()` → (N, C, H, W) in [-1, 1]: called
    after the cheap checks, so a bad setting fails fast) and build the networks; `UserError` on bad input."""
    tc = cfg.train
    check_length(tc)
    check_schedule(tc)
    check_save_settings(tc)
    check_batching(tc.batch_size, tc.microbatch, dist.world_size)
    # auto settings are verdicts timed on each machine: every rank takes rank 0's, so all compute alike
    precision = dist.from_main(lambda: resolve_precision(tc.precision, device))
    conv = cfg.model.conv_algorithm
    if conv == "auto" and dist.world_size > 1:
        conv = dist.from_main(lambda: resolve_conv_algorithm(cfg.model))
    settings, plan = resolve_settings(cfg, device, tc.batch_size // dist.world_size, precision)
    if tc.seed < 0:
        raise UserError(f"train.seed must be >= 0, got {tc.seed}")
    if any(not 0.0 < r < 1.0 for r in tc.ema_rates) or len(set(tc.ema_rates)) != len(tc.ema_rates):
        raise UserError(f"train.ema_rates must be distinct values in (0, 1), got {tc.ema_rates}")
    for key in ("log_every", "save_every", "sample_every", "stats_every", "sample_count", "sample_steps"):
        if getattr(tc, key) < 1:
            raise UserError(f"train.{key} must be >= 1, got {getattr(tc, key)}")
    if tc.sample_steps > cfg.diffusion.steps:
        raise UserError(f"train.sample_steps {tc.sample_steps} exceeds diffusion.steps {cfg.diffusion.steps}")
    images = load_images()
    if len(images) < tc.batch_size:
        raise UserError(f"the dataset has {len(images)} images, fewer than one batch (train.batch_size {tc.batch_size})")
    steps_per_epoch = len(images) // tc.batch_size
    total = total_steps(tc, steps_per_epoch)
    torch.manual_seed(tc.seed)  # the initial weights
    model = create_model(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, use_checkpoint=settings.use_checkpoint, conv_algorithm=conv))).to(device)
    diffusion = create_diffusion(cfg)
    timestep_sampler = create_timestep_sampler(cfg.diffusion.timestep_sampler, diffusion)
    return Setup(cfg, device, precision, torch.tensor(images), model, diffusion, timestep_sampler,
                 settings, plan, steps_per_epoch, total)


# -------------------------------------------------------------------------------------- train


class Batch(NamedTuple):
    """What one step trains on (this rank's slice)."""

    x: torch.Tensor  # images
    t: torch.Tensor  # timesteps
    weights: torch.Tensor  # importance weights of the timesteps
    noise: torch.Tensor


def train(s: Setup, run_dir: Path, dist: Dist, resume: TrainingCheckpoint | None = None) -> dict:
    """Train `s.model` from scratch or from `resume`, writing into `run_dir` (rank 0). Returns a summary.

    SIGINT/SIGTERM: the step in progress is finished and checkpointed, then `TrainingInterrupted`."""
    r, tc = open_session(s, run_dir, dist, resume), s.cfg.train
    step = r.start
    try:
        with GracefulStop() as stop, logging_redirect_tqdm(), tqdm(
                total=s.total_steps, initial=r.start, desc="train", unit="step", dynamic_ncols=True,
                disable=not dist.main) as bar:
            for step in range(r.start, s.total_steps):
                done = step + 1
                batch = draw_batch(s, dist, step)  # 1.
                lr = anneal_lr(r.optimizer, s, step)
                probing = dist.main and done % tc.stats_every == 0
                losses, grad_norm, health = gradient(r, batch, probing)  # 2.
                update_or_skip(r, batch.t, losses, grad_norm, done)  # 3.
                r.window_steps += 1
                bar.update(1)

                # 4. Logs, health probes, checkpoints, samples (rank 0).
                if dist.main and (done % tc.log_every == 0 or done == s.total_steps):
                    log_window(r, step, lr, bar)
                if health is not None:
                    r.outputs.stats_csv.write_rows(health_rows(done, *health))
                stop_if_diverged(r, done)
                if dist.main:
                    checkpoint_and_sample(r, done)
                if done < s.total_steps:  # a signal during the last step: the run is complete anyway
                    stop_if_interrupted(r, stop, done)
    except torch.OutOfMemoryError:
        raise out_of_memory(r, step + 1) from None
    finally:
        r.ema.close()
    return finish(r)


def out_of_memory(r: Session, done: int) -> UserError:
    """The one-line error for a CUDA out-of-memory error during step `done`: what ran, what the
    memory plan suggests, and the (intact) checkpoint to resume from."""
    s = r.s
    fix = suggestion(s.plan, s.settings)
    ran = (f"micro-batch {s.microbatch}, EMA {'on the CPU' if s.settings.ema_device == 'cpu' else 'on the GPU'}, "
           f"checkpointing {'on' if s.settings.use_checkpoint else 'off'}")
    if s.device.type == "cuda":
        budget = gpu_budget(s.device, s.cfg.train.gpu_memory)
        ran += f"; peak {torch.cuda.max_memory_allocated(s.device) / 2**30:.2f} GiB of a {budget / 2**30:.2f} GiB budget"
    if r.last_ckpt is None:
        then = f"no checkpoint was written yet; start again with {fix} --overwrite"
    else:
        then = f"the last checkpoint {r.last_ckpt} is intact: train-diffusion --resume {r.run_dir} {fix}"
    return UserError(f"out of GPU memory at step {done} ({ran}); the memory plan suggests {fix}; {then}")


def draw_batch(s: Setup, dist: Dist, step: int) -> Batch:
    """1. This rank's images, timesteps and noise of `step`, all seeded from (seed, rank, step),
    as is the global torch RNG (dropout)."""
    tc = s.cfg.train
    epoch, index = divmod(step, s.steps_per_epoch)
    generator = torch.Generator().manual_seed(step_seed(tc.seed, dist.rank, step, 0))
    torch.manual_seed(step_seed(tc.seed, dist.rank, step, 1))  # dropout
    idx, flips = batch_indices(len(s.images), tc.batch_size, tc.seed, epoch, index, dist, s.cfg.data.hflip)
    x = load_batch(s.images, idx, flips, s.device)
    t, weights = s.timestep_sampler.sample(tc.batch_size // dist.world_size, s.device, generator=generator)
    noise = torch.randn(x.shape, generator=generator).to(s.device)
    return Batch(x, t, weights, noise)


def anneal_lr(optimizer: torch.optim.Optimizer, s: Setup, step: int) -> float:
    """Set and return the scheduled learning rate of `step`."""
    lr = lr_at(step, s.steps_per_epoch, s.total_steps, s.cfg.train)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def gradient(r: Session, batch: Batch, probing: bool) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """2. Gradient of mean(w · loss) over the batch, in micro-batches, unscaled and clipped.

    Returns the per-image losses, the pre-clip gradient norm and, when `probing`, the
    (block gradient norms, activation statistics) of stats.csv.
    """
    model = r.s.model
    r.optimizer.zero_grad(set_to_none=True)
    probe = ActivationProbe(model) if probing else nullcontext()
    # the probe's hooks and torch-function mode see every op only in an eager forward (model.compile)
    with probe, torch.compiler.set_stance("force_eager") if probing else nullcontext():
        losses = forward_backward(r.net, r.s.diffusion, *batch, r.s.microbatch, r.autocast, r.scaler)
    if r.scaler is not None:
        r.scaler.unscale_(r.optimizer)
    block_norms = block_grad_norms(model) if probing else {}
    grad_norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), r.s.cfg.train.grad_clip or math.inf)
    return losses, grad_norm, (block_norms, probe.results()) if probing else None


def update_or_skip(r: Session, t: torch.Tensor, losses: torch.Tensor, grad_norm: torch.Tensor, done: int) -> None:
    """3. AdamW + EMA update — or skip the step (and count it) if the loss or the gradient is not
    finite: as an fp16 overflow (`faults.is_overflow`: not a bad step), else as a bad step."""
    t_all, losses_all = r.dist.gather(t), r.dist.gather(losses)
    progress, loss_finite = r.progress, bool(torch.isfinite(losses_all).all())
    if loss_finite and bool(torch.isfinite(grad_norm)):
        if r.scaler is not None:
            r.scaler.step(r.optimizer)
        else:
            r.optimizer.step()
        r.ema.update()
        r.s.timestep_sampler.update_with_losses(t_all, losses_all)
        r.window.add(t_all.cpu().numpy(), losses_all.cpu().numpy(), float(grad_norm))
        progress["bad_in_row"] = 0
    elif is_overflow(r.scaler, loss_finite):
        r.optimizer.zero_grad(set_to_none=True)
        progress["overflow_steps"] += 1
        log.info("step %d: fp16 gradient overflow at loss scale %g; step skipped, the scale is lowered", done,
                 r.scaler.get_scale())
    else:
        r.optimizer.zero_grad(set_to_none=True)
        progress["bad_in_row"] += 1
        progress["bad_total"] += 1
        log.warning("step %d: non-finite %s; step skipped (%d in a row)", done,
                    "gradient" if loss_finite else "loss", progress["bad_in_row"])
    if r.scaler is not None:
        r.scaler.update()


def log_window(r: Session, step: int, lr: float, bar: tqdm) -> None:
    """4. Rank 0: a log.csv row and TensorBoard scalars for the steps since the last row."""
    now, done, progress = time.perf_counter(), step + 1, r.progress
    row = {"step": done, "epoch": step // r.s.steps_per_epoch, **r.window.means(), "lr": lr,
           "it_s": r.window_steps / max(now - r.window_start, 1e-9), "bad_steps": progress["bad_total"],
           "overflow_steps": progress["overflow_steps"]}
    r.outputs.log_csv.write(row)
    r.outputs.board.scalars(done, {k: v for k, v in row.items() if k not in ("step", "epoch")})
    if row["loss"] < progress["best_loss"]:
        progress["best_loss"], progress["best_step"] = row["loss"], done
    bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.2e}", bad=progress["bad_total"])
    r.window.reset()
    r.window_start, r.window_steps = now, 0


def stop_if_diverged(r: Session, done: int) -> None:
    """4. After max_bad_steps non-finite steps in a row: checkpoint the last good weights, stop."""
    if r.progress["bad_in_row"] >= r.s.cfg.train.max_bad_steps > 0:
        if r.dist.main:
            save_or_report(r, done, retry_later=False)
        r.dist.barrier()
        raise TrainingDiverged(
            f"training diverged: {r.progress['bad_in_row']} non-finite steps in a row at step {done}; "
            f"last good checkpoint (weights from before them): {r.run_dir / CHECKPOINTS / step_dir_name(done)}")


def checkpoint_and_sample(r: Session, done: int) -> None:
    """4. Rank 0: a checkpoint every save_every steps (and save_every_minutes after the last one), a
    grid of EMA samples every sample_every, and both after the last step."""
    tc, last = r.s.cfg.train, done == r.s.total_steps
    if done % tc.save_every == 0 or last or r.save_timer.due(tc.save_every_minutes):
        save_or_report(r, done, retry_later=not last)
    if done % tc.sample_every == 0 or last:
        slowest = max(tc.ema_rates) if tc.ema_rates else None
        weights = r.ema.shadows[slowest] if slowest else r.s.model.state_dict()
        r.optimizer.zero_grad(set_to_none=True)  # the next step starts from zero anyway: free the memory
        write_sample_grid(r.run_dir / "samples" / f"step_{done:07d}.png", r.s.cfg, r.s.model, weights,
                          r.s.device, r.autocast, r.s.microbatch)


def finish(r: Session) -> dict:
    """Check that every DDP rank ended with the same weights; rank 0 writes summary.json."""
    s, dist, progress = r.s, r.dist, r.progress
    digests = [params_sha256(s.model)]
    if dist.world_size > 1:
        mine = torch.tensor(list(bytes.fromhex(digests[0])), dtype=torch.uint8, device=s.device)
        digests = [bytes(d.tolist()).hex() for d in dist.gather(mine[None])]
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    summary = {
        "steps": s.total_steps, "session_steps": s.total_steps - r.start, "elapsed_s": progress["elapsed_s"],
        "session_s": time.perf_counter() - r.started,
        "best_loss": progress["best_loss"], "best_step": progress["best_step"], "bad_steps": progress["bad_total"],
        "overflow_steps": progress["overflow_steps"],
        "checkpoint": str(r.last_ckpt), "world_size": dist.world_size, "rank_weights_sha256": digests,
        "gpu_peak_gib": torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None,
        "plan_peak_gib": s.plan.chosen.peak / 2**30 if s.plan is not None else None,
        "settings": dataclasses.asdict(s.settings),
    }
    if dist.main:
        r.outputs.close()
        (r.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary
