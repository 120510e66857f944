"""The geometry of an iris-centred training crop: the square around the iris, its reflect padding
where it leaves the frame, the resize to the training size, and where circles land in it.

Coordinates are the frame's pixels: x = column, y = row, the centre of pixel (0, 0) at (0.0, 0.0),
so a W×H frame covers [-0.5, W - 0.5] × [-0.5, H - 0.5]. The crop is a whole-pixel square of side
`round(2 · margin · r)` whose centre is the nearest such square's to the iris centre (at most half
a frame pixel off); it is resized to `size` with cv2.resize's pixel-centre convention, so a frame
point x lands at (x - left + 0.5) · scale - 0.5 with scale = size / side (`to_crop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.common.images import from_uint, to_uint8, to_uint16
from pipeline.common.resize import fit_priors


@dataclass(frozen=True)
class CropBox:
    """A square of whole frame pixels: columns left … left + side - 1, rows top … top + side - 1
    (it may reach past the frame: those pixels are reflect-padded)."""

    left: int
    top: int
    side: int

    def padding(self, width: int, height: int) -> dict[str, int]:
        """Pixels of the square beyond each side of a width × height frame."""
        return {"left": max(0, -self.left), "top": max(0, -self.top),
                "right": max(0, self.left + self.side - width), "bottom": max(0, self.top + self.side - height)}

    def padded_fraction(self, width: int, height: int) -> float:
        """Share of the square's area that lies outside the frame (filled by reflection)."""
        inside_w = max(0, min(self.left + self.side, width) - max(self.left, 0))
        inside_h = max(0, min(self.top + self.side, height) - max(self.top, 0))
        return 1.0 - inside_w * inside_h / self.side**2


def _round(v: float) -> int:
    return math.floor(v + 0.5)


def crop_box(cx: float, cy: float, r: float, margin: float) -> CropBox:
    """The whole-pixel square of side round(2 · margin · r) centred nearest to (cx, cy)."""
    side = max(1, _round(2.0 * margin * r))
    return CropBox(_round(cx - (side - 1) / 2), _round(cy - (side - 1) / 2), side)


def reflect_indices(start: int, length: int, n: int) -> np.ndarray:
    """Indices start … start + length - 1 folded into 0 … n - 1 by reflection about the edge pixels
    (OpenCV's BORDER_REFLECT_101, NumPy's 'reflect': … 2 1 | 0 1 2 … n-1 | n-2 …), at any distance."""
    idx = np.arange(start, start + length)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * n - 2
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def crop_square(img: np.ndarray, box: CropBox) -> np.ndarray:
    """The box's pixels of an HW or HWC frame, reflect-padded where the box leaves it."""
    rows = reflect_indices(box.top, box.side, img.shape[0])
    cols = reflect_indices(box.left, box.side, img.shape[1])
    return img[np.ix_(rows, cols)]


def training_crop(img: np.ndarray, box: CropBox, size: int, channels: int) -> np.ndarray:
    """The box of a uint8/uint16 HW/HWC frame as a (channels, size, size) array of the frame's dtype:
    area averaging to shrink, bicubic to enlarge (clipped), grey ↔ RGB by `convert_channels`."""
    square = crop_square(img, box)
    if square.ndim == 2:
        square = square[:, :, None]
    x = np.transpose(from_uint(square), (2, 0, 1))[None]
    fitted, _ = fit_priors(x, (channels, size, size))
    return (to_uint16 if img.dtype == np.uint16 else to_uint8)(fitted[0])


def to_crop(circle: tuple[float, float, float], box: CropBox, size: int) -> list[float]:
    """A frame circle (cx, cy, r) in the resized crop's pixels."""
    scale = size / box.side
    cx, cy, r = circle
    return [(cx - box.left + 0.5) * scale - 0.5, (cy - box.top + 0.5) * scale - 0.5, r * scale]


def disk_outside_fraction(cx: float, cy: float, r: float, width: int, height: int, samples: int = 2048) -> float:
    """Share of the disk's area outside a width × height frame ([-0.5, W - 0.5] × [-0.5, H - 0.5]).

    The area inside is ∫ (length of the chord at x within the frame's rows) dx over the frame's
    columns, with x = cx - r·cos θ (dx = r·sin θ dθ: smooth at the disk's ends), by the midpoint
    rule on `samples` angles; the integrand is continuous, so the error falls as 1/samples²
    (below 1e-6 of the disk here)."""
    if not r > 0:
        return math.nan
    if cx - r >= -0.5 and cy - r >= -0.5 and cx + r <= width - 0.5 and cy + r <= height - 0.5:
        return 0.0  # wholly inside: exactly, not to rounding
    x0, x1 = max(-0.5, cx - r), min(width - 0.5, cx + r)
    if x1 <= x0:
        return 1.0
    t0, t1 = math.acos(min(1.0, (cx - x0) / r)), math.acos(max(-1.0, (cx - x1) / r))
    dt = (t1 - t0) / samples
    t = t0 + (np.arange(samples) + 0.5) * dt
    half = r * np.sin(t)
    chord = np.clip(np.minimum(cy + half, height - 0.5) - np.maximum(cy - half, -0.5), 0.0, None)
    inside = float(np.sum(chord * half)) * dt
    return min(1.0, max(0.0, 1.0 - inside / (math.pi * r * r)))
