"""`--resume`: the newest complete checkpoint of a run, falling back past damage to older ones,
and the rules of what a resumed run may change (RESUME_FIXED, resume_differences).

A checkpoint is complete when its `hashes.json` is there and every file it lists is present,
matches its sha256 and parses (config, model and EMA weights, `state.pt`). The newest is the one
`RUN_DIR/checkpoints/latest` names (else the highest step). When it is damaged (a Drive sync cut
short, a disk that filled up while copying, a file edited or deleted), the older ones are tried,
newest first; the warning names each damaged checkpoint, why, and how many steps will be trained
again. Checkpoints newer than the one `latest` names are never tried: `latest` moves only once a
checkpoint is complete, so they are leftovers (the run re-saves their steps anyway).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from guided_diffusion.training.checkpoint import (
    CHECKPOINTS,
    HASHES_FILE,
    LATEST,
    CheckpointDamaged,
    TrainingCheckpoint,
    load_training_checkpoint,
    step_dirs,
)
from guided_diffusion.training.save_policy import SAVE_DTYPES
from pipeline.common.config import Config, config_to_dict
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

# Settings a resumed run must share with its checkpoint: they define the network, the diffusion
# process, or the data order. Everything else in `train` (limits, lr, logging …) may change.
RESUME_FIXED = (
    "model.", "diffusion.", "data.image_size", "data.channels", "data.seed", "data.synthetic_count",
    "data.synthetic_defects", "data.hflip", "train.batch_size", "train.seed", "train.ema_rates",
)
RESUME_DATA = ("data.seed", "data.synthetic_count", "data.synthetic_defects")  # the dataset: free with data.allow_change
RESUME_IGNORED = ("vae.", "generate.", "circularity.")
RESUME_FREE = ("model.use_checkpoint",)  # memory only: the same weights, the same arithmetic


def _step(name: str) -> int | None:
    """1000 for 'step_0001000'; None for any other name."""
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoint directories to try, newest first: the one `latest` names (even when it is
    missing), then the older ones; without a usable `latest`, every one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    root = run_dir / CHECKPOINTS
    newest_first = step_dirs(root)[::-1] if root.is_dir() else []
    pointer = root / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if _step(named) is None:
        if named:
            log.warning("%s names no checkpoint (%r); trying every step directory, newest first", pointer, named)
        return newest_first
    return [root / named] + [p for p in newest_first if _step(p.name) < _step(named)]


def load_verified(ckpt_dir: Path) -> TrainingCheckpoint:
    """Read a whole checkpoint, every file checked against `hashes.json`; `UserError` saying what
    is wrong otherwise."""
    if not ckpt_dir.is_dir():
        raise CheckpointDamaged(f"checkpoint {ckpt_dir} is missing")
    if not (ckpt_dir / HASHES_FILE).is_file():
        raise CheckpointDamaged(f"checkpoint {ckpt_dir} is incomplete: {HASHES_FILE} is missing")
    return load_training_checkpoint(ckpt_dir)  # checks each file's sha256 as it reads it


def _why(ckpt_dir: Path, exc: Exception) -> str:
    """'step_0001000 is corrupt or truncated (…)' from an error about `ckpt_dir`."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    prefix = f"checkpoint {ckpt_dir} "
    return ckpt_dir.name + (" " + text[len(prefix):] if text.startswith(prefix) else f": {text}")


def load_resumable(run_dir: str | Path) -> TrainingCheckpoint:
    """The newest complete checkpoint of `run_dir`, warning about each newer damaged one; a
    one-line `UserError` listing them when none is complete."""
    damaged: list[tuple[Path, str]] = []
    for path in resume_candidates(run_dir):
        try:
            ckpt = load_verified(path)
        except (UserError, OSError) as exc:
            damaged.append((path, _why(path, exc)))
            continue
        if damaged:
            lost = _step(damaged[0][0].name) - ckpt.train_state["step"]
            log.warning("resuming from %s: the newer %s; %d step%s will be trained again", ckpt.path,
                        "; ".join(why for _, why in damaged), lost, "" if lost == 1 else "s")
        return ckpt
    if not damaged:
        root = Path(run_dir) / CHECKPOINTS
        raise UserError(f"no checkpoint found in {run_dir} (expected {root}/step_XXXXXXX/)")
    raise UserError(f"cannot resume {run_dir}: no complete checkpoint ({'; '.join(why for _, why in damaged)})")


# ------------------------------------------------------------------------------ resume rules


def warn_lossy_resume(ckpt: TrainingCheckpoint, resolved: dict[str, str] | None = None) -> None:
    """Log what a resume from `ckpt` cannot restore exactly: weights saved in half precision, no
    optimizer state (a final checkpoint of train.final_optimizer false), or kernels other than the
    checkpoint's steps ran: `resolved` ({"precision": …, "conv_algorithm": …}, what this session's
    `auto` settings chose) against the checkpoint's (a speed verdict re-timed after its cache was
    deleted, another thread count or machine, or a setting changed)."""
    before = ckpt.train_state.get("resolved") or {}  # older checkpoints did not record it
    changed = [f"{key} {before[key]} → {now}" for key, now in (resolved or {}).items()
               if key in before and before[key] != now]
    if changed:
        log.warning("resuming: the checkpoint's steps ran with other kernels than these will (%s), so the run "
                    "is not bit-exact from here; set train.precision / model.conv_algorithm to the checkpoint's "
                    "to keep it", "; ".join(changed))
    names = {dtype: name for name, dtype in SAVE_DTYPES.items()}

    def half(state: dict[str, torch.Tensor]) -> str | None:
        dtypes = {names.get(v.dtype, str(v.dtype)) for v in state.values() if v.is_floating_point()} - {"fp32"}
        return ", ".join(sorted(dtypes)) or None

    emas = {half(s) for s in ckpt.ema_states.values()} - {None}
    if emas:
        log.warning("resuming: the EMA weights of %s are saved in %s; the EMAs continue from those rounded values",
                    ckpt.path, ", ".join(sorted(emas)))
    if half(ckpt.model_state):
        log.warning("resuming: the model weights of %s are saved in %s; training continues from those rounded "
                    "values", ckpt.path, half(ckpt.model_state))
    if ckpt.train_state.get("optimizer") is None:
        log.warning("resuming: %s has no optimizer state (saved with train.final_optimizer false); AdamW starts "
                    "with fresh moments, so the run is not bit-exact from here", ckpt.path)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_differences(saved: Config, new: Config) -> tuple[list[str], list[str]]:
    """(fixed keys that differ → cannot resume, other differing keys), each as 'key: old → new'.
    With `new.data.allow_change` the keys that define the dataset (RESUME_DATA) are free."""
    old, cur = _flatten(config_to_dict(saved)), _flatten(config_to_dict(new))
    free_keys = RESUME_FREE + (RESUME_DATA if new.data.allow_change else ())
    fixed, free = [], []
    for key in cur:
        if old.get(key) == cur[key] or key.startswith(RESUME_IGNORED):
            continue
        line = f"{key}: {old.get(key)!r} → {cur[key]!r}"
        (fixed if key.startswith(RESUME_FIXED) and key not in free_keys else free).append(line)
    return fixed, free
