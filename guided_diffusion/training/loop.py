"""`train-diffusion`: train the stage-2 diffusion U-Net, resumable bit for bit.

    train-diffusion --config configs/tiny-cpu.yaml [--set train.max_steps=800] [--out runs/x]
    train-diffusion --resume runs/x [--set train.max_steps=1600]
    torchrun --nproc_per_node=2 -m guided_diffusion.training.loop --config …      (DDP)

One optimizer step (`train`, read it top to bottom): pick the step's images, timesteps and noise
→ micro-batched forward/backward → unscale, clip, check finite → AdamW + EMA update, or skip the
step if anything is NaN/Inf → log, probe, checkpoint, sample.

Randomness: everything a step draws (its timesteps, noise, and the global torch RNG used by
dropout) is seeded from (train.seed, rank, step), and the data order of an epoch from
(train.seed, epoch). So a run resumed at step s on any rank draws exactly what the
uninterrupted run drew; the global RNG states are saved and restored as well for anything else.

`train.batch_size` is the global batch: under DDP each of W processes takes a disjoint B/W slice
of every batch, so a config means the same optimisation on one GPU or several.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from guided_diffusion import samplers
from guided_diffusion.timestep_sampler import create_timestep_sampler
from guided_diffusion.training.checkpoint import (
    CHECKPOINTS,
    TrainingCheckpoint,
    capture_rng_state,
    latest_checkpoint,
    load_training_checkpoint,
    restore_rng_state,
    resume_differences,
    save_checkpoint,
    step_dir_name,
    write_text_atomic,
)
from guided_diffusion.training.ema import EMA
from guided_diffusion.training.factory import create_diffusion, create_model
from guided_diffusion.training.logs import (
    LOG_FIELDS,
    STATS_FIELDS,
    CsvLog,
    LossWindow,
    TensorBoard,
    plot_losses,
)
from guided_diffusion.training.lr_schedule import check_schedule, lr_at
from guided_diffusion.training.stats import ActivationProbe, block_grad_norms, health_rows
from guided_diffusion.training.step import (
    autocast_for,
    check_batching,
    forward_backward,
    grad_scaler_for,
    resolve_precision,
)
from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.batches import epoch_permutation, flip_mask
from pipeline.common.config import Config, TrainConfig, dump_config, load_config
from pipeline.common.devices import pick_torch_device
from pipeline.common.errors import UserError
from pipeline.common.images import make_grid, write_png
from pipeline.data.folders import load_image_array

log = logging.getLogger(__name__)

DEFAULT_OUT = "runs/diffusion"


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; a final checkpoint of the last good weights was saved."""


@dataclass
class Dist:
    """This process's place in a (possibly single-process) DDP job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized tensors of every rank along dim 0 (x itself when alone)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)


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
    microbatch: int  # per process
    steps_per_epoch: int
    total_steps: int


# ------------------------------------------------------------------------------ small helpers


def total_steps(tc: TrainConfig, steps_per_epoch: int) -> int:
    """Steps to train: max_steps or epochs × steps_per_epoch, whichever comes first."""
    if tc.max_steps < 0 or tc.epochs < 0:
        raise UserError("train.max_steps and train.epochs must be >= 0")
    limits = [n for n in (tc.max_steps, tc.epochs * steps_per_epoch) if n > 0]
    if not limits:
        raise UserError("set train.max_steps or train.epochs (both are 0)")
    return min(limits)


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
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def write_sample_grid(path: Path, cfg: Config, sample_model: nn.Module, ema_state: dict, device: torch.device,
                      autocast) -> None:
    """A grid of `sample_count` samples of the EMA weights, always from the same seed."""
    sample_model.load_state_dict(ema_state)
    sample_model.eval()
    diffusion = create_diffusion(cfg, respacing=str(cfg.train.sample_steps))
    shape = (cfg.train.sample_count, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    with autocast():
        x = samplers.sample(sample_model, diffusion, shape, sampler="ddim", generator=generator, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, make_grid(x.float().clamp(-1, 1).cpu().numpy()))


# ------------------------------------------------------------------------------------- set-up


def prepare(cfg: Config, device: torch.device, dist: Dist) -> Setup:
    """Check every setting, load the data and build the networks; `UserError` on bad input."""
    tc = cfg.train
    check_schedule(tc)
    microbatch = check_batching(tc.batch_size, tc.microbatch, dist.world_size)
    precision = resolve_precision(tc.precision, device)
    if tc.seed < 0:
        raise UserError(f"train.seed must be >= 0, got {tc.seed}")
    if any(not 0.0 < r < 1.0 for r in tc.ema_rates) or len(set(tc.ema_rates)) != len(tc.ema_rates):
        raise UserError(f"train.ema_rates must be distinct values in (0, 1), got {tc.ema_rates}")
    for key in ("log_every", "save_every", "sample_every", "stats_every", "sample_count", "sample_steps"):
        if getattr(tc, key) < 1:
            raise UserError(f"train.{key} must be >= 1, got {getattr(tc, key)}")
    if tc.sample_steps > cfg.diffusion.steps:
        raise UserError(f"train.sample_steps {tc.sample_steps} exceeds diffusion.steps {cfg.diffusion.steps}")
    array = load_image_array(cfg.data)
    if len(array) < tc.batch_size:
        raise UserError(f"the dataset has {len(array)} images, fewer than one batch (train.batch_size {tc.batch_size})")
    steps_per_epoch = len(array) // tc.batch_size
    total = total_steps(tc, steps_per_epoch)
    torch.manual_seed(tc.seed)  # the initial weights
    model = create_model(cfg).to(device)
    diffusion = create_diffusion(cfg)
    timestep_sampler = create_timestep_sampler(cfg.diffusion.timestep_sampler, diffusion)
    return Setup(cfg, device, precision, torch.tensor(array), model, diffusion, timestep_sampler, microbatch,
                 steps_per_epoch, total)


# -------------------------------------------------------------------------------------- train


def train(s: Setup, run_dir: Path, dist: Dist, resume: TrainingCheckpoint | None = None) -> dict:
    """Train `s.model` from scratch or from `resume`, writing into `run_dir` (rank 0). Returns a summary."""
    cfg, tc, model, device = s.cfg, s.cfg.train, s.model, s.device
    autocast, scaler = autocast_for(s.precision, device), grad_scaler_for(s.precision, device)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.adam_betas),
                                  weight_decay=tc.weight_decay)
    ema = EMA(model, tc.ema_rates, tc.ema_warmup)
    progress = {"best_loss": math.inf, "best_step": 0, "bad_total": 0, "bad_in_row": 0, "elapsed_s": 0.0}
    start = 0
    if resume is not None:
        state = resume.train_state
        model.load_state_dict(resume.model_state)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # settings from the (possibly edited) config win
            group.update(betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
        for rate, shadow in resume.ema_states.items():
            ema.load_shadow(rate, shadow)
        ema.num_updates = state["ema_num_updates"]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        s.timestep_sampler.load_state_dict(state["timestep_sampler"])
        restore_rng_state(state["rng"])
        progress.update(state["progress"])
        if progress["bad_in_row"] >= tc.max_bad_steps:  # it stopped for divergence: count afresh
            progress["bad_in_row"] = 0
        start = state["step"]
    net = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Outputs: rank 0 writes everything.
    slowest = max(tc.ema_rates) if tc.ema_rates else None
    if dist.main:
        log_csv = CsvLog(run_dir / "log.csv", LOG_FIELDS, resume_step=start if resume else None)
        stats_csv = CsvLog(run_dir / "stats.csv", STATS_FIELDS, resume_step=start if resume else None)
        board = TensorBoard(run_dir / "tensorboard", purge_step=start if resume else None)
        sample_model = create_model(cfg).to(device)
    window = LossWindow(s.diffusion.num_timesteps)
    per_rank = tc.batch_size // dist.world_size
    last_ckpt = resume.path if resume else None

    def save(done: int) -> Path:
        train_state = {
            "step": done, "epoch": done // s.steps_per_epoch, "batch_in_epoch": done % s.steps_per_epoch,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "timestep_sampler": s.timestep_sampler.state_dict(), "ema_num_updates": ema.num_updates,
            "rng": capture_rng_state(), "progress": dict(progress), "num_images": len(s.images),
            "world_size": dist.world_size, "torch_version": str(torch.__version__),
        }
        path = save_checkpoint(run_dir, done, cfg, model.state_dict(), ema.shadows, train_state, tc.keep_last)
        log_csv.flush()
        stats_csv.flush()
        plot_losses(run_dir / "log.csv", run_dir / "loss.png")
        return path

    train_start = accounted_at = window_start = time.perf_counter()
    window_steps = 0
    with logging_redirect_tqdm(), tqdm(total=s.total_steps, initial=start, desc="train", unit="step",
                                       dynamic_ncols=True, disable=not dist.main) as bar:
        for step in range(start, s.total_steps):
            done = step + 1
            epoch, index = divmod(step, s.steps_per_epoch)

            # 1. This step's images, timesteps and noise — all seeded from (seed, rank, step).
            generator = torch.Generator().manual_seed(step_seed(tc.seed, dist.rank, step, 0))
            torch.manual_seed(step_seed(tc.seed, dist.rank, step, 1))  # dropout
            idx, flips = batch_indices(len(s.images), tc.batch_size, tc.seed, epoch, index, dist, cfg.data.hflip)
            x = load_batch(s.images, idx, flips, device)
            t, weights = s.timestep_sampler.sample(per_rank, device, generator=generator)
            noise = torch.randn(x.shape, generator=generator).to(device)
            lr = lr_at(step, s.steps_per_epoch, s.total_steps, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 2. Gradient of mean(w · loss) over the batch, in micro-batches.
            optimizer.zero_grad(set_to_none=True)
            probing = dist.main and done % tc.stats_every == 0
            probe = ActivationProbe(model) if probing else nullcontext()
            with probe:
                losses = forward_backward(net, s.diffusion, x, t, weights, noise, s.microbatch, autocast, scaler)
            if scaler is not None:
                scaler.unscale_(optimizer)
            block_norms = block_grad_norms(model) if probing else {}
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or math.inf)

            # 3. Update — or skip the step if the loss or the gradient is not finite.
            t_all, losses_all = dist.gather(t), dist.gather(losses)
            good = bool(torch.isfinite(losses_all).all()) and bool(torch.isfinite(grad_norm))
            if good:
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
                ema.update()
                s.timestep_sampler.update_with_losses(t_all, losses_all)
                window.add(t_all.cpu().numpy(), losses_all.cpu().numpy(), float(grad_norm))
                progress["bad_in_row"] = 0
            else:
                optimizer.zero_grad(set_to_none=True)
                progress["bad_in_row"] += 1
                progress["bad_total"] += 1
                log.warning("step %d: non-finite %s; step skipped (%d in a row)", done,
                            "loss" if not torch.isfinite(losses_all).all() else "gradient", progress["bad_in_row"])
            if scaler is not None:
                scaler.update()
            window_steps += 1
            bar.update(1)

            # 4. Logs, health probes, checkpoints, samples (rank 0).
            if dist.main and (done % tc.log_every == 0 or done == s.total_steps):
                now = time.perf_counter()
                row = {"step": done, "epoch": epoch, **window.means(), "lr": lr,
                       "it_s": window_steps / max(now - window_start, 1e-9), "bad_steps": progress["bad_total"]}
                log_csv.write(row)
                board.scalars(done, {k: v for k, v in row.items() if k not in ("step", "epoch")})
                if row["loss"] < progress["best_loss"]:
                    progress["best_loss"], progress["best_step"] = row["loss"], done
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.2e}", bad=progress["bad_total"])
                window.reset()
                window_start, window_steps = now, 0
            if probing:
                stats_csv.write_rows(health_rows(done, block_norms, probe.results()))
            if progress["bad_in_row"] >= tc.max_bad_steps > 0:
                if dist.main:
                    save(done)
                dist.barrier()
                raise TrainingDiverged(
                    f"training diverged: {progress['bad_in_row']} non-finite steps in a row at step {done}; "
                    f"last good checkpoint (weights from before them): {run_dir / CHECKPOINTS / step_dir_name(done)}")
            if dist.main and (done % tc.save_every == 0 or done == s.total_steps):
                progress["elapsed_s"] += time.perf_counter() - accounted_at
                accounted_at = time.perf_counter()
                last_ckpt = save(done)
            if dist.main and (done % tc.sample_every == 0 or done == s.total_steps):
                weights_for_grid = ema.shadows[slowest] if slowest else model.state_dict()
                write_sample_grid(run_dir / "samples" / f"step_{done:07d}.png", cfg, sample_model, weights_for_grid,
                                  device, autocast)

    # Under DDP, check that every rank ended with the same weights.
    digests = [params_sha256(model)]
    if dist.world_size > 1:
        mine = torch.tensor(list(bytes.fromhex(digests[0])), dtype=torch.uint8, device=device)
        digests = [bytes(d.tolist()).hex() for d in dist.gather(mine[None])]
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    summary = {
        "steps": s.total_steps, "session_steps": s.total_steps - start, "elapsed_s": progress["elapsed_s"],
        "session_s": time.perf_counter() - train_start,
        "best_loss": progress["best_loss"], "best_step": progress["best_step"], "bad_steps": progress["bad_total"],
        "checkpoint": str(last_ckpt), "world_size": dist.world_size, "rank_weights_sha256": digests,
    }
    if dist.main:
        for f in (log_csv, stats_csv, board):
            f.close()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary


# ---------------------------------------------------------------------------------------- CLI


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun job when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "mps":
        raise UserError("DDP is not supported on MPS; run one process or use --device cpu")
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return Dist(rank, world_size, local_rank), device


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path, TrainingCheckpoint | None]:
    """The config, run directory and (when resuming) checkpoint named by the command line."""
    if args.resume is None:
        run_dir = Path(args.out or DEFAULT_OUT)
        if run_dir.exists() and not args.overwrite:
            raise UserError(f"run directory '{run_dir}' already exists; pass --resume {run_dir} to continue it "
                            "or --overwrite to start again")
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"output '{run_dir}' exists and is not a directory")
        return config_from_args(args), run_dir, None
    run_dir = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise UserError("--resume continues in the run directory itself; drop --out (or give the same path)")
    if args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    ckpt = load_training_checkpoint(latest_checkpoint(run_dir))
    cfg = load_config(args.config or ckpt.path / "config.yaml", args.overrides)
    fixed, free = resume_differences(ckpt.cfg, cfg)
    if fixed:
        raise UserError(f"cannot resume {run_dir}: the config differs from its checkpoint in "
                        f"{'; '.join(fixed)} (only training settings such as max_steps, epochs, lr may change)")
    for line in free:
        log.info("resuming with a changed setting: %s", line)
    return cfg, run_dir, ckpt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train-diffusion", description="Train the stage-2 diffusion U-Net.")
    add_config_args(parser)
    parser.add_argument("--out", help=f"run directory to create (default: {DEFAULT_OUT})")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `train-diffusion`."""
    args = parse_args(argv)
    dist, device = init_distributed(pick_torch_device(args.device))
    try:
        cfg, run_dir, ckpt = resolve_run(args)
        s = prepare(cfg, device, dist)
        if ckpt is not None:
            done = ckpt.train_state["step"]
            if ckpt.train_state.get("num_images") != len(s.images):
                raise UserError(f"cannot resume {run_dir}: the dataset now has {len(s.images)} images, "
                                f"the checkpoint was trained on {ckpt.train_state.get('num_images')}")
            if done >= s.total_steps:
                raise UserError(f"{run_dir} has already trained {done} of {s.total_steps} steps; raise "
                                "train.max_steps or train.epochs (--set) to continue")
        dist.barrier()  # every rank has checked the run directory before rank 0 changes it
        if dist.main:
            if ckpt is None and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
            where = f"resuming at step {ckpt.train_state['step']}" if ckpt else "starting"
            log.info("train-diffusion: %s, %d steps on %s (%s, %d process%s) → %s", where, s.total_steps, device,
                     s.precision, dist.world_size, "es" if dist.world_size > 1 else "", run_dir)
        dist.barrier()
        summary = train(s, run_dir, dist, ckpt)
    finally:
        if dist.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    if dist.main:
        session = timedelta(seconds=round(summary["session_s"]))
        rate = summary["session_steps"] / max(summary["session_s"], 1e-9)
        print(f"wrote {run_dir} (log.csv, loss.png, samples/, checkpoints/)")
        print(f"trained to step {summary['steps']} ({summary['session_steps']} steps this session in {session}, "
              f"{rate:.2f} it/s); best loss {summary['best_loss']:.4g} at step {summary['best_step']}; "
              f"checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    main()
