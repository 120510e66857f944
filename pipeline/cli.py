"""Command-line pieces shared by every console script: --config/--set, output folders, devices."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.errors import UserError


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """Add `--config FILE` and repeatable `--set key=value` to a parser."""
    parser.add_argument(
        "--config", default=default_config, metavar="FILE",
        help="YAML config file" + (f" (default: {default_config})" if default_config else ""),
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by `--config` with the `--set` overrides applied."""
    return load_config(args.config, args.overrides)


def prepare_out_dir(path: str | Path, overwrite: bool) -> Path:
    """Return `path` as an empty directory's future location; refuse to clobber without overwrite.

    The directory itself is not created here: writers build into a temp sibling and rename.
    """
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise UserError(f"output '{path}' already exists; pass --overwrite to replace it")
        if not path.is_dir():
            raise UserError(f"output '{path}' exists and is not a directory")
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp directory onto `final`, replacing an older one only at the last moment."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(final)


def temp_dir_for(final: Path) -> Path:
    """A fresh temp directory beside `final` (same filesystem, so the final rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def pick_torch_device(requested: str = "auto"):
    """Resolve `auto|cpu|cuda[:N]|mps` to a torch.device, with a clear error when unavailable."""
    import torch

    requested = requested or "auto"
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{requested}' requested but CUDA is not available on this machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device 'mps' requested but MPS is not available on this machine")
    return device
