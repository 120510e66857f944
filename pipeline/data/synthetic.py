"""Procedural near-infrared iris images with known ground truth (the built-in dataset).

Each image is drawn from its own generator `default_rng([seed, i])`, so image i depends only on
(seed, i): the first k images of a larger draw equal a draw of k images.

Coordinates are pixels, x = column, y = row, origin top-left, the centre of pixel (0, 0) at 0.0.
Layers, back to front: sclera → iris (polar texture: fibres, furrows, crypts, collarette,
limbus) → pupil (round, or a defect) → eyelids → lashes → specular glints; then blur, global
gain/offset and sensor noise. The pupil is never covered by the lids.

Good images: round pupil, centre within 0.06 iris radii of the iris centre, pupil/iris radius
ratio 0.2–0.7, iris radius 0.28–0.42·size, iris centre within ±8% of the image centre.
Defects (labelled in the record's `defect`):
  bleed      dark tongues and smears reaching from the pupil into the iris
  irregular  lobed pupil boundary (radial deviation std/mean ≥ 0.1)
  oval       elliptical pupil, minor/major axis ratio 0.5–0.72
  offcenter  pupil centre 0.22–0.4 iris radii from the iris centre

Record keys: pupil_cx, pupil_cy, pupil_r (oval: mean of the semi-axes), pupil_axis_ratio
(minor/major), pupil_angle (major axis, degrees from +x towards +y), iris_cx, iris_cy, iris_r,
defect, pupil_iris_ratio, concentricity (centre offset / iris_r), pupil_value and iris_value (mean
pupil and base iris grey in [-1, 1] before noise), upper_lid and lower_lid ({x, y, curvature}:
the lid edge is y + curvature·(col − x)², the upper lid covering rows above it, the lower lid
rows below y − curvature·(col − x)²), reflections ([x, y, r] each), lashes (count), noise_sigma;
and per defect semi_axes, lobes + lobe_amplitude, or tongues ([angle°, length] each).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.cli.entry import cli_entry
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir, replace_dir, temp_dir_for
from pipeline.common.images import write_png

DEFECTS = ("bleed", "irregular", "oval", "offcenter")
_LUT = 1024  # angular resolution of pupil-boundary lookup tables
_TAU = 2.0 * math.pi
_SPAN = np.linspace(-1.0, 1.0, 33)  # sample offsets across a disk (lid clearance)
_LASH_BASIS = np.linspace(0.0, 1.0, 7) ** np.arange(3)[:, None]  # 1, t, t² at the points along a lash


class _Draws:
    """Scalar random numbers served from one block drawn up front (many small rng calls are slow)."""

    def __init__(self, rng: np.random.Generator, count: int = 128):
        self._values = rng.random(count).tolist()
        self._next = 0

    def uniform(self, low: float, high: float) -> float:
        value = self._values[self._next]
        self._next += 1
        return low + (high - low) * value

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        return min(high - 1, low + int(self.uniform(0.0, high - low)))

    def normal(self, sd: float) -> float:
        """Zero-mean Gaussian with standard deviation `sd` (Box–Muller)."""
        u1, u2 = self.uniform(1e-12, 1.0), self.uniform(0.0, _TAU)
        return sd * math.sqrt(-2.0 * math.log(u1)) * math.cos(u2)

    def chance(self, p: float) -> bool:
        return self.uniform(0.0, 1.0) < p


@functools.lru_cache(maxsize=8)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read-only float32 pixel-centre coordinates X, Y, the 1-D axis and the axis scaled to [-1, 1]."""
    axis = np.arange(size, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    unit = axis * np.float32(2.0 / (size - 1)) - np.float32(1.0)
    for a in (x, y, axis, unit):
        a.flags.writeable = False
    return x, y, axis, unit


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed (2·size)² tile of unit Gaussian noise; each image takes random crops (fast sensor noise)."""
    bank = np.random.default_rng(size).standard_normal((2 * size, 2 * size), dtype=np.float32)
    bank.flags.writeable = False
    return bank


@functools.lru_cache(maxsize=32)
def _periodic_weights(k: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.arange(rows) * (k / rows)
    i0 = np.floor(pos).astype(np.intp)
    f = pos - i0
    return i0, (i0 + 1) % k, (f * f * (3 - 2 * f)).astype(np.float32)[:, None]  # smoothstep weights


def _periodic_upsample(a: np.ndarray, rows: int) -> np.ndarray:
    """Smooth interpolation of a (k, m) array to (rows, m), row k-1 wrapping back to row 0."""
    i0, i1, f = _periodic_weights(len(a), rows)
    lo = a[i0]
    return lo + (a[i1] - lo) * f


@functools.lru_cache(maxsize=16)
def _unit_range(n: int) -> np.ndarray:
    u = np.linspace(0.0, 1.0, n, dtype=np.float32)
    u.flags.writeable = False
    return u


def _shading(d: _Draws, unit: np.ndarray, amplitude: float) -> np.ndarray:
    """A slow random quadratic over `unit` (coordinates in [-1, 1]), within about ±amplitude."""
    a, b = d.uniform(-amplitude, amplitude), d.uniform(-amplitude, amplitude)
    return unit * np.float32(a) + unit * unit * np.float32(b)


def _iris_texture(rng: np.random.Generator, d: _Draws, size: int, base: float) -> np.ndarray:
    """Iris in rubber-sheet coordinates: rows = angle 0..2π (plus a wrap row), columns = pupil edge → limbus."""
    rows, cols = max(64, 2 * size), max(12, size // 6)
    nf, nc = rows // 8, rows // 12
    noise = rng.random((rows + nf + nc + 12, 5), dtype=np.float32) - np.float32(0.5)
    # At 5 radial samples: fibres (one per row), coarser furrows, and crypts (dark blobs where a
    # smooth field peaks, kept off the pupil edge and the limbus); then stretched along the radius.
    fibres, furrows = noise[:rows], _periodic_upsample(noise[rows : rows + nf], rows)
    crypts = _periodic_upsample(noise[rows + nf : rows + nf + nc], rows) - np.float32(d.uniform(0.12, 0.22))
    np.maximum(crypts, 0.0, out=crypts)
    crypts *= np.array([0.0, 0.8, 1.0, 0.8, 0.0], np.float32) * np.float32(-d.uniform(0.4, 0.8))
    crypts += fibres * np.float32(d.uniform(0.14, 0.24))
    crypts += furrows * np.float32(d.uniform(0.09, 0.17))
    tex = cv2.resize(crypts, (cols, rows), interpolation=cv2.INTER_LINEAR)
    # Collarette: a wavy ring 0.25–0.4 of the way out; the pupillary zone inside it differs.
    u = _unit_range(cols)
    uc = _periodic_upsample(noise[rows + nf + nc :, :1], rows) * np.float32(0.07) + np.float32(d.uniform(0.25, 0.4))
    dist = np.abs(u - uc)
    tex += np.clip(1.0 - dist * np.float32(12.5), 0.0, 1.0) * np.float32(d.uniform(0.04, 0.08))
    tex += (u < uc) * np.float32(d.uniform(-0.02, 0.05))
    # Radial profile: base level and a darker limbus ring at the outer edge.
    tex += base - d.uniform(0.06, 0.14) * np.clip((u - 0.72) * (1 / 0.28), 0.0, 1.0) ** 2
    np.maximum(tex, np.float32(0.25), out=tex)
    return np.concatenate([tex, tex[:1]])


def _pupil_shape(d: _Draws, defect: str | None, pr: float, ir: float) -> dict:
    """Boundary radius over angle (a table, None for a round pupil), smear table and shape facts."""
    shape: dict = {"radius": None, "smear": None, "axis_ratio": 1.0, "angle": 0.0, "extent": pr}
    if defect is None or defect == "offcenter":
        return shape
    angles = np.arange(_LUT, dtype=np.float64) * (_TAU / _LUT)
    if defect == "oval":
        q = d.uniform(0.5, 0.72)
        a = 2.0 * pr / (1.0 + q)
        b = q * a
        alpha = d.uniform(0.0, math.pi)
        c, s = np.cos(angles - alpha), np.sin(angles - alpha)
        shape.update(radius=a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2), axis_ratio=q,
                     angle=math.degrees(alpha), semi_axes=[a, b])
    elif defect == "irregular":
        k1, k2 = d.integer(3, 7), d.integer(2, 6)
        a1, a2 = d.uniform(0.15, 0.24), d.uniform(0.0, 0.06)
        rad = pr * (1 + a1 * np.cos(k1 * angles + d.uniform(0, _TAU))
                    + a2 * np.cos(k2 * angles + d.uniform(0, _TAU)))
        shape.update(radius=rad, lobes=k1, lobe_amplitude=a1)
    elif defect == "bleed":
        rad = np.full(_LUT, float(pr))
        smear = np.full(_LUT, float(pr))
        tongues = []
        for _ in range(d.integer(1, 4)):
            phi, width = d.uniform(0, _TAU), d.uniform(0.2, 0.5)
            length = d.uniform(0.5, 0.95) * (ir - pr)
            dist = np.angle(np.exp(1j * (angles - phi)))  # wrapped angular distance to the tongue
            bump = np.clip(1.0 - (dist / width) ** 2, 0.0, None) ** 0.6
            rad += length * bump * (1 + 0.15 * np.sin(angles * d.integer(15, 30)))
            smear += 1.3 * length * np.clip(1.0 - (dist / (2.2 * width)) ** 2, 0.0, None)
            tongues.append([math.degrees(phi), length])
        shape.update(radius=rad, smear=smear, tongues=tongues)
    else:
        raise ValueError(f"unknown defect {defect!r}")
    outer = shape["smear"] if shape["smear"] is not None else shape["radius"]
    shape["extent"] = float(np.max(outer))
    for key in ("radius", "smear"):
        if shape[key] is not None:
            shape[key] = shape[key].astype(np.float32)
    return shape


def _box(cx: float, cy: float, r: float, size: int) -> tuple[slice, slice] | None:
    """Row and column slices of the image covering the disk (cx, cy, r), or None if it is outside."""
    x0, x1 = max(0, int(cx - r)), min(size, int(cx + r) + 2)
    y0, y1 = max(0, int(cy - r)), min(size, int(cy + r) + 2)
    return (slice(y0, y1), slice(x0, x1)) if x0 < x1 and y0 < y1 else None


def _coverage(signed: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (positive inside), in place."""
    signed *= np.float32(1.0 / width)
    signed += np.float32(0.5)
    return np.clip(signed, 0.0, 1.0, out=signed)


def _blend(img: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """img ← img + alpha · (value − img), in place."""
    diff = np.subtract(value, img, dtype=np.float32)
    diff *= alpha
    img += diff


def _lid_apexes(pcx: float, pcy: float, radius: float, lid_x: float, up_c: float, lo_c: float) -> tuple[float, float]:
    """Apex heights at which the upper/lower lid parabolas just clear the disk (pcx, pcy, radius)."""
    dx = radius * _SPAN
    half = np.sqrt(np.maximum(radius * radius - dx * dx, 0.0))
    off2 = (pcx + dx - lid_x) ** 2
    return float(np.min(pcy - half - up_c * off2)), float(np.max(pcy + half + lo_c * off2))


def _draw_lashes(rng: np.random.Generator, d: _Draws, img: np.ndarray, lid: dict, ir: float,
                 keep_out: tuple[float, float, float]) -> int:
    """Dark curved lashes hanging from the upper lid, drawn in place; returns their count."""
    size = img.shape[0]
    n = d.integer(12, 30)
    x0, y0, curv = lid["x"], lid["y"], lid["curvature"]
    u = rng.random((3, n))
    dx = (3.2 * u[0] - 1.6) * ir  # root offset from the lid apex
    root_y = (curv * dx) * dx + (y0 - 0.3)
    side = np.sign(dx)
    length = (0.15 + 0.3 * u[1]) * ir
    tilt = side * (0.1 + 0.3 / ir * np.abs(dx)) + 0.3 * (u[2] - 0.5)
    # A lash drops at most 0.75·length; near the pupil it may not reach below the keep-out line.
    pcx, pcy, reach = keep_out
    near = np.abs(dx + (x0 - pcx)) < reach + length * (np.abs(tilt) + 0.3)
    length[near] = np.clip((pcy - reach - root_y[near]) / 0.75, 0.0, length[near])
    # Each lash is a quadratic in t ∈ [0, 1]: x = root + L·tilt·t + 0.15·L·side·t², y = root + L·(t − 0.25·t²).
    coef = np.stack([dx + x0, length * tilt, 0.15 * length * side, root_y, length, -0.25 * length])
    pts = (coef.reshape(2, 3, n).transpose(0, 2, 1) @ _LASH_BASIS).transpose(1, 2, 0)  # (n, points, xy)
    bottom = min(size, int(pts[:, :, 1].max()) + 3)
    if bottom <= 0:
        return n
    canvas = np.zeros((bottom, size), np.uint8)
    cv2.polylines(canvas, list(np.round(pts * 16).astype(np.int32)), False, 255,
                  max(1, round(size / 200)), cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32)
    alpha *= np.float32(1 / 255)
    _blend(img[:bottom], alpha, np.float32(d.uniform(0.1, 0.2)))
    return n


def _draw_glints(img: np.ndarray, glints: list[list[float]], value: float) -> None:
    """Paint small bright disks (x, y, r) in place, computing only inside each disk's box."""
    X, Y, _, _ = _grids(img.shape[0])
    for gx, gy, gr in glints:
        box = _box(gx, gy, gr + 2, img.shape[0])
        if box is not None:
            dist = np.hypot(X[box] - np.float32(gx), Y[box] - np.float32(gy))
            _blend(img[box], _coverage(np.float32(gr) - dist, 0.8), np.float32(value))


def render_iris(rng: np.random.Generator, size: int, channels: int = 1,
                defect: str | None = None) -> tuple[np.ndarray, dict]:
    """Draw one eye; returns a (channels, size, size) float32 image in [-1, 1] and its record."""
    X, Y, axis, unit = _grids(size)
    d = _Draws(rng)
    s = size / 128.0
    f32 = np.float32
    # Geometry.
    ir = d.uniform(0.28, 0.42) * size
    icx, icy = (size - 1) / 2 + d.uniform(-0.08, 0.08) * size, (size - 1) / 2 + d.uniform(-0.08, 0.08) * size
    if defect == "offcenter":
        off = d.uniform(0.22, 0.4) * ir
        ratio = d.uniform(0.2, min(0.7, 0.88 - off / ir))
    else:
        off = d.uniform(0.0, 0.06) * ir
        ratio = d.uniform(0.35, 0.6) if defect == "irregular" else d.uniform(0.2, 0.7)  # lobes need room
    pr = ratio * ir
    direction = d.uniform(0, _TAU)
    pcx, pcy = icx + off * math.cos(direction), icy + off * math.sin(direction)
    shape = _pupil_shape(d, defect, pr, ir)

    # Grey levels before the global gain/offset, in [0, 1].
    sclera = d.uniform(0.6, 0.78)
    skin = sclera - d.uniform(0.0, 0.1)
    iris_base = d.uniform(0.36, 0.5)
    pupil_val = d.uniform(0.03, 0.08)

    # Background: separable soft shading and vignetting.
    vignette = unit * unit * f32(d.uniform(0.025, 0.1))
    img = np.add.outer(_shading(d, unit, 0.04) - vignette + f32(sclera), _shading(d, unit, 0.04) - vignette)

    # Iris, mapped from its rubber-sheet texture (only inside its bounding box).
    tex = _iris_texture(rng, d, size, iris_base)
    rows, cols = tex.shape[0] - 1, tex.shape[1]
    box = _box(icx, icy, ir + 3 * s, size)
    r_i, th_i = cv2.cartToPolar(X[box] - f32(icx), Y[box] - f32(icy))
    map_x = r_i - f32(pr)
    map_x *= f32((cols - 1) / (ir - pr))
    np.clip(map_x, 0, cols - 1, out=map_x)
    th_i *= f32(rows / _TAU)
    iris = cv2.remap(tex, map_x, th_i, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    _blend(img[box], _coverage(np.subtract(f32(ir), r_i), 1.5 * s), iris)

    # Pupil (and any pupil defect).
    edge_w = max(0.8, s)
    box = _box(pcx, pcy, shape["extent"] + 3 * edge_w, size)
    qx, qy = X[box] - f32(pcx), Y[box] - f32(pcy)
    if shape["radius"] is None:
        a_pupil = _coverage(np.subtract(f32(pr), cv2.magnitude(qx, qy)), edge_w)
    else:
        r_p, th_p = cv2.cartToPolar(qx, qy)
        th_p *= f32(_LUT / _TAU)
        idx = th_p.astype(np.int32) & (_LUT - 1)
        a_pupil = _coverage(shape["radius"][idx] - r_p, edge_w)
        if shape["smear"] is not None:
            smear = _coverage(shape["smear"][idx] - r_p, 3.0 * edge_w)
            a_pupil = np.maximum(a_pupil, smear * f32(d.uniform(0.6, 0.85)))
    _blend(img[box], a_pupil, f32(pupil_val))

    # Eyelids: parabolas that may hide the top/bottom of the iris but never the pupil.
    margin = max(0.08 * ir, 2.0)
    lid_x = icx + d.normal(0.1) * ir
    up_c = d.uniform(1.0, 1.6) / (d.uniform(2.0, 2.6) ** 2 * ir)
    lo_c = d.uniform(0.6, 1.1) / (d.uniform(2.0, 2.6) ** 2 * ir)
    clear_up, clear_lo = _lid_apexes(pcx, pcy, shape["extent"] + margin, lid_x, up_c, lo_c)
    up_y = min(icy - d.uniform(0.45, 1.25) * ir, clear_up)
    lo_y = max(icy + d.uniform(0.6, 1.3) * ir, clear_lo)
    dxl2 = (axis - f32(lid_x)) ** 2
    lid_w = 1.5 * s
    upper = f32(up_y) + f32(up_c) * dxl2  # the upper lid covers y < upper[x]
    bottom = min(size, int(upper.max() + lid_w) + 2)
    if bottom > 0:
        above = upper[None, :] - Y[:bottom]
        depth, dark = 0.15 * ir, d.uniform(0.1, 0.25)
        lid_val = np.clip(above, 0.0, depth)  # a darker band along the lid margin
        lid_val *= f32(dark / depth)
        lid_val += (_shading(d, unit, 0.04) + f32(skin - dark))[None, :]
        _blend(img[:bottom], _coverage(above, lid_w), lid_val)
    lower = f32(lo_y) - f32(lo_c) * dxl2  # the lower lid covers y > lower[x]
    top = max(0, int(lower.min() - lid_w) - 1)
    if top < size:
        _blend(img[top:], _coverage(Y[top:] - lower[None, :], lid_w), (_shading(d, unit, 0.04) + f32(skin))[None, :])
    upper_lid = {"x": float(lid_x), "y": float(up_y), "curvature": float(up_c)}
    lower_lid = {"x": float(lid_x), "y": float(lo_y), "curvature": float(lo_c)}

    # Lashes from the upper lid.
    n_lashes = _draw_lashes(rng, d, img, upper_lid, ir, (pcx, pcy, shape["extent"] + margin))

    # Specular reflections of the illuminator, in the pupil or on its edge.
    ang = d.uniform(0, _TAU)
    dist = pr * (d.uniform(0.85, 1.05) if d.chance(0.3) else d.uniform(0.0, 0.6))
    glints = [[pcx + dist * math.cos(ang), pcy + dist * math.sin(ang)]]
    if d.chance(0.5):
        glints.append([glints[0][0] + d.uniform(0.03, 0.06) * size * (1 if d.chance(0.5) else -1),
                       glints[0][1] + d.normal(0.01) * size])
    glints = [[float(gx), float(gy), max(0.5, min(d.uniform(0.008, 0.02) * size, 0.3 * pr))] for gx, gy in glints]
    _draw_glints(img, glints, d.uniform(0.92, 1.0))

    # Optics and sensor: blur, global gain/offset, noise; then [0, 1] → [-1, 1].
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=d.uniform(0.5, 1.0) * s)
    gain, offset = d.uniform(0.85, 1.15), d.uniform(-0.03, 0.05)
    noise_sigma = 2.0 * d.uniform(0.008, 0.025)
    bank = _noise_bank(size)
    out = np.empty((channels, size, size), np.float32)
    for ch in range(channels):
        tint = 1.0 + (d.uniform(-0.04, 0.04) if channels > 1 else 0.0)
        oy, ox = d.integer(0, size + 1), d.integer(0, size + 1)
        layer = bank[oy : oy + size, ox : ox + size] * f32(noise_sigma)
        layer += f32(2.0 * offset - 1.0)
        layer += img * f32(2.0 * gain * tint)
        np.clip(layer, -1.0, 1.0, out=out[ch])

    record = {
        "pupil_cx": float(pcx), "pupil_cy": float(pcy), "pupil_r": float(pr),
        "pupil_axis_ratio": float(shape["axis_ratio"]), "pupil_angle": float(shape["angle"]),
        "iris_cx": float(icx), "iris_cy": float(icy), "iris_r": float(ir),
        "defect": defect,
        "pupil_iris_ratio": float(pr / ir), "concentricity": float(off / ir),
        "pupil_value": 2.0 * (pupil_val * gain + offset) - 1.0,
        "iris_value": 2.0 * (iris_base * gain + offset) - 1.0,
        "upper_lid": upper_lid, "lower_lid": lower_lid,
        "reflections": glints, "lashes": n_lashes, "noise_sigma": noise_sigma,
    }
    for key in ("semi_axes", "lobes", "lobe_amplitude", "tongues"):
        if key in shape:
            record[key] = shape[key]
    return out, record


def _check_defects(n: int, defects: float | Sequence[str | None]) -> float | list[str | None]:
    """Validate `defects`: a fraction in [0, 1] or one valid name/None per image."""
    if isinstance(defects, (int, float)) and not isinstance(defects, bool):
        if not 0.0 <= float(defects) <= 1.0:
            raise UserError(f"defects fraction must be in [0, 1], got {defects}")
        return float(defects)
    names = [None if d in (None, "none", "None", "") else d for d in defects]
    if len(names) != n:
        raise UserError(f"defects list has {len(names)} entries for {n} images")
    bad = sorted({str(d) for d in names if d is not None and d not in DEFECTS})
    if bad:
        raise UserError(f"unknown defect(s) {', '.join(bad)}; valid: {', '.join(DEFECTS)} or None")
    return names


def iter_irises(n: int, size: int = 128, seed: int = 0, channels: int = 1,
                defects: float | Sequence[str] = 0.0) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (image (channels, size, size), record) one at a time; see `generate_irises`.

    The arguments are checked before the first image is drawn.
    """
    if n < 0:
        raise UserError(f"number of images must be >= 0, got {n}")
    if size < 16:
        raise UserError(f"synthetic image size must be >= 16, got {size}")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    kinds = _check_defects(n, defects)

    def draw() -> Iterator[tuple[np.ndarray, dict]]:
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            pick, kind = rng.random(), DEFECTS[int(rng.integers(len(DEFECTS)))]  # always drawn: stable streams
            defect = (kind if pick < kinds else None) if isinstance(kinds, float) else kinds[i]
            yield render_iris(rng, size, channels, defect)

    return draw()


def generate_irises(n: int, size: int = 128, seed: int = 0, channels: int = 1,
                    defects: float | Sequence[str] = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Return images float32 (n, channels, size, size) in [-1, 1] and one ground-truth record per image.

    `defects` is the fraction of images given a random defect, or one name/None per image.
    Image i depends only on (seed, i) (and its defect), so subsets of a draw are stable.
    """
    images = np.empty((max(n, 0), channels, size, size), np.float32)
    records = []
    for i, (img, rec) in enumerate(iter_irises(n, size, seed, channels, defects)):
        images[i] = img
        records.append(rec)
    return images, records


def write_dataset(out: str | Path, n: int, size: int = 128, seed: int = 0, channels: int = 1,
                  defects: float | Sequence[str] = 0.0, overwrite: bool = False) -> Path:
    """Write `OUT/000000.png …` and `OUT/labels.json` (records with a `file` key), atomically."""
    final = prepare_out_dir(out, overwrite)
    irises = iter_irises(n, size, seed, channels, defects)  # checks the arguments before touching disk
    tmp = temp_dir_for(final)
    try:
        labels = []
        for i, (img, rec) in enumerate(tqdm(irises, total=n, desc="drawing", unit="img", leave=False)):
            labels.append({"file": f"{i:06d}.png", **rec})
            write_png(tmp / labels[-1]["file"], img)
        (tmp / "labels.json").write_text(json.dumps(labels, indent=1))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.data.synthetic OUT --n 1000 --size 128`: write synthetic irises as PNGs."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 = grey, 3 = RGB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defects", type=float, default=0.0, help="fraction of images with a defect")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    final = write_dataset(args.out, args.n, args.size, args.seed, args.channels, args.defects, args.overwrite)
    print(f"wrote {args.n} images and labels.json to {final}")
    return 0


if __name__ == "__main__":
    main()
