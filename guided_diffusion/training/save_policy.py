"""What a checkpoint costs and when one is due: the dtype its weights are written in, its size
(estimated before writing, measured after), the free-space check, what a failed write was, and the
save-every-minutes timer.

Sizes of an HP2 checkpoint (374 M parameters, two EMA rates): model 1.39 GiB, each EMA 1.39 GiB in
fp32 or 0.70 GiB in fp16/bf16, AdamW state 2.79 GiB. A save needs room for the new checkpoint while
the old ones still exist (they are pruned only after the new one is complete).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline.common.config import TrainConfig
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Bytes a file holds besides the tensors' own bytes (measured on the U-Net's files):
ST_TENSOR_OVERHEAD = 64  # safetensors: each tensor's JSON header entry, besides its name
ST_FIXED_OVERHEAD = 256  # safetensors: header length, metadata
PT_TENSOR_OVERHEAD = 195  # torch.save: each tensor's zip entry, 64-byte alignment, pickle record
PT_FIXED_OVERHEAD = 5400  # torch.save: pickled Python values (RNG states, counters), zip directory


ON_SAVE_ERROR = ("stop", "warn")


def check_save_settings(tc: TrainConfig) -> None:
    """UserError unless train.save_dtype and train.on_save_error are known and train.save_every_minutes is >= 0."""
    save_dtype(tc.save_dtype)
    if tc.save_every_minutes < 0:
        raise UserError(f"train.save_every_minutes must be >= 0 (0 = off), got {tc.save_every_minutes}")
    if tc.on_save_error not in ON_SAVE_ERROR:
        raise UserError(f"train.on_save_error must be one of {', '.join(ON_SAVE_ERROR)}, got {tc.on_save_error!r}")


def save_dtype(name: str) -> torch.dtype:
    """The torch dtype of a train.save_dtype value; UserError naming the valid ones."""
    if name not in SAVE_DTYPES:
        raise UserError(f"train.save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {name!r}")
    return SAVE_DTYPES[name]


def cast_floats(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, contiguous, floating ones in `dtype` (a train.save_dtype name)."""
    to = save_dtype(dtype)
    return {k: (v.detach().to(to) if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state.items()}


# ---------------------------------------------------------------------------------------- size


def _unit(n: int) -> tuple[str, int]:
    """The largest binary unit not above `n` bytes (at least bytes)."""
    return next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= s), ("B", 1))


def format_bytes(n: int) -> str:
    """`5.58 GiB`, `812.31 KiB`, `0.00 B`."""
    unit, size = _unit(n)
    return f"{n / size:.2f} {unit}"


@dataclass
class CheckpointSize:
    """Bytes of a checkpoint's files: model, each EMA (ascending rate), state.pt, and all of it."""

    model: int
    emas: list[int]
    state: int
    total: int

    def describe(self) -> str:
        """`5.58 GiB (model 1.39, ema 2×0.70, state 2.79)`: every part in the total's unit."""
        unit, size = _unit(self.total)
        parts = [f"model {self.model / size:.2f}"]
        if self.emas:  # the same tensors in each: their sizes differ by a few header bytes at most
            parts.append(f"ema {len(self.emas)}×{sum(self.emas) / len(self.emas) / size:.2f}")
        parts.append(f"state {self.state / size:.2f}")
        return f"{self.total / size:.2f} {unit} ({', '.join(parts)})"


def _tensors_in(tree: object) -> list[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors_in(item)]
    return []


def _safetensors_bytes(state: dict[str, torch.Tensor], dtype: str) -> int:
    item = save_dtype(dtype).itemsize
    return ST_FIXED_OVERHEAD + sum(
        len(k) + ST_TENSOR_OVERHEAD + v.numel() * (item if v.is_floating_point() else v.element_size())
        for k, v in state.items())


def estimate_size(model_state: dict[str, torch.Tensor], ema_states: dict[float, dict[str, torch.Tensor]],
                  train_state: dict, model_dtype: str = "fp32", ema_dtype: str = "fp32",
                  other_bytes: int = 0) -> CheckpointSize:
    """The size of the checkpoint `save_checkpoint` would write (within a few %), without writing it.

    Tensor bytes at the dtype they are saved in, plus each format's overhead; `other_bytes` for the
    small files (config.yaml, hashes.json).
    """
    model = _safetensors_bytes(model_state, model_dtype)
    emas = [_safetensors_bytes(ema_states[rate], ema_dtype) for rate in sorted(ema_states)]
    tensors = _tensors_in(train_state)
    state = PT_FIXED_OVERHEAD + sum(PT_TENSOR_OVERHEAD + t.numel() * t.element_size() for t in tensors)
    return CheckpointSize(model, emas, state, model + sum(emas) + state + other_bytes)


def free_space(path: Path) -> int:
    """Free bytes on the disk of `path`, or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def warn_if_short_of_space(root: Path, name: str, needed: CheckpointSize) -> None:
    """Log a warning when the disk of `root` has less free space than the checkpoint `name` needs."""
    free = free_space(root)
    if free < needed.total:
        log.warning("checkpoint %s needs about %s but only %s is free in %s (older checkpoints are removed only "
                    "after the new one is complete): set train.keep_last 1 and/or train.save_dtype fp16 to need "
                    "less", name, format_bytes(needed.total), format_bytes(free), root)


def os_error_behind(exc: BaseException) -> OSError | None:
    """The operating-system error (disk full, I/O error, no permission) behind a failed write, if
    that is what it was: the exception itself, the OSError torch.save met writing to a Python file
    (the context of its RuntimeError), or the `os error N` that safetensors names in its message."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not a write error
        return None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, SafetensorError) and (found := re.search(r"\(os error (\d+)\)", str(exc))):
        code = int(found[1])
        return OSError(code, os.strerror(code))
    return None


# --------------------------------------------------------------------------------------- timer


class SaveTimer:
    """When a time-based checkpoint (train.save_every_minutes) is due: measured from the last
    `reset` (a save) or, before any, from when the timer was made. Reads a clock only, no RNG."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or time.monotonic
        self.last = self.clock()

    def due(self, minutes: float) -> bool:
        """True once `minutes` have passed since the last save; never for `minutes` 0 (off)."""
        return minutes > 0 and self.clock() - self.last >= 60.0 * minutes

    def reset(self) -> None:
        """A checkpoint was just saved: count from now."""
        self.last = self.clock()
