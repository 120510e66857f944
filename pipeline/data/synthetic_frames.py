"""Synthetic full near-infrared frames (e.g. 640x480) with the eye anywhere in them, and their truth:
what `prepare-data` and `circularity-check` meet in real datasets, drawn with known answers.

The eye is the built-in one (`pipeline.data.synthetic.paint_eye`: iris texture, round pupil,
eyelids, lashes hanging from the upper lid, glints), drawn at the scale its iris radius asks for
(by default 0.125–0.27 of the frame's shorter side: 60–130 px at 640x480) on skin, under a
non-uniform illuminator (up to 55 % darker away from its brightest point), then blurred and
given sensor noise. Kinds of frame:
  good      the iris inside the frame with at least 0.1 radii to spare; lids as on the built-in eyes
  occluded  both lids down to just off the pupil (most of the iris annulus hidden)
  cut       the iris centre 0.3–0.6 radii inside one edge of the frame (14–31 % of the iris disk outside it)

Record keys (frame pixels, x = column, y = row, the centre of pixel (0, 0) at 0.0): kind, width,
height, pupil_cx/cy/r, iris_cx/cy/r, upper_lid/lower_lid (as `pipeline.data.synthetic`),
reflections, lashes, usable_iris_area (share of the annulus between the pupil and iris circles
neither covered by lids, lashes or glints, nor outside the frame: ISO/IEC 29794-6's usable iris
area), iris_outside (share of the iris disk outside the frame) and margin_adequacy (ISO/IEC
29794-6: the smallest of the left/right margins over 0.6 iris radii and the top/bottom ones over
0.2, each clipped to [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.common.errors import UserError
from pipeline.common.images import to_uint8, write_image_uint
from pipeline.data.synthetic import (
    GOOD_LIDS,
    DrawnEye,
    Eye,
    draw_levels,
    optics_and_sensor,
    paint_eye,
    write_labelled,
)
from pipeline.data.synthetic_layers import TAU, Draws, grids, iris_texture, pupil_shape, shading

FRAME_KINDS = ("good", "occluded", "cut")
OCCLUDED_LIDS = ((0.0, 0.15), (0.0, 0.2))  # lid apexes down to (clamped: just off) the pupil
_IRIS_R_128 = 0.35 * 128  # the built-in 128 px eyes' typical iris radius: the eye's scale is r / this
_MIN_SIDE = 64


def _place(d: Draws, height: int, width: int, kind: str, radius: tuple[float, float]) -> Eye:
    """Iris radius and centre, pupil radius and offset, for a frame of this kind."""
    ir = d.uniform(*radius)
    inside = d.uniform(0.3, 0.6)  # cut: the iris centre this many radii inside the edge
    ratio = d.uniform(0.2, inside - 0.1 if kind == "cut" else 0.7)
    off, direction = d.uniform(0.0, 0.06) * ir, d.uniform(0.0, TAU)
    keep = 1.1 * ir  # good and occluded: at least 0.1 radii between the iris and each edge
    icx, icy = d.uniform(keep - 0.5, width - 0.5 - keep), d.uniform(keep - 0.5, height - 0.5 - keep)
    if kind == "cut":
        side, at = d.integer(0, 4), inside * ir
        icx = (at - 0.5, width - 0.5 - at, icx, icx)[side]
        icy = (icy, icy, at - 0.5, height - 0.5 - at)[side]
    return Eye.around(max(height, width), icx, icy, ir, ratio, off, direction, ir / _IRIS_R_128)


def _illumination(d: Draws, height: int, width: int, size: int) -> np.ndarray:
    """A (size, size) gain field: 1 at a random point of the frame, falling off quadratically
    to 1 − a (a ∈ [0.25, 0.55]) one frame diagonal away."""
    _, _, axis, _ = grids(size)
    x0, y0, a = d.uniform(0, width - 1), d.uniform(0, height - 1), d.uniform(0.25, 0.55)
    k = np.float32(a / (width * width + height * height))
    gx, gy = (axis - np.float32(x0)) ** 2 * k, (axis - np.float32(y0)) ** 2 * k
    return np.float32(1.0) - np.add.outer(gy, gx)


def _truth(eye: Eye, drawn: DrawnEye, height: int, width: int) -> dict:
    """Usable iris area, the iris's share outside the frame and margin adequacy (module docstring)."""
    x0, x1 = math.floor(eye.icx - eye.ir), math.ceil(eye.icx + eye.ir) + 1
    y0, y1 = math.floor(eye.icy - eye.ir), math.ceil(eye.icy + eye.ir) + 1
    xs, ys = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
    disk = np.hypot(xs - eye.icx, ys - eye.icy) < eye.ir
    annulus = disk & (np.hypot(xs - eye.pcx, ys - eye.pcy) > eye.pr)
    outside = (xs < 0) | (ys < 0) | (xs > width - 1) | (ys > height - 1)
    up, lo = drawn.upper_lid, drawn.lower_lid
    hidden = outside | (ys < up["y"] + up["curvature"] * (xs - up["x"]) ** 2)
    hidden |= ys > lo["y"] - lo["curvature"] * (xs - lo["x"]) ** 2
    for gx, gy, gr in drawn.glints:
        hidden |= np.hypot(xs - gx, ys - gy) < gr
    if drawn.lash_alpha is not None:
        rows, cols = ys.astype(int), xs.astype(int)
        on = ~outside & (rows < drawn.lash_alpha.shape[0])
        hidden[on] |= drawn.lash_alpha[rows[on], cols[on]] >= 0.5
    margins = ((eye.icx + 0.5 - eye.ir) / eye.ir / 0.6, (width - 0.5 - eye.icx - eye.ir) / eye.ir / 0.6,
               (eye.icy + 0.5 - eye.ir) / eye.ir / 0.2, (height - 0.5 - eye.icy - eye.ir) / eye.ir / 0.2)
    return {"usable_iris_area": float(1.0 - np.count_nonzero(annulus & hidden) / np.count_nonzero(annulus)),
            "iris_outside": float(np.count_nonzero(disk & outside) / np.count_nonzero(disk)),
            "margin_adequacy": float(min(1.0, max(0.0, min(margins))))}


def _default_radius(height: int, width: int) -> tuple[float, float]:
    """Iris radii drawn by default: 0.125–0.27 of the frame's shorter side (60–130 px at 640x480)."""
    return 0.125 * min(height, width), 0.27 * min(height, width)


def _check_frame(height: int, width: int, radius: tuple[float, float]) -> None:
    if min(height, width) < _MIN_SIDE:
        raise UserError(f"frames must be at least {_MIN_SIDE} px on each side, got {width}x{height}")
    if not 4 <= radius[0] <= radius[1] or 2.2 * radius[1] > min(height, width):
        raise UserError(f"iris radius range {radius} does not fit a {width}x{height} frame")


def render_frame(rng: np.random.Generator, height: int = 480, width: int = 640, kind: str = "good",
                 iris_radius: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """One (height, width) uint8 grey frame of the given kind and its record (module docstring)."""
    if kind not in FRAME_KINDS:
        raise UserError(f"unknown frame kind {kind!r}; valid: {', '.join(FRAME_KINDS)}")
    radius = iris_radius or _default_radius(height, width)
    _check_frame(height, width, radius)
    d = Draws(rng, 160)
    eye = _place(d, height, width, kind, radius)
    shape = pupil_shape(d, None, eye.pr, eye.ir)
    levels = draw_levels(d)
    _, _, _, unit = grids(eye.size)  # drawn on a square canvas, then cut to the frame
    img = np.add.outer(shading(d, unit, 0.04) + np.float32(levels.sclera), shading(d, unit, 0.04))
    texture = iris_texture(rng, d, round(128 * eye.s), levels.iris)
    drawn = paint_eye(img, rng, d, eye, shape, texture, levels, OCCLUDED_LIDS if kind == "occluded" else GOOD_LIDS)
    img *= _illumination(d, height, width, eye.size)
    out, _, _, _ = optics_and_sensor(img, d, eye.s, 1)
    frame = to_uint8(out[0, :height, :width])
    record = {
        "kind": kind, "width": width, "height": height,
        "pupil_cx": eye.pcx, "pupil_cy": eye.pcy, "pupil_r": eye.pr, "iris_cx": eye.icx, "iris_cy": eye.icy,
        "iris_r": eye.ir, "upper_lid": drawn.upper_lid, "lower_lid": drawn.lower_lid,
        "reflections": drawn.glints, "lashes": drawn.lashes, **_truth(eye, drawn, height, width),
    }
    return frame, record


def iter_frames(n: int, height: int = 480, width: int = 640, seed: int = 0,
                kinds: tuple[float, float] = (0.0, 0.0)) -> Iterator[tuple[np.ndarray, dict]]:
    """Frames 0…n−1, frame i drawn from `default_rng([seed, i])`; `kinds` = the shares of occluded
    and cut frames (the rest good). Arguments are checked before the first frame is drawn."""
    if n < 0 or seed < 0:
        raise UserError(f"need n >= 0 and seed >= 0, got n={n}, seed={seed}")
    occluded, cut = kinds
    if min(occluded, cut) < 0 or occluded + cut > 1:
        raise UserError(f"occluded and cut shares must be >= 0 and sum to <= 1, got {occluded}, {cut}")
    _check_frame(height, width, _default_radius(height, width))

    def draw() -> Iterator[tuple[np.ndarray, dict]]:
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            pick = rng.random()
            kind = "occluded" if pick < occluded else "cut" if pick < occluded + cut else "good"
            yield render_frame(rng, height, width, kind)

    return draw()


def write_frames(out: str | Path, n: int, height: int = 480, width: int = 640, seed: int = 0,
                 kinds: tuple[float, float] = (0.0, 0.0), fmt: str = "bmp", overwrite: bool = False) -> Path:
    """Write `OUT/000000.<fmt> …` and `OUT/labels.json` (records with a `file` key), atomically."""
    return write_labelled(out, iter_frames(n, height, width, seed, kinds), n, fmt, write_image_uint, overwrite)
