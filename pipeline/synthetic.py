"""Procedural near-infrared iris images with known ground truth (the built-in dataset).

Each image is drawn from its own generator `default_rng([seed, i])`, so image i depends only on
(seed, i): the first k images of a larger draw equal a draw of k images.

Coordinates are pixels, x = column, y = row, origin top-left, the centre of pixel (0, 0) at 0.0.
Layers, back to front: sclera → iris (polar texture: fibres, furrows, crypts, collarette,
limbus) → pupil (round, or a defect) → eyelids → lashes → specular glints; then blur, global
gain/offset and sensor noise. The pupil is never covered by the lids.

Defects (labelled in the record's `defect`):
  bleed      dark tongues and smears reaching from the pupil into the iris
  irregular  lobed pupil boundary (radial deviation std/mean ≥ 0.1)
  oval       elliptical pupil, minor/major axis ratio 0.5–0.72
  offcenter  pupil centre 0.22–0.4 iris radii from the iris centre
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.errors import UserError

DEFECTS = ("bleed", "irregular", "oval", "offcenter")
_LUT = 1024  # angular resolution of pupil-boundary lookup tables
_TAU = 2.0 * math.pi


@functools.lru_cache(maxsize=8)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates X, Y and a normalised squared distance from the image centre."""
    ax = np.arange(size, dtype=np.float32)
    x, y = np.meshgrid(ax, ax)
    c = (size - 1) / 2.0
    rr = ((x - c) ** 2 + (y - c) ** 2) / (2.0 * c * c)
    for a in (x, y, rr):
        a.flags.writeable = False
    return x, y, rr.astype(np.float32)


def _wrap_blur(noise: np.ndarray, sigma_rows: float, sigma_cols: float) -> np.ndarray:
    """Gaussian blur that wraps around the row (angle) axis and reflects along columns."""
    pad = int(math.ceil(3 * sigma_rows)) + 1
    padded = cv2.copyMakeBorder(noise, pad, pad, 0, 0, cv2.BORDER_WRAP)
    out = cv2.GaussianBlur(padded, (0, 0), sigmaX=max(sigma_cols, 0.1), sigmaY=max(sigma_rows, 0.1),
                           borderType=cv2.BORDER_REFLECT)
    out = out[pad:-pad]
    return out / (out.std() + 1e-6)


def _iris_texture(rng: np.random.Generator, size: int, base: float) -> np.ndarray:
    """Iris in rubber-sheet coordinates: rows = angle 0..2π, columns = pupil edge → limbus."""
    rows, cols = max(64, 2 * size), max(16, size // 4)
    u = np.linspace(0.0, 1.0, cols, dtype=np.float32)[None, :]
    fibres = _wrap_blur(rng.standard_normal((rows, cols), dtype=np.float32), 0.6 * rows / 256, cols * 0.3)
    furrows = _wrap_blur(rng.standard_normal((rows, cols), dtype=np.float32), 2.5 * rows / 256, cols * 0.08)
    crypt_seeds = np.zeros((rows, cols), np.float32)
    k = int(rng.integers(4, 14))
    crypt_seeds[rng.integers(0, rows, k), rng.integers(int(0.15 * cols), int(0.85 * cols), k)] = rng.uniform(0.5, 1.0, k)
    crypts = cv2.GaussianBlur(crypt_seeds, (0, 0), sigmaX=0.05 * cols + 0.5, sigmaY=rows / 180)
    crypts /= crypts.max() + 1e-6
    # Collarette: a wavy ring a third of the way out; the pupillary zone inside it is lighter.
    wave = _wrap_blur(rng.standard_normal((rows, 1), dtype=np.float32), rows / 40, 0.1)
    uc = rng.uniform(0.25, 0.4) + 0.035 * wave
    collarette = np.exp(-(((u - uc) / 0.05) ** 2))
    limbus = np.clip((u - 0.75) / 0.25, 0.0, 1.0) ** 2
    tex = (base
           + rng.uniform(0.035, 0.06) * fibres
           + rng.uniform(0.02, 0.04) * furrows
           - rng.uniform(0.08, 0.16) * crypts
           + rng.uniform(0.04, 0.08) * collarette
           + rng.uniform(0.0, 0.04) * (u < uc)
           - rng.uniform(0.06, 0.14) * limbus)
    return np.maximum(tex, 0.24).astype(np.float32)


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency shading in about [-1, 1]."""
    coarse = rng.standard_normal((4, 4)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _pupil_shape(rng: np.random.Generator, defect: str | None, pr: float, ir: float) -> dict:
    """Boundary radius table over angle (None for a round pupil), smear table and shape facts."""
    angles = np.arange(_LUT, dtype=np.float64) * (_TAU / _LUT)
    shape: dict = {"radius": None, "smear": None, "axis_ratio": 1.0, "angle": 0.0}
    if defect == "oval":
        q = rng.uniform(0.5, 0.72)
        a = 2.0 * pr / (1.0 + q)
        b = q * a
        alpha = rng.uniform(0.0, math.pi)
        c, s = np.cos(angles - alpha), np.sin(angles - alpha)
        shape.update(radius=a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2), axis_ratio=q,
                     angle=math.degrees(alpha), semi_axes=[a, b])
    elif defect == "irregular":
        k1, k2 = int(rng.integers(3, 8)), int(rng.integers(2, 6))
        a1, a2 = rng.uniform(0.15, 0.24), rng.uniform(0.0, 0.06)
        rad = pr * (1 + a1 * np.cos(k1 * angles + rng.uniform(0, _TAU))
                    + a2 * np.cos(k2 * angles + rng.uniform(0, _TAU)))
        shape.update(radius=rad, lobes=k1, lobe_amplitude=a1)
    elif defect == "bleed":
        rad = np.full(_LUT, pr)
        smear = np.full(_LUT, pr)
        tongues = []
        for _ in range(int(rng.integers(1, 4))):
            phi, width = rng.uniform(0, _TAU), rng.uniform(0.12, 0.35)
            length = rng.uniform(0.4, 0.9) * (ir - pr)
            d = np.angle(np.exp(1j * (angles - phi)))  # wrapped angular distance
            bump = np.clip(1.0 - (d / width) ** 2, 0.0, None) ** 0.6
            rad += length * bump * (1 + 0.15 * np.sin(angles * rng.integers(15, 30)))
            smear += 1.3 * length * np.clip(1.0 - (d / (2.2 * width)) ** 2, 0.0, None)
            tongues.append([math.degrees(phi), float(length)])
        shape.update(radius=rad, smear=smear, tongues=tongues)
    return shape


def _soft_inside(signed: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (positive inside)."""
    return np.clip(signed * (1.0 / width) + 0.5, 0.0, 1.0)


def _draw_lashes(rng: np.random.Generator, size: int, lid: dict, ir: float, keep_out: tuple) -> tuple[np.ndarray, int]:
    """Dark curved lashes hanging from the upper lid; coverage in [0, 1] and their count."""
    n = int(rng.integers(5, 16))
    x0, y0, curv = lid["x"], lid["y"], lid["curvature"]
    rx = x0 + rng.uniform(-1.5, 1.5, n) * ir
    ry = y0 + curv * (rx - x0) ** 2 - 0.5
    side = np.sign(rx - x0 + 1e-6)
    length = rng.uniform(0.12, 0.3, n) * ir
    tilt = side * rng.uniform(0.1, 0.7, n)
    t = np.linspace(0.0, 1.0, 6)[None, :]
    px = rx[:, None] + length[:, None] * (tilt[:, None] * t + 0.35 * side[:, None] * t**2)
    py = ry[:, None] + length[:, None] * (t - 0.6 * t**2)
    # Keep lash tips off the pupil so the pupil stays fully visible.
    pcx, pcy, reach = keep_out
    near = np.abs(px - pcx) < reach
    too_low = np.where(near, py - (pcy - reach), -np.inf).max(axis=1)
    scale = np.where(too_low > 0, np.clip(1 - too_low / (length + 1e-6), 0.0, 1.0), 1.0)
    px = rx[:, None] + (px - rx[:, None]) * scale[:, None]
    py = ry[:, None] + (py - ry[:, None]) * scale[:, None]
    pts = np.round(np.stack([px, py], axis=-1) * 16).astype(np.int32)
    canvas = np.zeros((size, size), np.uint8)
    thickness = max(1, round(size / 128))
    cv2.polylines(canvas, list(pts), False, 255, thickness, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) * (1.0 / 255.0), n


def _draw_glints(img: np.ndarray, glints: list[list[float]], value: float) -> None:
    """Paint small bright disks (x, y, r) in place, computing only inside each disk's window."""
    size = img.shape[0]
    for gx, gy, gr in glints:
        x0, x1 = max(0, int(gx - gr - 2)), min(size, int(gx + gr + 3))
        y0, y1 = max(0, int(gy - gr - 2)), min(size, int(gy + gr + 3))
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        cover = _soft_inside(gr - np.hypot(xx - gx, yy - gy), 0.8)
        win = img[y0:y1, x0:x1]
        win += cover * (value - win)


def render_iris(rng: np.random.Generator, size: int, channels: int = 1,
                defect: str | None = None) -> tuple[np.ndarray, dict]:
    """Draw one eye; returns a (channels, size, size) float32 image in [-1, 1] and its record."""
    X, Y, vignette_r2 = _grids(size)
    s = size / 128.0
    # Geometry.
    ir = rng.uniform(0.28, 0.42) * size
    icx, icy = (size - 1) / 2 + rng.uniform(-0.08, 0.08, 2) * size
    if defect == "offcenter":
        off = rng.uniform(0.22, 0.4) * ir
        ratio = rng.uniform(0.2, min(0.7, 0.88 - off / ir))
    else:
        off = rng.uniform(0.0, 0.06) * ir
        ratio = rng.uniform(0.2, 0.6 if defect == "irregular" else 0.7)
    pr = ratio * ir
    direction = rng.uniform(0, _TAU)
    pcx, pcy = icx + off * math.cos(direction), icy + off * math.sin(direction)
    shape = _pupil_shape(rng, defect, pr, ir)
    pupil_extent = float(np.max(shape["radius"])) if shape["radius"] is not None else pr

    # Grey levels (before the global gain/offset), in [0, 1].
    sclera = rng.uniform(0.6, 0.78)
    skin = sclera - rng.uniform(0.0, 0.1)
    iris_base = rng.uniform(0.36, 0.5)
    pupil_val = rng.uniform(0.03, 0.08)

    # Background with soft shading and vignetting.
    img = sclera + 0.04 * _smooth_field(rng, size) - rng.uniform(0.05, 0.2) * vignette_r2

    # Iris from its rubber-sheet texture.
    dx, dy = X - np.float32(icx), Y - np.float32(icy)
    r_i, th_i = cv2.cartToPolar(dx, dy)
    tex = _iris_texture(rng, size, iris_base)
    rows, cols = tex.shape
    map_x = np.clip((r_i - np.float32(pr)) * np.float32((cols - 1) / (ir - pr)), 0, cols - 1)
    map_y = th_i * np.float32(rows / _TAU)
    iris = cv2.remap(tex, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
    a_iris = _soft_inside(np.float32(ir) - r_i, 1.5 * s)
    img += a_iris * (iris - img)

    # Pupil (and any pupil defect).
    qx, qy = X - np.float32(pcx), Y - np.float32(pcy)
    edge_w = max(0.8, 1.0 * s)
    if shape["radius"] is None:
        a_pupil = _soft_inside(np.float32(pr) - cv2.magnitude(qx, qy), edge_w)
    else:
        r_p, th_p = cv2.cartToPolar(qx, qy)
        idx = (th_p * np.float32(_LUT / _TAU)).astype(np.int32) & (_LUT - 1)
        a_pupil = _soft_inside(shape["radius"].astype(np.float32)[idx] - r_p, edge_w)
        if shape["smear"] is not None:
            smear = _soft_inside(shape["smear"].astype(np.float32)[idx] - r_p, 3.0 * edge_w)
            a_pupil = np.maximum(a_pupil, rng.uniform(0.5, 0.75) * smear)
    img += a_pupil * (np.float32(pupil_val) - img)

    # Eyelids: parabolas that may hide the top/bottom of the iris but never the pupil.
    margin = max(0.08 * ir, 2.0)
    lid_x = icx + rng.normal(0.0, 0.1) * ir
    up_y = min(icy - rng.uniform(0.45, 1.25) * ir, pcy - pupil_extent - margin)
    lo_y = max(icy + rng.uniform(0.6, 1.3) * ir, pcy + pupil_extent + margin)
    up_c = rng.uniform(1.0, 1.6) * ir / (rng.uniform(2.0, 2.6) * ir) ** 2
    lo_c = rng.uniform(0.6, 1.1) * ir / (rng.uniform(2.0, 2.6) * ir) ** 2
    x_row = np.arange(size, dtype=np.float32)
    above = (up_y + up_c * (x_row - lid_x) ** 2)[None, :] - Y  # > 0 inside the upper lid
    below = Y - (lo_y - lo_c * (x_row - lid_x) ** 2)[None, :]  # > 0 inside the lower lid
    lid_w = 1.5 * s
    a_lid = np.maximum(_soft_inside(above, lid_w), _soft_inside(below, lid_w))
    shadow = rng.uniform(0.1, 0.25) * np.clip(1.0 - above * np.float32(1.0 / (0.12 * ir)), 0.0, 1.0)
    lid_val = skin + 0.05 * _smooth_field(rng, size) - shadow
    img += a_lid * (lid_val - img)
    upper_lid = {"x": float(lid_x), "y": float(up_y), "curvature": float(up_c)}
    lower_lid = {"x": float(lid_x), "y": float(lo_y), "curvature": float(lo_c)}

    # Lashes from the upper lid.
    lashes, n_lashes = _draw_lashes(rng, size, upper_lid, ir, (pcx, pcy, pupil_extent + margin))
    img += lashes * (np.float32(rng.uniform(0.14, 0.24)) - img)

    # Specular reflections of the illuminator, in the pupil or on its edge.
    glints = []
    for k in range(1 + int(rng.random() < 0.5)):
        if k == 0:
            on_edge = rng.random() < 0.3
            d = pr * (rng.uniform(0.85, 1.05) if on_edge else rng.uniform(0.0, 0.6))
            ang = rng.uniform(0, _TAU)
            gx, gy = pcx + d * math.cos(ang), pcy + d * math.sin(ang)
        else:
            gx, gy = glints[0][0] + rng.choice([-1, 1]) * rng.uniform(0.03, 0.06) * size, glints[0][1] + rng.normal(0, 0.01) * size
        glints.append([float(gx), float(gy), float(max(0.7, rng.uniform(0.012, 0.028) * size))])
    _draw_glints(img, glints, float(rng.uniform(0.92, 1.0)))

    # Optics and sensor: blur, global gain/offset, noise.
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.5, 1.0) * s)
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-0.03, 0.05)
    noise_sigma = rng.uniform(0.008, 0.025)
    out = np.empty((channels, size, size), np.float32)
    tint = 1.0 + (rng.uniform(-0.04, 0.04, channels) if channels > 1 else np.zeros(1))
    for c in range(channels):
        noisy = img * np.float32(gain * tint[c] * 2.0) + np.float32(2.0 * offset - 1.0)
        noisy += rng.standard_normal((size, size), dtype=np.float32) * np.float32(2.0 * noise_sigma)
        np.clip(noisy, -1.0, 1.0, out=out[c])

    record = {
        "pupil_cx": float(pcx), "pupil_cy": float(pcy), "pupil_r": float(pr),
        "pupil_axis_ratio": float(shape["axis_ratio"]), "pupil_angle": float(shape["angle"]),
        "iris_cx": float(icx), "iris_cy": float(icy), "iris_r": float(ir),
        "defect": defect,
        "pupil_iris_ratio": float(pr / ir), "concentricity": float(off / ir),
        "pupil_value": float(2.0 * (pupil_val * gain + offset) - 1.0),
        "iris_value": float(2.0 * (iris_base * gain + offset) - 1.0),
        "upper_lid": upper_lid, "lower_lid": lower_lid,
        "reflections": glints, "lashes": n_lashes,
        "blur_sigma_noise": float(noise_sigma),
    }
    for key in ("semi_axes", "lobes", "lobe_amplitude", "tongues"):
        if key in shape:
            record[key] = shape[key] if not isinstance(shape[key], float) else float(shape[key])
    return out, record


def _defect_list(n: int, seed: int, defects: float | Sequence[str | None]) -> list[str | None]:
    """Per-image defect names from a fraction (drawn per image from (seed, i)) or a list."""
    if isinstance(defects, (int, float)) and not isinstance(defects, bool):
        frac = float(defects)
        if not 0.0 <= frac <= 1.0:
            raise UserError(f"defects fraction must be in [0, 1], got {frac}")
        chosen = []
        for i in range(n):
            rng = np.random.default_rng([seed, i, 1])
            chosen.append(DEFECTS[int(rng.integers(len(DEFECTS)))] if rng.random() < frac else None)
        return chosen
    names = list(defects)
    if len(names) != n:
        raise UserError(f"defects list has {len(names)} entries for {n} images")
    bad = sorted({str(d) for d in names if d is not None and d not in DEFECTS})
    if bad:
        raise UserError(f"unknown defect(s) {', '.join(bad)}; valid: {', '.join(DEFECTS)} or None")
    return names


def generate_irises(n: int, size: int = 128, seed: int = 0, channels: int = 1,
                    defects: float | Sequence[str] = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Return images float32 (n, channels, size, size) in [-1, 1] and one ground-truth record per image.

    `defects` is the fraction of images given a random defect, or one name/None per image.
    Image i depends only on (seed, i).
    """
    if n < 0:
        raise UserError(f"number of images must be >= 0, got {n}")
    if size < 16:
        raise UserError(f"synthetic image size must be >= 16, got {size}")
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    kinds = _defect_list(n, seed, defects)
    images = np.empty((n, channels, size, size), np.float32)
    records = []
    for i in range(n):
        images[i], rec = render_iris(np.random.default_rng([seed, i]), size, channels, kinds[i])
        records.append(rec)
    return images, records
