"""Small file helpers shared by every stage: content hashes, crash-safe writes, output folders."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.common.errors import UserError


def numpy_json_default(value: object) -> object:
    """`json.dumps(default=...)` for NumPy scalars: their plain Python number; TypeError otherwise."""
    import numpy as np  # here: the command-line tools import this module before they need NumPy

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_figure_atomic(fig, path: str | Path, dpi: int) -> None:
    """Save a Matplotlib figure as PNG via a temp file and `os.replace`, so a reader (or an
    interrupted run) never sees half a picture."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file via a synced temp file and `os.replace` (never half-written; the
    temp file is removed when writing fails, e.g. on a full disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """Build the folder `final` in a temp folder beside it (`temp_dir_for`): renamed onto `final`
    (`replace_dir`) when the block completes, removed when anything escapes it (nothing half-written)."""
    tmp = temp_dir_for(final)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
