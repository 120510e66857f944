"""The pupil's shape figures.

3. Pupil shape. From that polygon: centroid, radius √(A/π), 4πA/P² measured on the boundary
   smoothed along its length over 1 px (this removes the pixel staircase: a rasterised circle of
   radius ≥ 8 px scores ≥ 0.98, no correction table), the least-squares ellipse's minor/major axis
   ratio (cv2.fitEllipse) and the radial deviation (std/mean of the boundary's distance from the
   centroid, weighted by arc length).

"That polygon" is the pupil proper's boundary found by `pipeline.check.pupil`.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from pipeline.check.arrays import cyclic_shift
from pipeline.check.fit import polygon_stats
from pipeline.check.pupil import Pupil


@functools.lru_cache(maxsize=8)
def _half_pixel_gaussian(sigma: float) -> np.ndarray:
    """Normalised Gaussian of `sigma` pixels sampled every half pixel out to 3 sigma."""
    half = int(math.ceil(3 * sigma / 0.5))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * 0.5 / sigma) ** 2)
    kernel /= kernel.sum()
    kernel.flags.writeable = False
    return kernel


def _smooth_polygon(xy: np.ndarray, seg: np.ndarray, sigma: float) -> np.ndarray:
    """The closed polygon (with `seg` the lengths of its sides) resampled every half pixel of arc
    and smoothed along it with a Gaussian of `sigma` pixels: removes the pixel-grid staircase that
    would lengthen the perimeter."""
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(16, int(arc[-1] / 0.5))
    t = np.arange(n) * (arc[-1] / n)
    closed = np.vstack([xy, xy[:1]])
    pts = np.column_stack([np.interp(t, arc, closed[:, 0]), np.interp(t, arc, closed[:, 1])])
    kernel = _half_pixel_gaussian(sigma)
    half = len(kernel) // 2
    padded = np.vstack([pts[-half:], pts, pts[:half]]) if half < n else pts
    if half >= n:
        return pts
    return np.column_stack([np.convolve(padded[:, i], kernel, mode="valid") for i in range(2)])


def shape_metrics(p: Pupil, scale: float) -> dict:
    """Circularity 4πA/P² (of the boundary smoothed over ~1 px, so that a rasterised circle
    scores ≈ 1), fitted-ellipse axis ratio and radial deviation of the pupil proper."""
    xy = p.contour
    seg = np.hypot(*(cyclic_shift(xy, 1) - xy).T)
    area, perim, _, _, _ = polygon_stats(_smooth_polygon(xy, seg, max(1.0, scale)))
    d = np.hypot(xy[:, 0] - p.cx, xy[:, 1] - p.cy)
    wts = seg + cyclic_shift(seg, -1)  # each point stands for half of each neighbouring segment
    total = float(wts.sum())
    mean = float(wts @ d) / total
    std = math.sqrt(float(wts @ (d - mean) ** 2) / total)
    _, axes, _ = cv2.fitEllipse(xy.astype(np.float32))
    return {
        "pupil_circularity": 4.0 * math.pi * area / perim**2 if perim > 0 else math.nan,
        "pupil_axis_ratio": min(axes) / max(axes) if max(axes) > 0 else math.nan,
        "pupil_radial_dev": std / mean,
    }
