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

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.common.errors import UserError
from pipeline.common.files import building, prepare_out_dir
from pipeline.common.images import write_image
from pipeline.data.synthetic_layers import (
    LUT,
    TAU,
    Draws,
    blend,
    box,
    coverage,
    draw_glints,
    draw_lashes,
    grids,
    iris_texture,
    lid_apexes,
    noise_bank,
    pupil_shape,
    shading,
)

DEFECTS = ("bleed", "irregular", "oval", "offcenter")
GOOD_LIDS = ((0.45, 1.25), (0.6, 1.3))  # lid apexes this many iris radii above / below the iris centre


@dataclass(frozen=True)
class Eye:
    """Where an eye sits: iris circle, pupil centre and radius, and the centre offset between them."""

    size: int
    icx: float
    icy: float
    ir: float
    pcx: float
    pcy: float
    pr: float
    off: float
    s: float  # the eye's scale: lengths drawn for a 128 px image are multiplied by it

    @classmethod
    def around(cls, size: int, icx: float, icy: float, ir: float, ratio: float, off: float,
               direction: float, s: float) -> Eye:
        """The eye whose pupil (radius ratio·ir) sits `off` px from the iris centre towards
        `direction` (radians from +x towards +y)."""
        return cls(size, icx, icy, ir, icx + off * math.cos(direction), icy + off * math.sin(direction),
                   ratio * ir, off, s)


@dataclass(frozen=True)
class Levels:
    """An eye's grey levels in [0, 1], before the global gain/offset."""

    sclera: float
    skin: float
    iris: float  # the iris texture's base level
    pupil: float


def draw_levels(d: Draws) -> Levels:
    """Sclera, skin (a little darker than the sclera), iris base and pupil grey."""
    sclera = d.uniform(0.6, 0.78)
    return Levels(sclera, sclera - d.uniform(0.0, 0.1), d.uniform(0.36, 0.5), d.uniform(0.03, 0.08))


def _place_eye(d: Draws, size: int, defect: str | None) -> Eye:
    """Iris radius and centre, pupil/iris ratio and the pupil's offset from the iris centre."""
    ir = d.uniform(0.28, 0.42) * size
    icx, icy = (size - 1) / 2 + d.uniform(-0.08, 0.08) * size, (size - 1) / 2 + d.uniform(-0.08, 0.08) * size
    if defect == "offcenter":
        off = d.uniform(0.22, 0.4) * ir
        ratio = d.uniform(0.2, min(0.7, 0.88 - off / ir))
    else:
        off = d.uniform(0.0, 0.06) * ir
        ratio = d.uniform(0.35, 0.6) if defect == "irregular" else d.uniform(0.2, 0.7)  # lobes need room
    return Eye.around(size, icx, icy, ir, ratio, off, d.uniform(0, TAU), size / 128.0)


def _paint_iris(img: np.ndarray, eye: Eye, tex: np.ndarray) -> None:
    """The iris, mapped from its rubber-sheet texture (`iris_texture`) between the circle of the
    pupil's radius and the limbus, both about the iris centre (only inside its bounding box)."""
    f32 = np.float32
    X, Y, _, _ = grids(eye.size)
    rows, cols = tex.shape[0] - 1, tex.shape[1]
    where = box(eye.icx, eye.icy, eye.ir + 3 * eye.s, eye.size)
    r_i, th_i = cv2.cartToPolar(X[where] - f32(eye.icx), Y[where] - f32(eye.icy))
    map_x = r_i - f32(eye.pr)
    map_x *= f32((cols - 1) / (eye.ir - eye.pr))
    np.clip(map_x, 0, cols - 1, out=map_x)
    th_i *= f32(rows / TAU)
    iris = cv2.remap(tex, map_x, th_i, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    blend(img[where], coverage(np.subtract(f32(eye.ir), r_i), 1.5 * eye.s), iris)


def _paint_pupil(img: np.ndarray, d: Draws, eye: Eye, shape: dict, value: float) -> None:
    """The pupil (and any pupil defect: its boundary table and a grey smear)."""
    f32 = np.float32
    X, Y, _, _ = grids(eye.size)
    edge_w = max(0.8, eye.s)
    where = box(eye.pcx, eye.pcy, shape["extent"] + 3 * edge_w, eye.size)
    qx, qy = X[where] - f32(eye.pcx), Y[where] - f32(eye.pcy)
    if shape["radius"] is None:
        a_pupil = coverage(np.subtract(f32(eye.pr), cv2.magnitude(qx, qy)), edge_w)
    else:
        r_p, th_p = cv2.cartToPolar(qx, qy)
        th_p *= f32(LUT / TAU)
        idx = th_p.astype(np.int32) & (LUT - 1)
        a_pupil = coverage(shape["radius"][idx] - r_p, edge_w)
        if shape["smear"] is not None:
            smear = coverage(shape["smear"][idx] - r_p, 3.0 * edge_w)
            a_pupil = np.maximum(a_pupil, smear * f32(d.uniform(0.6, 0.85)))
    blend(img[where], a_pupil, f32(value))


def _paint_lids(img: np.ndarray, d: Draws, eye: Eye, keep_clear: float, skin: float,
                openness: tuple[tuple[float, float], tuple[float, float]]) -> tuple[dict, dict]:
    """Eyelids: parabolas that may hide the top/bottom of the iris but never the disk `keep_clear`
    around the pupil centre; their apexes lie a uniform draw from `openness` (upper, lower ranges)
    iris radii above/below the iris centre. Returns the upper and lower lid records."""
    f32 = np.float32
    _, Y, axis, unit = grids(eye.size)
    size, ir = eye.size, eye.ir
    lid_x = eye.icx + d.normal(0.1) * ir
    up_c = d.uniform(1.0, 1.6) / (d.uniform(2.0, 2.6) ** 2 * ir)
    lo_c = d.uniform(0.6, 1.1) / (d.uniform(2.0, 2.6) ** 2 * ir)
    clear_up, clear_lo = lid_apexes(eye.pcx, eye.pcy, keep_clear, lid_x, up_c, lo_c)
    up_y = min(eye.icy - d.uniform(*openness[0]) * ir, clear_up)
    lo_y = max(eye.icy + d.uniform(*openness[1]) * ir, clear_lo)
    dxl2 = (axis - f32(lid_x)) ** 2
    lid_w = 1.5 * eye.s
    upper = f32(up_y) + f32(up_c) * dxl2  # the upper lid covers y < upper[x]
    bottom = min(size, int(upper.max() + lid_w) + 2)
    if bottom > 0:
        above = upper[None, :] - Y[:bottom]
        depth, dark = 0.15 * ir, d.uniform(0.1, 0.25)
        lid_val = np.clip(above, 0.0, depth)  # a darker band along the lid margin
        lid_val *= f32(dark / depth)
        lid_val += (shading(d, unit, 0.04) + f32(skin - dark))[None, :]
        blend(img[:bottom], coverage(above, lid_w), lid_val)
    lower = f32(lo_y) - f32(lo_c) * dxl2  # the lower lid covers y > lower[x]
    top = max(0, int(lower.min() - lid_w) - 1)
    if top < size:
        blend(img[top:], coverage(Y[top:] - lower[None, :], lid_w), (shading(d, unit, 0.04) + f32(skin))[None, :])
    return ({"x": float(lid_x), "y": float(up_y), "curvature": float(up_c)},
            {"x": float(lid_x), "y": float(lo_y), "curvature": float(lo_c)})


def _place_glints(d: Draws, eye: Eye) -> list[list[float]]:
    """Specular reflections of the illuminator, in the pupil or on its edge: [x, y, r] each."""
    ang = d.uniform(0, TAU)
    dist = eye.pr * (d.uniform(0.85, 1.05) if d.chance(0.3) else d.uniform(0.0, 0.6))
    glints = [[eye.pcx + dist * math.cos(ang), eye.pcy + dist * math.sin(ang)]]
    if d.chance(0.5):
        glints.append([glints[0][0] + d.uniform(0.03, 0.06) * 128 * eye.s * (1 if d.chance(0.5) else -1),
                       glints[0][1] + d.normal(0.01) * 128 * eye.s])
    return [[float(gx), float(gy), max(0.5, min(d.uniform(0.008, 0.02) * 128 * eye.s, 0.3 * eye.pr))] for gx, gy in glints]


def optics_and_sensor(img: np.ndarray, d: Draws, s: float, channels: int) -> tuple[np.ndarray, float, float, float]:
    """Blur, global gain/offset and sensor noise, then [0, 1] → [-1, 1]: (image, gain, offset, noise σ)."""
    f32 = np.float32
    size = img.shape[0]
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=d.uniform(0.5, 1.0) * s)
    gain, offset = d.uniform(0.85, 1.15), d.uniform(-0.03, 0.05)
    noise_sigma = 2.0 * d.uniform(0.008, 0.025)
    bank = noise_bank(size)
    out = np.empty((channels, size, size), np.float32)
    for ch in range(channels):
        tint = 1.0 + (d.uniform(-0.04, 0.04) if channels > 1 else 0.0)
        oy, ox = d.integer(0, size + 1), d.integer(0, size + 1)
        layer = bank[oy : oy + size, ox : ox + size] * f32(noise_sigma)
        layer += f32(2.0 * offset - 1.0)
        layer += img * f32(2.0 * gain * tint)
        np.clip(layer, -1.0, 1.0, out=out[ch])
    return out, gain, offset, noise_sigma


@dataclass
class DrawnEye:
    """What `paint_eye` drew besides the iris and pupil: lid records, glints [x, y, r], the number
    of lashes and their coverage (rows 0…k of the image, None when no lash falls in it)."""

    upper_lid: dict
    lower_lid: dict
    glints: list[list[float]]
    lashes: int
    lash_alpha: np.ndarray | None


def paint_eye(img: np.ndarray, rng: np.random.Generator, d: Draws, eye: Eye, shape: dict, texture: np.ndarray,
              levels: Levels, lids: tuple[tuple[float, float], tuple[float, float]]) -> DrawnEye:
    """Paint an eye over a square background in place, back to front: iris (from its rubber-sheet
    `texture`), pupil, eyelids (`lids`: see `_paint_lids`), lashes and glints."""
    _paint_iris(img, eye, texture)
    _paint_pupil(img, d, eye, shape, levels.pupil)
    keep_clear = shape["extent"] + max(0.08 * eye.ir, 2.0)  # lids and lashes stay off the pupil
    upper_lid, lower_lid = _paint_lids(img, d, eye, keep_clear, levels.skin, lids)
    n_lashes, lash_alpha = draw_lashes(rng, d, img, upper_lid, eye.ir, (eye.pcx, eye.pcy, keep_clear))
    glints = _place_glints(d, eye)
    draw_glints(img, glints, d.uniform(0.92, 1.0))
    return DrawnEye(upper_lid, lower_lid, glints, n_lashes, lash_alpha)


def background(d: Draws, size: int, sclera: float) -> np.ndarray:
    """The (size, size) sclera behind the eye: separable soft shading and vignetting."""
    _, _, _, unit = grids(size)
    vignette = unit * unit * np.float32(d.uniform(0.025, 0.1))
    return np.add.outer(shading(d, unit, 0.04) - vignette + np.float32(sclera), shading(d, unit, 0.04) - vignette)


def expose(img: np.ndarray, d: Draws, eye: Eye, shape: dict, drawn: DrawnEye, levels: Levels, channels: int,
           defect: str | None) -> tuple[np.ndarray, dict]:
    """The painted eye through `optics_and_sensor`, and its record (the module docstring's keys)."""
    out, gain, offset, noise_sigma = optics_and_sensor(img, d, eye.s, channels)
    record = {
        "pupil_cx": float(eye.pcx), "pupil_cy": float(eye.pcy), "pupil_r": float(eye.pr),
        "pupil_axis_ratio": float(shape["axis_ratio"]), "pupil_angle": float(shape["angle"]),
        "iris_cx": float(eye.icx), "iris_cy": float(eye.icy), "iris_r": float(eye.ir),
        "defect": defect,
        "pupil_iris_ratio": float(eye.pr / eye.ir), "concentricity": float(eye.off / eye.ir),
        "pupil_value": 2.0 * (levels.pupil * gain + offset) - 1.0,
        "iris_value": 2.0 * (levels.iris * gain + offset) - 1.0,
        "upper_lid": drawn.upper_lid, "lower_lid": drawn.lower_lid,
        "reflections": drawn.glints, "lashes": drawn.lashes, "noise_sigma": noise_sigma,
    }
    for key in ("semi_axes", "lobes", "lobe_amplitude", "tongues"):
        if key in shape:
            record[key] = shape[key]
    return out, record


def render_iris(rng: np.random.Generator, size: int, channels: int = 1,
                defect: str | None = None) -> tuple[np.ndarray, dict]:
    """Draw one eye; returns a (channels, size, size) float32 image in [-1, 1] and its record."""
    d = Draws(rng)
    eye = _place_eye(d, size, defect)
    shape = pupil_shape(d, defect, eye.pr, eye.ir)
    levels = draw_levels(d)
    img = background(d, size, levels.sclera)
    drawn = paint_eye(img, rng, d, eye, shape, iris_texture(rng, d, round(128 * eye.s), levels.iris), levels, GOOD_LIDS)
    return expose(img, d, eye, shape, drawn, levels, channels, defect)


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


def check_size_and_seed(size: int, seed: int) -> None:
    """UserError unless the image side is at least 16 px and the seed is >= 0."""
    if size < 16:
        raise UserError(f"synthetic image size must be >= 16, got {size}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")


def iter_irises(n: int, size: int = 128, seed: int = 0, channels: int = 1,
                defects: float | Sequence[str] = 0.0) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (image (channels, size, size), record) one at a time; see `generate_irises`.

    The arguments are checked before the first image is drawn.
    """
    if n < 0:
        raise UserError(f"number of images must be >= 0, got {n}")
    check_size_and_seed(size, seed)
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
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
    irises = iter_irises(n, size, seed, channels, defects)  # checks the arguments before touching disk
    return write_labelled(out, irises, n, "png", write_image, overwrite)


def write_labelled(out: str | Path, items: Iterable[tuple[np.ndarray, dict]], n: int, suffix: str,
                   write: Callable[[Path, np.ndarray], None], overwrite: bool) -> Path:
    """Write n (image, record) pairs as `OUT/000000.<suffix> …` (by `write(path, image)`) and
    `OUT/labels.json` (the records with a `file` key), built in a temp folder and renamed."""
    final = prepare_out_dir(out, overwrite)
    with building(final) as tmp:
        labels = []
        for i, (img, rec) in enumerate(tqdm(items, total=n, desc="drawing", unit="img", leave=False)):
            labels.append({"file": f"{i:06d}.{suffix}", **rec})
            write(tmp / labels[-1]["file"], img)
        (tmp / "labels.json").write_text(json.dumps(labels, indent=1))
    return final
