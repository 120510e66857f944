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

Camera frames (an eye filling little of the image, anywhere in it): a large image in which no iris,
or a very eccentric one, is found at its own scale is measured again at half the scale (a smaller
eye), and wherever the
eye is found filling less than 0.8 of the image, steps 1–6 run again on a window `EYE_SPAN` iris
radii wide around it, at the window's scale: the framing the constants are tuned for.

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

EYE_SPAN = 2.86  # the built-in 128 px eyes' side over their typical iris radius (0.35 · 128)
FRAME_SIDE = 200  # images at least this big on both sides may be camera frames with a small eye
_PLAUSIBLE_OFFSET = 0.3  # pupil-iris centre offsets beyond this many iris radii: look again at half the scale
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class Geometry:
    """What was found besides the metrics: the pupil proper's boundary, the fitted circles (NaN when
    absent) and, when the iris was found, its usable pixels (`pipeline.check.quality.usable_iris`)
    as a bool mask whose pixel (0, 0) is the image's `visible_origin` (x, y)."""

    pupil_contour: np.ndarray  # (K, 2) x, y
    pupil: tuple[float, float, float]  # cx, cy, r
    iris: tuple[float, float, float]
    visible: np.ndarray | None = None
    visible_origin: tuple[int, int] = (0, 0)

    def shifted(self, dx: int, dy: int) -> Geometry:
        """The same boundaries in an image whose pixel (0, 0) is this one's (−dx, −dy)."""
        (px, py, pr), (ix, iy, ir), (ox, oy) = self.pupil, self.iris, self.visible_origin
        return Geometry(self.pupil_contour + (dx, dy), (px + dx, py + dy, pr), (ix + dx, iy + dy, ir),
                        self.visible, (ox + dx, oy + dy))


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


def to_grey_uint8(img: np.ndarray) -> np.ndarray:
    """`to_grey_unit` as 0–255 uint8 levels (for pictures of the image)."""
    return np.round(to_grey_unit(img) * 255).astype(np.uint8)


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
    """Measure the whole image (a large one at half the scale too when no iris, or a very eccentric
    one, is found at its own); where the eye fills little of it (a camera frame), measure again in
    a window around the eye `EYE_SPAN` iris radii wide (the framing the steps are tuned for)."""
    h, w = g.shape
    m, geometry = _measure_window(g, float(min(h, w)))
    if not m["concentricity"] <= _PLAUSIBLE_OFFSET and min(h, w) >= FRAME_SIDE:  # perhaps a small eye in a frame
        m_half, geometry_half = _measure_window(g, min(h, w) / 2)
        if m_half["concentricity"] < m["concentricity"] or (m_half["iris_found"] and not m["iris_found"]) \
                or (m_half["pupil_found"] and not m["pupil_found"]):
            m, geometry = m_half, geometry_half
    if m["pupil_found"]:
        cx, cy, r = (m["iris_cx"], m["iris_cy"], m["iris_r"]) if m["iris_found"] else (m["pupil_cx"], m["pupil_cy"], m["pupil_r"] / 0.2)
        side = EYE_SPAN * r
        if side < 0.8 * min(h, w):
            x0, y0 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
            m2, geometry2 = _measure_window(g[y0 : int(cy + side / 2) + 1, x0 : int(cx + side / 2) + 1], side)
            if m2["pupil_found"] and (m2["iris_found"] or not m["iris_found"]):
                m, geometry = m2, geometry2.shifted(x0, y0)
                for key in ("pupil_cx", "iris_cx"):
                    m[key] += x0
                for key in ("pupil_cy", "iris_cy"):
                    m[key] += y0
    if m["iris_found"]:
        m["margin_adequacy"] = margin_adequacy(m["iris_cx"], m["iris_cy"], m["iris_r"], w, h)
    return m, geometry


def margin_adequacy(cx: float, cy: float, r: float, width: int, height: int) -> float:
    """ISO/IEC 29794-6 margin adequacy as a share: the smallest of the left and right margins
    between the iris circle and the frame's edges over 0.6 iris radii and of the top and bottom
    ones over 0.2 radii, each clipped to [0, 1] (ISO reports 100 times this)."""
    margins = ((cx + 0.5 - r) / 0.6, (width - 0.5 - cx - r) / 0.6, (cy + 0.5 - r) / 0.2, (height - 0.5 - cy - r) / 0.2)
    return min(1.0, max(0.0, min(margins) / r))


def _measure_window(g: np.ndarray, s: float) -> tuple[dict, Geometry]:
    """Measure an image (or a window of one) whose lengths scale with `s` (see the module docstring)."""
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
    quality, geometry.visible, geometry.visible_origin = annulus_metrics(g, sm, pupil, (icx, icy, ir), scale)
    m.update(quality)
    return m, geometry
