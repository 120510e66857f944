"""`train-diffusion`: train the stage-2 diffusion U-Net, resumable bit for bit.

    train-diffusion --config configs/tiny-cpu.yaml [--set train.max_steps=800] [--out runs/x]
    train-diffusion --resume runs/x [--set train.max_steps=1600]
    train-diffusion --config configs/hp2-128.yaml --plan [--gpu-memory 15]   (memory plan, no training)
    train-diffusion --config configs/hp2-128.yaml --plan --it-s 0.26       (… and hours at that speed)
    torchrun --nproc_per_node=2 -m pipeline.cli.train_diffusion --config …      (DDP)

Picks the run directory (new, or the one to resume and its newest complete checkpoint), checks
that a resumed run's dataset is the one its checkpoint was trained on, loads the images and runs
`guided_diffusion.training.loop`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np

from guided_diffusion.training.checkpoint import TrainingCheckpoint, latest_checkpoint
from guided_diffusion.training.distributed import init_distributed
from guided_diffusion.training.loop import prepare, train
from guided_diffusion.training.memory_plan import format_plan, plan_for_gpu
from guided_diffusion.training.resume import RESUME_DATA, load_resumable, resume_differences
from guided_diffusion.training.run_hours import format_run_hours, run_hours
from guided_diffusion.training.session import Setup
from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.config import Config, dump_config, load_config
from pipeline.common.devices import pick_torch_device
from pipeline.common.errors import UserError
from pipeline.common.files import write_text_atomic
from pipeline.data.fingerprint import dataset_changes, dataset_fingerprint
from pipeline.data.folders import load_image_array

log = logging.getLogger(__name__)

DEFAULT_OUT = "runs/diffusion"


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
    ckpt = load_resumable(run_dir)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:  # data.allow_change holds for the resume it is given with, not for later ones
        cfg = load_config(ckpt.path / "config.yaml", ["data.allow_change=false", *args.overrides])
    fixed, free = resume_differences(ckpt.cfg, cfg)
    if fixed:
        data = any(line.startswith(RESUME_DATA) for line in fixed)
        raise UserError(f"cannot resume {run_dir}: the config differs from its checkpoint in "
                        f"{'; '.join(fixed)} (only training settings such as max_steps, epochs, lr may change"
                        + ("; --set data.allow_change=true trains on the changed dataset" if data else "") + ")")
    for line in free:
        log.info("resuming with a changed setting: %s", line)
    return cfg, run_dir, ckpt


def check_dataset(run_dir: Path, ckpt: TrainingCheckpoint, fingerprint: dict, allow_change: bool) -> None:
    """UserError unless the dataset is the one `ckpt` was trained on (the same image files, maybe at
    another path) or `allow_change`. A checkpoint without a fingerprint is checked by its image count."""
    saved = ckpt.train_state.get("dataset")
    if saved is None:
        log.warning("%s has no dataset fingerprint (an older checkpoint): only its image count is checked", ckpt.path)
        saved_count = ckpt.train_state.get("num_images")
        changes = [] if saved_count == fingerprint["count"] else [f"{saved_count} → {fingerprint['count']} images"]
    else:
        changes = dataset_changes(saved, fingerprint)
        if not changes and saved["path"] != fingerprint["path"]:
            log.info("data.path moved from %r to %r: the same %d image files (names and sizes); resuming",
                     saved["path"], fingerprint["path"], fingerprint["count"])
    if changes and allow_change:
        log.warning("resuming on a changed dataset (data.allow_change): %s", "; ".join(changes))
    elif changes:
        raise UserError(f"cannot resume {run_dir}: the dataset changed since {ckpt.path.name}: {'; '.join(changes)} "
                        "(--set data.allow_change=true trains on it anyway)")


def checked_loader(cfg: Config, run_dir: Path, ckpt: TrainingCheckpoint | None,
                   fingerprint: dict) -> Callable[[], np.ndarray]:
    """`prepare`'s image loader: fingerprints the dataset into `fingerprint` and, resuming, checks it
    (before any image is decoded), then loads the images."""
    def load() -> np.ndarray:
        fingerprint.update(dataset_fingerprint(cfg.data))
        if ckpt is not None:
            check_dataset(run_dir, ckpt, fingerprint, cfg.data.allow_change)
        return load_image_array(cfg.data)
    return load


def check_resumable(s: Setup, run_dir: Path, ckpt: TrainingCheckpoint) -> None:
    """UserError unless the checkpoint has steps left to train."""
    done = ckpt.train_state["step"]
    if done >= s.total_steps:
        raise UserError(f"{run_dir} has already trained {done} of {s.total_steps} steps; raise "
                        "train.max_steps or train.epochs (--set) to continue")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train-diffusion", description="Train the stage-2 diffusion U-Net.")
    add_config_args(parser, example="train.lr=3e-4")
    parser.add_argument("--out", help=f"run directory to create (default: {DEFAULT_OUT})")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    parser.add_argument("--plan", action="store_true",
                        help="print the GPU memory plan of the config (peak estimate, settings that fit) and exit")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="with --plan: plan for a GPU with this much memory (default: this machine's GPU)")
    parser.add_argument("--it-s", type=float, metavar="STEPS_PER_S",
                        help="with --plan: also print the hours per checkpoint and for the run at this speed "
                        "(optimizer steps per second, log.csv's it_s)")
    return parser.parse_args(argv)


def print_plan(args: argparse.Namespace) -> None:
    """`--plan`: the memory plan of the config (or of the run to resume), without training; with
    `--it-s`, the hours per checkpoint and for the run (what is left of it, resuming) at that speed."""
    done = 0
    if args.resume is not None:
        ckpt = latest_checkpoint(Path(args.resume))
        cfg = load_config(args.config or ckpt / "config.yaml", args.overrides)
        done = int(ckpt.name.removeprefix("step_"))
    else:
        cfg = config_from_args(args)
    plan = plan_for_gpu(cfg, pick_torch_device(args.device), args.gpu_memory)
    print(format_plan(plan, args.config or args.resume or "the default config"))
    if args.it_s is not None:
        tc = cfg.train
        images = dataset_fingerprint(cfg.data)["count"] if tc.epochs > 0 else tc.batch_size  # only epochs need it
        print(format_run_hours(run_hours(args.it_s, tc, images // tc.batch_size, done)))


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `train-diffusion`."""
    args = parse_args(argv)
    if (args.gpu_memory is not None or args.it_s is not None) and not args.plan:
        raise UserError("--gpu-memory and --it-s only go with --plan")
    if args.plan:
        print_plan(args)
        return 0
    dist, device = init_distributed(pick_torch_device(args.device))
    try:
        cfg, run_dir, ckpt = resolve_run(args)
        fingerprint: dict = {}
        s = prepare(cfg, checked_loader(cfg, run_dir, ckpt, fingerprint), device, dist)
        s.dataset = fingerprint
        if ckpt is not None:
            check_resumable(s, run_dir, ckpt)
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
        dist.close()
    if dist.main:
        session = timedelta(seconds=round(summary["session_s"]))
        rate = summary["session_steps"] / max(summary["session_s"], 1e-9)
        print(f"wrote {run_dir} (log.csv, loss.png, samples/, checkpoints/)")
        print(f"trained to step {summary['steps']} ({summary['session_steps']} steps this session in {session}, "
              f"{rate:.2f} it/s); best loss {summary['best_loss']:.4g} at step {summary['best_step']}; "
              f"checkpoint {summary['checkpoint']}"
              + (f"; GPU peak {summary['gpu_peak_gib']:.2f} GiB" if summary["gpu_peak_gib"] is not None else ""))
    return 0


if __name__ == "__main__":
    main()
