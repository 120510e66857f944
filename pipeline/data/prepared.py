"""The cache `prepare-data` writes (`OUT/dataset.npz`), read in one go by the trainers.

A NumPy .npz (uncompressed zip of .npy members, no pickles) holding:
  format   0-d str, FORMAT: what tells this cache from any other .npz
  images   (N, C, H, W) uint8, or uint16 when a kept frame was 16-bit (8-bit ones then × 257, exact)
  labels   0-d str: the JSON list of labels.json (one dict per image, in order)
  config   0-d str: the JSON of the prepare settings that made it (less `workers`: no effect on it)
`np.load(path, allow_pickle=False)` reads it. The members are written in a fixed order with fixed
zip timestamps, so the same frames and settings give the same bytes (its hash is the dataset's
fingerprint: see `pipeline.data.fingerprint`).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common.errors import UserError

FORMAT = "iris-diffusion prepare-data cache v1"
CACHE_NAME = "dataset.npz"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no clock in the bytes


@dataclass
class PreparedCache:
    """A loaded cache: the uint images (N, C, H, W), their labels and the settings that made them."""

    images: np.ndarray
    labels: list[dict]
    config: dict


def cache_file(path: str | Path) -> Path | None:
    """The cache `data.path` names, or None when it names something else: a `.npz` file itself,
    or the `dataset.npz` in a folder written by prepare-data."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and not path.is_dir():
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        return path
    inside = path / CACHE_NAME
    return inside if path.is_dir() and inside.is_file() else None


def write_cache(path: Path, images: np.ndarray, labels: list[dict], config: dict) -> None:
    """Write the cache (see the module docstring); the same arguments give the same bytes."""
    if images.ndim != 4 or images.dtype not in (np.uint8, np.uint16) or len(images) != len(labels):
        raise ValueError(f"expected (N, C, H, W) uint8/uint16 images and N labels, got {images.shape} "
                         f"{images.dtype} and {len(labels)}")
    members = {"format": np.array(FORMAT), "images": np.ascontiguousarray(images),
               "labels": np.array(json.dumps(labels)), "config": np.array(json.dumps(config, sort_keys=True))}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in members.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)


def _open(path: Path) -> np.lib.npyio.NpzFile:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {path} as a prepare-data cache: {exc}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy renamed
        raise UserError(f"{path} is not a prepare-data cache (not an .npz archive)")
    if "format" not in npz.files or str(npz["format"]) != FORMAT:
        npz.close()
        raise UserError(f"{path} is not a prepare-data cache (no '{FORMAT}' marker; "
                        f"its arrays: {', '.join(npz.files) or 'none'}); write one with prepare-data")
    return npz


def read_labels(path: str | Path) -> list[dict]:
    """The labels of a cache alone (its images are not read)."""
    path = Path(path)
    with _open(path) as npz:
        return _json(npz, "labels", path)


def read_cache(path: str | Path) -> PreparedCache:
    """The whole cache, checked: UserError for a foreign, damaged or inconsistent file."""
    path = Path(path)
    with _open(path) as npz:
        missing = {"images", "labels", "config"} - set(npz.files)
        if missing:
            raise UserError(f"{path} lacks {', '.join(sorted(missing))}: a damaged prepare-data cache")
        try:
            images = npz["images"]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(f"{path}: cannot read its images ({exc})") from None
        labels, config = _json(npz, "labels", path), _json(npz, "config", path)
    if images.ndim != 4 or images.dtype not in (np.uint8, np.uint16) or images.shape[1] not in (1, 3):
        raise UserError(f"{path}: images must be (N, 1 or 3, H, W) uint8/uint16, got {images.shape} {images.dtype}")
    if len(images) != len(labels):
        raise UserError(f"{path}: {len(images)} images but {len(labels)} labels: a damaged prepare-data cache")
    return PreparedCache(images, labels, config)


def _json(npz: np.lib.npyio.NpzFile, name: str, path: Path):
    try:
        return json.loads(str(npz[name]))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: its {name} are not readable JSON ({exc})") from None

