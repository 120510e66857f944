"""Diffusion checkpoints: atomic directories of safetensors weights + a weights-only `state.pt`.

Layout of a run directory:

    RUN_DIR/config.yaml                     the resolved config of the run
    RUN_DIR/checkpoints/latest              text file naming the newest complete checkpoint
    RUN_DIR/checkpoints/step_0001000/
        config.yaml                         the config it was trained with
        model.safetensors                   raw weights
        ema_<rate>.safetensors              EMA weights, one file per rate, same keys (train.save_dtype)
        state.pt                            optimizer, grad scaler, timestep sampler, position, RNG
        hashes.json                         sha256 of every file above, checked when loading

A checkpoint is written into a hidden temp directory and `os.replace`d into place, then the
`latest` pointer is replaced the same way, so a crash (or kill -9) at any moment leaves either the
old or the new checkpoint, never half of one. `state.pt` holds only tensors and plain Python
values, so it loads with `torch.load(..., weights_only=True)`.

Model weights and optimizer state are fp32, so a resume is bit-exact for them; the EMA files are
in train.save_dtype (fp16/bf16 halve them, and a resume continues the EMAs from the rounded
values). A run's final checkpoint with train.final_optimizer false has no optimizer state
(`"optimizer": None`) and its model weights in save_dtype too: made for sampling and sharing, it
still resumes, with fresh AdamW moments (`resume.warn_lossy_resume` says so).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from guided_diffusion.training.ema import ema_file_name
from guided_diffusion.training.save_policy import (
    CheckpointSize,
    cast_floats,
    estimate_size,
    format_bytes,
    free_space,
    os_error_behind,
    warn_if_short_of_space,
)
from pipeline.common.config import Config, dump_config, load_config
from pipeline.common.errors import UserError
from pipeline.common.files import fsync_file, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
HASHES_FILE = "hashes.json"
HASHES_BYTES = 512  # about the size of hashes.json (for size estimates)

def step_dir_name(step: int) -> str:
    """`step_0001000` for step 1000."""
    return f"step_{step:07d}"


# ----------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Every global RNG state (torch CPU, CUDA, NumPy, Python) as weights-only-loadable values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    """Undo `capture_rng_state` (CUDA states only when the same number of devices is present)."""
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] and torch.cuda.is_available() and len(state["torch_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------------------------------- save


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, I/O error, no permission). Its temp files are
    gone; the checkpoints written before it and `latest` are as they were."""


def save_checkpoint(run_dir: Path, step: int, cfg: Config, model_state: dict[str, torch.Tensor],
                    ema_states: dict[float, dict[str, torch.Tensor]], train_state: dict,
                    keep_last: int, model_dtype: str = "fp32", ema_dtype: str = "fp32") -> Path:
    """Write `RUN_DIR/checkpoints/step_XXXXXXX/` atomically, point `latest` at it, prune old ones.

    `keep_last` ≤ 0 keeps every checkpoint; the old ones are removed only after the new one is
    complete, so even `keep_last` 1 always leaves one. Floating-point weights are written in
    `model_dtype` / `ema_dtype` (train.save_dtype names). Warns first when the disk looks too full
    for it; logs its size after. Returns the checkpoint directory.

    Whatever stops it (a full disk, an I/O error, a second Ctrl-C), what it wrote is removed and
    the earlier checkpoints and `latest` stay as they were; a write error is raised as
    `CheckpointWriteError`, naming the checkpoint's size and the free space.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    config_text = dump_config(cfg)
    needed = estimate_size(model_state, ema_states, train_state, model_dtype, ema_dtype,
                           len(config_text) + HASHES_BYTES)
    tmp, placed = root / f".{final.name}.tmp", False
    try:
        root.mkdir(parents=True, exist_ok=True)
        warn_if_short_of_space(root, final.name, needed)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_files(tmp, step, config_text, model_state, ema_states, train_state, model_dtype, ema_dtype)
        if final.exists():  # re-saving a step (a resume after a crash between save and `latest`)
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        placed = True
        write_text_atomic(root / LATEST, final.name + "\n")
    except BaseException as exc:
        shutil.rmtree(final if placed else tmp, ignore_errors=True)  # `latest` still names the one before
        cause = os_error_behind(exc)
        if cause is None:
            raise
        raise CheckpointWriteError(
            f"could not write checkpoint {final} ({cause.strerror or cause}): it needs about "
            f"{format_bytes(needed.total)}, {format_bytes(free_space(root))} is free there") from exc
    _prune(root, keep_last, keep=final)
    log.info("checkpoint %s: %s", final.name, checkpoint_size(final).describe())
    return final


def _write_files(tmp: Path, step: int, config_text: str, model_state: dict[str, torch.Tensor],
                 ema_states: dict[float, dict[str, torch.Tensor]], train_state: dict, model_dtype: str,
                 ema_dtype: str) -> None:
    """A checkpoint's files into `tmp`, synced, with `hashes.json` last."""
    meta = {"step": str(step)}
    (tmp / CONFIG_FILE).write_text(config_text)
    save_file(cast_floats(model_state, model_dtype), str(tmp / MODEL_FILE), metadata=meta)
    for rate, shadow in ema_states.items():
        save_file(cast_floats(shadow, ema_dtype), str(tmp / ema_file_name(rate)),
                  metadata={**meta, "ema_rate": repr(rate)})
    with open(tmp / STATE_FILE, "wb") as f:  # a Python file: a failed write leaves its OSError as the context
        torch.save(train_state, f)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for path in files:
        fsync_file(path)
    (tmp / HASHES_FILE).write_text(json.dumps({p.name: sha256_file(p) for p in files}, indent=1))
    fsync_file(tmp / HASHES_FILE)


def checkpoint_size(ckpt_dir: Path) -> CheckpointSize:
    """The sizes of a written checkpoint's files."""
    return CheckpointSize((ckpt_dir / MODEL_FILE).stat().st_size,
                          [(ckpt_dir / ema_file_name(r)).stat().st_size for r in saved_ema_rates(ckpt_dir)],
                          (ckpt_dir / STATE_FILE).stat().st_size,
                          sum(p.stat().st_size for p in ckpt_dir.iterdir() if p.is_file()))


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    dirs = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    for stale in root.glob(".step_*"):
        if stale.is_dir() and stale != keep:
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    for old in step_dirs(root)[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------- find


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint named by `RUN_DIR/checkpoints/latest` (else the highest step directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    root = run_dir / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.name.startswith("step_") and named.is_dir():
            return named
        log.warning("%s names a missing checkpoint; using the highest step directory", pointer)
    dirs = step_dirs(root) if root.is_dir() else []
    if not dirs:
        raise UserError(f"no checkpoint found in {run_dir} (expected {root}/step_XXXXXXX/)")
    return dirs[-1]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / MODEL_FILE).is_file() or (path / STATE_FILE).is_file():
        return path
    return latest_checkpoint(path)


def saved_ema_rates(ckpt_dir: Path) -> list[float]:
    """The EMA rates with a weights file in `ckpt_dir`, ascending."""
    rates = []
    for path in ckpt_dir.glob("ema_*.safetensors"):
        try:
            rates.append(float(path.name[len("ema_"):-len(".safetensors")]))
        except ValueError:
            continue
    return sorted(rates)


# ---------------------------------------------------------------------------------------- load


class CheckpointDamaged(UserError):
    """A checkpoint file is missing, truncated, or does not match its sha256."""


def _corrupt(ckpt_dir: Path, name: str, why: str) -> CheckpointDamaged:
    return CheckpointDamaged(f"checkpoint {ckpt_dir} is corrupt or truncated ({name}: {why})")


def _check_hash(ckpt_dir: Path, name: str) -> str:
    """The file's sha256, checked against `hashes.json` when present."""
    path = ckpt_dir / name
    if not path.is_file():
        raise CheckpointDamaged(f"checkpoint {ckpt_dir} is incomplete: {name} is missing")
    digest = sha256_file(path)
    hashes_path = ckpt_dir / HASHES_FILE
    if hashes_path.is_file():
        try:
            expected = json.loads(hashes_path.read_text()).get(name)
        except (json.JSONDecodeError, AttributeError):
            raise _corrupt(ckpt_dir, HASHES_FILE, "not valid JSON") from None
        if expected is not None and expected != digest:
            raise _corrupt(ckpt_dir, name, "sha256 does not match hashes.json")
    return digest


def read_weights(ckpt_dir: Path, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """Load one safetensors file of a checkpoint (CPU) and its sha256; corrupt → `UserError`."""
    digest = _check_hash(ckpt_dir, name)
    try:
        return load_file(str(ckpt_dir / name), device="cpu"), digest
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise _corrupt(ckpt_dir, name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def read_train_state(ckpt_dir: Path) -> dict:
    """Load `state.pt` with `weights_only=True`; corrupt → `UserError`."""
    _check_hash(ckpt_dir, STATE_FILE)
    try:
        return torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unsafe global …
        raise _corrupt(ckpt_dir, STATE_FILE, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def read_config(ckpt_dir: Path) -> Config:
    """The config saved in a checkpoint (its sha256 checked against `hashes.json` when present)."""
    _check_hash(ckpt_dir, CONFIG_FILE)
    return load_config(ckpt_dir / CONFIG_FILE)


@dataclass
class TrainingCheckpoint:
    """Everything needed to continue training from a checkpoint."""

    path: Path
    cfg: Config
    model_state: dict[str, torch.Tensor]
    ema_states: dict[float, dict[str, torch.Tensor]]
    train_state: dict


def load_training_checkpoint(ckpt_dir: Path) -> TrainingCheckpoint:
    """Read a whole checkpoint for `--resume` (tensors on CPU)."""
    cfg = read_config(ckpt_dir)
    model_state, _ = read_weights(ckpt_dir, MODEL_FILE)
    emas = {}
    for rate in cfg.train.ema_rates:
        emas[float(rate)], _ = read_weights(ckpt_dir, ema_file_name(rate))
    return TrainingCheckpoint(ckpt_dir, cfg, model_state, emas, read_train_state(ckpt_dir))


def load_for_inference(run_or_ckpt_dir: str | Path, ema_rate: float | None = None,
                       device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """Build the U-Net of a run or checkpoint directory with its saved weights, in eval mode.

    `ema_rate`: None → the slowest (largest) EMA rate saved, 0 → the raw model weights, else that
    rate. Returns (model, config, info) where info has `checkpoint`, `step`, `weights` (file name),
    `ema_rate` (0.0 for raw weights) and `sha256` of that file. A damaged checkpoint is an error
    (never a silent fall-back to older weights); for a run directory it names the older checkpoints.
    """
    ckpt = resolve_checkpoint(run_or_ckpt_dir)
    try:
        return _load_for_inference(ckpt, ema_rate, device)
    except CheckpointDamaged as exc:
        dirs = step_dirs(ckpt.parent) if ckpt != Path(run_or_ckpt_dir) else []
        older = dirs[: dirs.index(ckpt)] if ckpt in dirs else []
        if not older:
            raise
        raise UserError(f"{exc}; older checkpoints of this run: {', '.join(p.name for p in older[::-1])} "
                        f"(give one's folder, e.g. {older[-1]}, to sample from it)") from None


def _load_for_inference(ckpt: Path, ema_rate: float | None, device: str | torch.device,
                        ) -> tuple[torch.nn.Module, Config, dict]:
    from guided_diffusion.training.factory import create_model

    cfg = read_config(ckpt)
    rates = saved_ema_rates(ckpt)
    rate = (rates[-1] if rates else 0.0) if ema_rate is None else float(ema_rate)
    if rate == 0.0:
        name = MODEL_FILE
    else:
        match = [r for r in rates if abs(r - rate) < 1e-12]
        if not match:
            have = ", ".join(repr(r) for r in rates) or "none"
            raise UserError(f"checkpoint {ckpt} has no EMA rate {rate!r} (saved: {have}; 0 = raw weights)")
        rate, name = match[0], ema_file_name(match[0])
    state, digest = read_weights(ckpt, name)
    model = create_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {ckpt}/{name} does not fit the model of its config.yaml: "
                        f"{str(exc).splitlines()[0]}") from None
    with safe_open(str(ckpt / name), framework="pt") as f:
        step = int((f.metadata() or {}).get("step", ckpt.name[5:] if ckpt.name[5:].isdigit() else -1))
    model.to(device).eval()
    info = {"checkpoint": str(ckpt), "step": step, "weights": name, "ema_rate": rate, "sha256": digest}
    return model, cfg, info
