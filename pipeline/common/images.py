"""Pixel conventions in one place: float32 [-1, 1] ↔ uint8/uint16, NCHW ↔ NHWC, grey ↔ RGB, image files (PNG, BMP, TIFF), grids."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # what image folders are scanned for
SIXTEEN_BIT_SUFFIXES = (".png", ".tif", ".tiff")  # written files that keep 16-bit pixels
FORMAT_SUFFIXES = {"png": ".png", "bmp": ".bmp", "tiff": ".tif"}  # generate.format → its images' suffix
LUMA_BT601 = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luminance weights of R, G, B


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) → (N, H, W, C)."""
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) → (N, C, H, W)."""
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def convert_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Channels-last float image(s) (…, C) → (…, `channels`): grey → RGB by repeating, RGB → grey by
    ITU-R BT.601 luminance; anything else is returned as it is (the same array)."""
    if channels == 1 and img.shape[-1] == 3:
        return (img @ LUMA_BT601)[..., None]
    if channels == 3 and img.shape[-1] == 1:
        return np.repeat(img, 3, axis=-1)
    return img


def to_unit(x: np.ndarray) -> np.ndarray:
    """[0, 1]-scaled float32 from [-1, 1]."""
    return np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 0.5, 0.0, 1.0)


def from_uint(img: np.ndarray) -> np.ndarray:
    """uint8/uint16 pixels → float32 in [-1, 1]."""
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return (img.astype(np.float32) / scale) * 2.0 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] → uint8, rounding to nearest."""
    return np.round(to_unit(x) * 255.0).astype(np.uint8)


def to_uint16(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] → uint16, rounding to nearest."""
    return np.round(to_unit(x) * 65535.0).astype(np.uint16)


def _to_cv(img_hwc: np.ndarray) -> np.ndarray:
    """HWC grey/RGB → what cv2.imwrite expects (HW or BGR)."""
    if img_hwc.ndim == 3 and img_hwc.shape[2] == 1:
        return img_hwc[:, :, 0]
    if img_hwc.ndim == 3 and img_hwc.shape[2] == 3:
        return img_hwc[:, :, ::-1]
    return img_hwc


def write_image(path: str | Path, img_chw: np.ndarray, bits: int = 8) -> None:
    """Write one (C, H, W) float [-1, 1] image as an 8- or 16-bit file, atomically; the file type
    follows the suffix (see `write_image_uint`)."""
    conv = to_uint16 if bits == 16 else to_uint8
    write_image_uint(path, conv(np.transpose(img_chw, (1, 2, 0))))


def write_image_uint(path: str | Path, img_hwc: np.ndarray) -> None:
    """Write an HWC (or HW) uint8/uint16 image (RGB order) via temp + rename, encoded as its suffix
    says (.png, .bmp, .tif/.tiff, …); uint16 only where the format keeps 16 bits (PNG, TIFF)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if img_hwc.dtype == np.uint16 and suffix not in SIXTEEN_BIT_SUFFIXES:  # cv2 would cut it to 8 bits silently
        raise UserError(f"{path.name}: {suffix or 'no suffix'} cannot hold 16-bit pixels (PNG and TIFF can)")
    try:
        ok, buf = cv2.imencode(suffix, _to_cv(np.ascontiguousarray(img_hwc)))
    except cv2.error:  # no encoder for this suffix
        ok = False
    if not ok:
        raise UserError(f"could not encode {path} as {suffix or 'an image (no suffix)'}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) float [-1, 1] images into one (C, H', W') image with white padding."""
    n, c, h, w = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.ones((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def enlarged_grid(images: np.ndarray, ncol: int, tile: int) -> np.ndarray:
    """`make_grid` as uint8 (H, W) grey or (H, W, 3) RGB, enlarged by nearest neighbour so each image is about `tile` px."""
    grid = to_uint8(np.transpose(make_grid(images, ncol=ncol), (1, 2, 0)))
    scale = max(1, tile // images.shape[-1])
    return cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
