"""Per-image pupil/iris geometry of `circularity-check` (pure NumPy/OpenCV): the public API
(`analyze_image`, `analyze_batch`, `analyze_with_geometry`) and the measurement's order of steps.

How one grey image is measured (every length scales with the image size s = min(H, W); the
constants in each step's description, in the module docstrings named here, are for s = 128 and
are multiplied by s/128):

1. Pupil region and 2. pupil proper: `pipeline.check.pupil` (its edge traced by
   `pipeline.check.contour`, tongues cut off with the robust ellipse of `pipeline.check.fit`).
3. Pupil shape: `pipeline.check.shape`.
4. Iris (limbus): `pipeline.check.limbus`.
5. Bleed and 6. ISO/IEC 29794-6 style quality figures: `pipeline.check.quality`.

The verdict (which metric must be above or below what) is `pipeline.check.rules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.check.limbus import find_iris
from pipeline.check.pupil import find_pupil
from pipeline.check.quality import annulus_metrics, entropy_bits, sharpness
from pipeline.check.rules import METRICS, evaluate_rules
from pipeline.check.shape import shape_metrics
from pipeline.common.config import CircularityConfig
from pipeline.common.images import to_unit

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class Geometry:
    """What an overlay draws: the pupil proper's boundary and the fitted circles (NaN when absent)."""

    pupil_contour: np.ndarray  # (K, 2) x, y
    pupil: tuple[float, float, float]  # cx, cy, r
    iris: tuple[float, float, float]


def to_grey_unit(img: np.ndarray) -> np.ndarray:
    """HW / HWC uint8, uint16 or float-in-[0, 1] pixels → grey float32 in [0, 1] (RGB → BT.601 luma)."""
    img = np.asarray(img)
    integer = img.dtype in (np.uint8, np.uint16)
    if integer:
        x = img.astype(np.float32)
        x /= np.float32(np.iinfo(img.dtype).max)
    elif np.issubdtype(img.dtype, np.floating) or img.dtype == bool:
        x = img.astype(np.float32)
    else:
        raise ValueError(f"unsupported pixel type {img.dtype}")
    if x.ndim == 3:
        x = x[:, :, :3] @ _LUMA if x.shape[2] >= 3 else np.ascontiguousarray(x[:, :, 0])
        integer = integer and img.shape[2] < 3  # the luma sum may round past 1
    if x.ndim != 2 or min(x.shape) < 1:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    return x if integer else np.fmin(np.fmax(x, 0.0, out=x), 1.0, out=x)  # clipped, NaN → 0


def analyze_image(img: np.ndarray, cfg: CircularityConfig) -> dict:
    """Metrics (see `METRICS`), `pass` and `reason` for one image (HW or HWC; uint8, uint16 or
    float in [0, 1]), measured at the image's own size."""
    return analyze_with_geometry(img, cfg)[0]


def analyze_batch(images: np.ndarray, cfg: CircularityConfig) -> list[dict]:
    """`analyze_image` for each image of an (N, C, H, W) batch in [-1, 1], the models' format."""
    return [analyze_image(np.transpose(to_unit(img), (1, 2, 0)), cfg) for img in images]


def analyze_with_geometry(img: np.ndarray, cfg: CircularityConfig) -> tuple[dict, Geometry]:
    """`analyze_image` plus the boundaries it found, for overlays."""
    metrics, geometry = _measure(to_grey_unit(img))
    metrics["pass"], metrics["reason"] = evaluate_rules(metrics, cfg)
    return metrics, geometry


def _measure(g: np.ndarray) -> tuple[dict, Geometry]:
    h, w = g.shape
    s = float(min(h, w))
    scale = s / 128.0
    m = {name: math.nan for name in METRICS}
    m.update(pupil_found=False, iris_found=False, sharpness=sharpness(g))
    nan3 = (math.nan, math.nan, math.nan)
    geometry = Geometry(np.zeros((0, 2)), nan3, nan3)
    found = find_pupil(g, s, scale) if s >= 16 else None
    if found is None:
        m["grey_utilisation"] = entropy_bits(g)  # of the whole image: no iris to look at
        return m, geometry
    pupil, g, sm = found
    m.update(pupil_found=True, pupil_cx=pupil.cx, pupil_cy=pupil.cy, pupil_r=pupil.r, **shape_metrics(pupil, scale))
    geometry = Geometry(pupil.contour, (pupil.cx, pupil.cy, pupil.r), nan3)

    iris = find_iris(sm, pupil, s, scale)
    if iris is None:
        m["grey_utilisation"] = entropy_bits(g)
        return m, geometry
    icx, icy, ir, icirc = iris
    m.update(
        iris_found=True, iris_cx=icx, iris_cy=icy, iris_r=ir, iris_circularity=icirc,
        concentricity=math.hypot(pupil.cx - icx, pupil.cy - icy) / ir, pupil_iris_ratio=pupil.r / ir,
    )
    geometry.iris = (icx, icy, ir)
    m.update(annulus_metrics(g, sm, pupil, (icx, icy, ir), scale))
    return m, geometry
