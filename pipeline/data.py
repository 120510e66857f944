"""Image datasets: a folder of images or the built-in synthetic irises, as [-1, 1] float arrays.

Batch order is a pure function of (seed, epoch): `epoch_permutation(n, seed, epoch)` is the one
shuffle used by both the NumPy batches (Keras) and the torch DataLoader, so a trainer resuming in
the middle of epoch e rebuilds that epoch's order and skips the first k batches. Horizontal flips
are decided per (seed, epoch, index) the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import DataConfig
from pipeline.errors import UserError
from pipeline.images import from_uint
from pipeline.synthetic import iter_irises

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_CACHE: dict[tuple, np.ndarray] = {}


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive, extensions case-insensitive), sorted; others are counted and skipped."""
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
    if skipped:
        log.warning("skipped %d non-image file(s) in %s", skipped, folder)
    if not images:
        what = "has no image files" if skipped else "is empty"
        raise UserError(f"data folder {folder} {what} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return images


def _decode(path: Path) -> np.ndarray:
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
    if channels == 1 and img.shape[2] == 3:
        img = (img @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
    elif channels == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(np.transpose(img, (2, 0, 1)))


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
    img = from_uint(_decode(path))
    return _to_channels(_resize_crop(img, size, path), channels)


def _check(data: DataConfig) -> None:
    if data.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 or 3, got {data.channels}")
    if data.image_size < 8:
        raise UserError(f"data.image_size must be >= 8, got {data.image_size}")


def load_image_array(data: DataConfig) -> np.ndarray:
    """All images of the dataset as float32 (N, C, H, W) in [-1, 1] (synthetic when data.path == 'synthetic')."""
    _check(data)
    synthetic = data.path == "synthetic"
    key = (data.path, data.image_size, data.channels) + (
        (data.synthetic_count, data.synthetic_defects, data.seed) if synthetic else ())
    if data.cache and key in _CACHE:
        return _CACHE[key]
    if synthetic:
        if data.synthetic_count < 1:
            raise UserError(f"data.synthetic_count must be >= 1, got {data.synthetic_count}")
        n = data.synthetic_count
        items = (img for img, _ in iter_irises(n, data.image_size, data.seed, data.channels, data.synthetic_defects))
        desc = "drawing synthetic irises"
    else:
        files = list_image_files(data.path)
        n = len(files)
        items = (read_image(path, data.image_size, data.channels) for path in files)
        desc = f"loading {data.path}"
    images = np.empty((n, data.channels, data.image_size, data.image_size), np.float32)
    for i, img in enumerate(tqdm(items, total=n, desc=desc, unit="img", leave=False)):
        images[i] = img
    if data.cache:
        images.flags.writeable = False
        _CACHE[key] = images
    return images


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    if seed < 0 or epoch < 0:
        raise UserError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch, stream])


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(n) that depends only on (seed, epoch)."""
    return _epoch_rng(seed, epoch, 0).permutation(n)


def flip_mask(n: int, seed: int, epoch: int) -> np.ndarray:
    """Which of the n images are mirrored in epoch `epoch` (by dataset index), from (seed, epoch)."""
    return _epoch_rng(seed, epoch, 1).random(n) < 0.5


def iterate_batches(images: np.ndarray, batch_size: int, seed: int, shuffle: bool = True,
                    hflip: bool = False, drop_last: bool = True, start_epoch: int = 0) -> Iterator[np.ndarray]:
    """One epoch (`start_epoch`) of NumPy batches (B, C, H, W), ordered by `epoch_permutation`."""
    n = len(images)
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    order = epoch_permutation(n, seed, start_epoch) if shuffle else np.arange(n)
    flips = flip_mask(n, seed, start_epoch) if hflip else None
    stop = n - n % batch_size if drop_last else n
    for begin in range(0, stop, batch_size):
        idx = order[begin : begin + batch_size]
        batch = images[idx]
        if flips is not None:
            f = flips[idx]
            batch[f] = batch[f][..., ::-1]
        yield batch


class ImageArrayDataset(torch.utils.data.Dataset):
    """Images from an in-memory (N, C, H, W) array as torch tensors.

    Items are indexed by `i` or by `(i, flip)`; `EpochBatchSampler` supplies the pairs so that the
    flips, like the order, depend only on (seed, epoch) — also inside DataLoader workers.
    """

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, bool]) -> torch.Tensor:
        i, flip = key if isinstance(key, tuple) else (key, False)
        img = self.images[i]
        return torch.from_numpy(np.array(img[..., ::-1] if flip else img))  # a copy: the cache is read-only


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, flip) for one epoch at a time; `set_epoch(e, start_batch=k)` to resume.

    With `world_size > 1` (DDP) each rank takes every world_size-th item of the shared order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, hflip: bool = False,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.hflip, self.drop_last = shuffle, hflip, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration epoch `epoch`, skipping its first `start_batch` batches."""
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> np.ndarray:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else np.arange(self.n)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        m = len(range(self.rank, self.n, self.world_size))
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        idx = self._indices()
        flips = flip_mask(self.n, self.seed, self.epoch) if self.hflip else np.zeros(self.n, bool)
        for b in range(self.start_batch, len(self)):
            chunk = idx[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(int(i), bool(flips[i])) for i in chunk]


def make_dataloader(data: DataConfig, batch_size: int, seed: int, shuffle: bool = True,
                    drop_last: bool = True, rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader over `load_image_array(data)`; its `batch_sampler.set_epoch(e, start_batch)` picks the epoch.

    Epoch e yields exactly the batches of
    `iterate_batches(images, batch_size, seed, shuffle, data.hflip, drop_last, start_epoch=e)`.
    """
    images = load_image_array(data)
    if drop_last and len(images) < batch_size * world_size:
        raise UserError(f"dataset has {len(images)} images, fewer than one batch of {batch_size}"
                        + (f" per rank x {world_size} ranks" if world_size > 1 else ""))
    sampler = EpochBatchSampler(len(images), batch_size, seed, shuffle, data.hflip, drop_last, rank, world_size)
    return torch.utils.data.DataLoader(ImageArrayDataset(images), batch_sampler=sampler,
                                       num_workers=data.num_workers)
