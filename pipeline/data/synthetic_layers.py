"""The drawing layers of the synthetic eyes: random draws, pixel grids, iris texture, pupil shapes,
anti-aliased coverage and blending, eyelids, lashes and glints (used by `pipeline.data.synthetic`).

Coordinates are pixels, x = column, y = row, origin top-left, the centre of pixel (0, 0) at 0.0.
Everything draws from the caller's generator in a fixed order, so an image depends only on its seed.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

LUT = 1024  # angular resolution of pupil-boundary lookup tables
TAU = 2.0 * math.pi
_SPAN = np.linspace(-1.0, 1.0, 33)  # sample offsets across a disk (lid clearance)
_LASH_BASIS = np.linspace(0.0, 1.0, 7) ** np.arange(3)[:, None]  # 1, t, t² at the points along a lash


class Draws:
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
        u1, u2 = self.uniform(1e-12, 1.0), self.uniform(0.0, TAU)
        return sd * math.sqrt(-2.0 * math.log(u1)) * math.cos(u2)

    def chance(self, p: float) -> bool:
        return self.uniform(0.0, 1.0) < p


@functools.lru_cache(maxsize=8)
def grids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read-only float32 pixel-centre coordinates X, Y, the 1-D axis and the axis scaled to [-1, 1]."""
    axis = np.arange(size, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    unit = axis * np.float32(2.0 / (size - 1)) - np.float32(1.0)
    for a in (x, y, axis, unit):
        a.flags.writeable = False
    return x, y, axis, unit


@functools.lru_cache(maxsize=8)
def noise_bank(size: int) -> np.ndarray:
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


def shading(d: Draws, unit: np.ndarray, amplitude: float) -> np.ndarray:
    """A slow random quadratic over `unit` (coordinates in [-1, 1]), within about ±amplitude."""
    a, b = d.uniform(-amplitude, amplitude), d.uniform(-amplitude, amplitude)
    return unit * np.float32(a) + unit * unit * np.float32(b)


def iris_texture(rng: np.random.Generator, d: Draws, size: int, base: float) -> np.ndarray:
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


def pupil_shape(d: Draws, defect: str | None, pr: float, ir: float) -> dict:
    """Boundary radius over angle (a table, None for a round pupil), smear table and shape facts."""
    shape: dict = {"radius": None, "smear": None, "axis_ratio": 1.0, "angle": 0.0, "extent": pr}
    if defect is None or defect == "offcenter":
        return shape
    angles = np.arange(LUT, dtype=np.float64) * (TAU / LUT)
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
        rad = pr * (1 + a1 * np.cos(k1 * angles + d.uniform(0, TAU))
                    + a2 * np.cos(k2 * angles + d.uniform(0, TAU)))
        shape.update(radius=rad, lobes=k1, lobe_amplitude=a1)
    elif defect == "bleed":
        rad = np.full(LUT, float(pr))
        smear = np.full(LUT, float(pr))
        tongues = []
        for _ in range(d.integer(1, 4)):
            phi, width = d.uniform(0, TAU), d.uniform(0.2, 0.5)
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


def box(cx: float, cy: float, r: float, size: int) -> tuple[slice, slice] | None:
    """Row and column slices of the image covering the disk (cx, cy, r), or None if it is outside."""
    x0, x1 = max(0, int(cx - r)), min(size, int(cx + r) + 2)
    y0, y1 = max(0, int(cy - r)), min(size, int(cy + r) + 2)
    return (slice(y0, y1), slice(x0, x1)) if x0 < x1 and y0 < y1 else None


def coverage(signed: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (positive inside), in place."""
    signed *= np.float32(1.0 / width)
    signed += np.float32(0.5)
    return np.clip(signed, 0.0, 1.0, out=signed)


def blend(img: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """img ← img + alpha · (value − img), in place."""
    diff = np.subtract(value, img, dtype=np.float32)
    diff *= alpha
    img += diff


def lid_apexes(pcx: float, pcy: float, radius: float, lid_x: float, up_c: float, lo_c: float) -> tuple[float, float]:
    """Apex heights at which the upper/lower lid parabolas just clear the disk (pcx, pcy, radius)."""
    dx = radius * _SPAN
    half = np.sqrt(np.maximum(radius * radius - dx * dx, 0.0))
    off2 = (pcx + dx - lid_x) ** 2
    return float(np.min(pcy - half - up_c * off2)), float(np.max(pcy + half + lo_c * off2))


def draw_lashes(rng: np.random.Generator, d: Draws, img: np.ndarray, lid: dict, ir: float,
                keep_out: tuple[float, float, float]) -> tuple[int, np.ndarray | None]:
    """Dark curved lashes hanging from the upper lid, drawn in place; returns their count and
    their coverage in [0, 1] of the image's top rows (None when they fall outside it)."""
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
        return n, None
    canvas = np.zeros((bottom, size), np.uint8)
    cv2.polylines(canvas, list(np.round(pts * 16).astype(np.int32)), False, 255,
                  max(1, round(size / 200)), cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32)
    alpha *= np.float32(1 / 255)
    blend(img[:bottom], alpha, np.float32(d.uniform(0.1, 0.2)))
    return n, alpha


def draw_glints(img: np.ndarray, glints: list[list[float]], value: float) -> None:
    """Paint small bright disks (x, y, r) in place, computing only inside each disk's box."""
    X, Y, _, _ = grids(img.shape[0])
    for gx, gy, gr in glints:
        where = box(gx, gy, gr + 2, img.shape[0])
        if where is not None:
            dist = np.hypot(X[where] - np.float32(gx), Y[where] - np.float32(gy))
            blend(img[where], coverage(np.float32(gr) - dist, 0.8), np.float32(value))
