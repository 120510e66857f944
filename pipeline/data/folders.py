"""Image datasets: a folder of images, a prepare-data cache or the built-in synthetic irises, as
[-1, 1] float arrays.

Loaded arrays are cached per process (`data.cache`), so a second trainer in the same process does
not decode the folder again (unless files were added, removed or replaced meanwhile). Batch order
lives in `pipeline.common.batches`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.common.config import DataConfig
from pipeline.common.errors import UserError
from pipeline.common.images import IMAGE_EXTENSIONS, convert_channels, from_uint
from pipeline.common.resize import describe_fit, fit_priors
from pipeline.data.prepared import cache_file, read_cache
from pipeline.data.synthetic import iter_irises

log = logging.getLogger(__name__)

_CACHE: dict[tuple, np.ndarray] = {}


def list_image_files(folder: str | Path, report_skipped: bool = True) -> list[Path]:
    """Image files under `folder` (recursive, extensions case-insensitive), sorted; others are
    skipped, and counted in a warning when `report_skipped`."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"data path is not a folder: {folder}")
    images, skipped = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            skipped += 1
    if skipped and report_skipped:
        log.warning("skipped %d non-image file(s) in %s", skipped, folder)
    if not images:
        what = "has no image files" if skipped else "is empty"
        raise UserError(f"data folder {folder} {what} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return images


def decode_image(path: Path) -> np.ndarray:
    """Decode a file to HW or HWC uint8/uint16 (RGB order); UserError if unreadable."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc.strerror or exc}") from None
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # our error says it in one line
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    finally:
        cv2.utils.logging.setLogLevel(level)
    if img is None or img.size == 0:
        raise UserError(f"cannot decode image {path} (corrupt, truncated or unsupported)")
    if img.dtype not in (np.uint8, np.uint16):
        raise UserError(f"unsupported pixel type {img.dtype} in image {path} (need 8- or 16-bit)")
    if img.ndim == 3:
        if img.shape[2] in (1, 2):  # grey, grey + alpha
            img = img[:, :, 0]
        elif img.shape[2] in (3, 4):  # BGR, BGRA → RGB
            img = img[:, :, 2::-1]
        else:
            raise UserError(f"unsupported channel count {img.shape[2]} in image {path}")
    return np.ascontiguousarray(img)


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """HW/HWC float image → (channels, H, W): grey → replicated, RGB → luminance (ITU-R BT.601)."""
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(np.transpose(convert_channels(img, channels), (2, 0, 1)))


def _resize_crop(img: np.ndarray, size: int, path: Path) -> np.ndarray:
    """Resize so the shorter side equals `size` (INTER_AREA when shrinking), then centre-crop."""
    h, w = img.shape[:2]
    if min(h, w) < size:
        raise UserError(f"image {path} is {w}x{h}, smaller than the target size {size}")
    scale = size / min(h, w)
    if scale != 1.0:
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def read_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """One image file → (channels, size, size) float32 in [-1, 1]."""
    path = Path(path)
    img = from_uint(decode_image(path))
    return _to_channels(_resize_crop(img, size, path), channels)


def read_image_native(path: str | Path, channels: int) -> np.ndarray:
    """One image file → (channels, H, W) float32 in [-1, 1] at the file's own size (no resize, no crop)."""
    return _to_channels(from_uint(decode_image(Path(path))), channels)


def _check(data: DataConfig) -> None:
    if data.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 or 3, got {data.channels}")
    if data.image_size < 8:
        raise UserError(f"data.image_size must be >= 8, got {data.image_size}")


def _load_prepared(path: Path, data: DataConfig) -> np.ndarray:
    """A prepare-data cache as float32 (N, C, H, W) in [-1, 1], fitted to data.image_size and
    data.channels (area averaging to shrink, bicubic to enlarge, grey ↔ RGB), with one log line."""
    cache = read_cache(path)
    images, info = fit_priors(from_uint(cache.images), (data.channels, data.image_size, data.image_size))
    fitted = "" if info["method"] == "none" and info["channels"] == "kept" else f"; {describe_fit(info)}"
    log.info("loaded %d prepared images from %s (the cache, not its PNGs%s)", len(images), path, fitted)
    return images


def _read_all(items: Iterator[np.ndarray], n: int, data: DataConfig, desc: str) -> np.ndarray:
    images = np.empty((n, data.channels, data.image_size, data.image_size), np.float32)
    for i, img in enumerate(tqdm(items, total=n, desc=desc, unit="img", leave=False)):
        images[i] = img
    return images


def load_image_array(data: DataConfig) -> np.ndarray:
    """All images of the dataset as float32 (N, C, H, W) in [-1, 1]: the synthetic set when
    data.path == 'synthetic'; the prepare-data cache when data.path is one (a .npz) or a folder
    holding one (dataset.npz: preferred to decoding its PNGs); else the folder's image files."""
    _check(data)
    synthetic = data.path == "synthetic"
    prepared = None if synthetic else cache_file(data.path)
    if synthetic:
        if data.synthetic_count < 1:
            raise UserError(f"data.synthetic_count must be >= 1, got {data.synthetic_count}")
        n = data.synthetic_count
        contents: tuple = (data.synthetic_count, data.synthetic_defects, data.seed)
        items = (img for img, _ in iter_irises(n, data.image_size, data.seed, data.channels, data.synthetic_defects))
        load = partial(_read_all, items, n, data, "drawing synthetic irises")
    elif prepared is not None:
        stat = prepared.stat()
        contents = ((str(prepared), stat.st_size, stat.st_mtime_ns),)  # rewritten: a miss
        load = partial(_load_prepared, prepared, data)
    else:
        files = list_image_files(data.path)
        contents = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)  # files added or replaced: a miss
        items = (read_image(path, data.image_size, data.channels) for path in files)
        load = partial(_read_all, items, len(files), data, f"loading {data.path}")
    key = (data.path, data.image_size, data.channels, contents)
    if data.cache and key in _CACHE:
        return _CACHE[key]
    images = load()
    if data.cache:
        for stale in [k for k in _CACHE if k[:3] == key[:3] and not synthetic]:  # the folder before it changed
            del _CACHE[stale]
        images.flags.writeable = False
        _CACHE[key] = images
    return images
