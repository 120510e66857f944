"""Iris codes (identity check): Daugman's rubber sheet and phase quantisation, with Masek's 1-D
log-Gabor filter along the angle.

1. Rubber sheet (J. Daugman, "How iris recognition works", IEEE TCSVT 14(1), 2004): the annulus
   between the pupil boundary and the limbus is resampled to a dimensionless polar image I(ρ, θ),
   each point being x(ρ, θ) = (1 − ρ)·x_p(θ) + ρ·x_s(θ) (and y likewise), with x_p(θ), x_s(θ) the
   pupil and limbus boundary points at angle θ about their own centres: the two circles need not be
   concentric, and pupil dilation is undone.
2. Encoding (L. Masek, "Recognition of human iris patterns for biometric identification", 2003):
   each ring I(ρ_i, ·) is filtered by a 1-D log-Gabor filter G(f) = exp(−ln²(f/f₀) / (2 ln²(σ/f₀)))
   along θ, and the phase of the complex response is quantised to two bits (Daugman's phase
   quadrant: sign of the real and of the imaginary part). The filter runs through the FFT, so it is
   circular in θ and a rotation of the eye is a circular shift of the code's columns.

Grid. `DEFAULT_GRID` = (R, A) = (16, 256) suits the built-in 128 px eyes: an iris radius of about
45 px has a circumference of about 280 px, so 256 angular samples take about one pixel each, and the
annulus between pupil and limbus is about 25 px wide, so 16 rings are already closer than the
pixels under the inner half of it. At full camera resolution (iris radius 100–150 px) Daugman and
Masek use 20–64 rings by 240–512 angles; (64, 512) is usual there.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.check.analyze import analyze_with_geometry, to_grey_unit
from pipeline.common.config import CircularityConfig

DEFAULT_GRID = (16, 256)  # rings R × angles A for 128 px eyes (see the module docstring)
# A response weaker than this share of its ring's median magnitude has an unstable phase: noise
# flips its bits. For a textured ring (a complex Gaussian response, Rayleigh magnitudes) it drops
# under 1 % of the bits; on a flat stretch (a lid, a glint, the image's replicated border) it
# drops most of them.
WEAK_SHARE = 0.1
# A code with fewer usable bits than this share compares too few of them: its Hamming distances
# scatter widely (Daugman's rescaling, `pipeline.check.hamming.rescaled_hd`, exists for this).
# A quarter of (16, 256) × 2 still leaves 2048 bits, Daugman's full code size.
MIN_USABLE_SHARE = 0.25


@dataclass(frozen=True)
class IrisCode:
    """Daugman's iris code and its mask."""

    bits: np.ndarray  # bool (R, A, 2): real and imaginary phase bits, angle along axis 1
    mask: np.ndarray  # bool (R, A): True where the bits are usable


def rubber_sheet(g: np.ndarray, pupil: tuple[float, float, float], iris: tuple[float, float, float],
                 grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (R, A) polar image I(ρ_i, θ_j) of a grey float32 image and its sample points xs, ys.

    θ_j = 2πj/A from +x towards +y (rows grow downwards), ρ_i = (i + 0.5)/R, and the sample point is
    (1 − ρ_i)·(pupil boundary point at θ_j) + ρ_i·(limbus point at θ_j), each boundary point at θ_j
    about its own circle's centre; `pupil` and `iris` are circles (cx, cy, r) in pixels, x = column,
    y = row, the centre of pixel (0, 0) at 0.0. Sampled bilinearly, the border replicated.
    """
    n_rings, n_angles = grid
    theta = np.arange(n_angles) * (2 * np.pi / n_angles)
    rho = ((np.arange(n_rings) + 0.5) / n_rings)[:, None]
    (px, py, pr), (ix, iy, ir) = pupil, iris
    cos, sin = np.cos(theta), np.sin(theta)
    xs = ((1 - rho) * (px + pr * cos) + rho * (ix + ir * cos)).astype(np.float32)
    ys = ((1 - rho) * (py + pr * sin) + rho * (iy + ir * sin)).astype(np.float32)
    polar = cv2.remap(np.asarray(g, np.float32), xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return polar, xs, ys


def log_gabor(n: int, wavelength: float, sigma_on_f: float) -> np.ndarray:
    """Masek's 1-D log-Gabor transfer function over the n FFT frequencies f (cycles per sample):
    G(f) = exp(−ln²(f/f₀) / (2 ln²(σ/f₀))) with f₀ = 1/wavelength for f > 0, and 0 for f ≤ 0 (no DC,
    one-sided: the response is analytic, its real and imaginary parts an even and an odd filter)."""
    f = np.fft.fftfreq(n)
    out = np.zeros(n)
    pos = f > 0
    out[pos] = np.exp(-np.log(f[pos] * wavelength) ** 2 / (2 * np.log(sigma_on_f) ** 2))
    return out


def encode(polar: np.ndarray, valid: np.ndarray, wavelength: float | None = None,
           sigma_on_f: float = 0.5) -> IrisCode:
    """Daugman's phase bits of each ring's log-Gabor response along θ (see `log_gabor`).

    `valid` (R, A) marks the samples that show iris; the others are set to the mean of their ring's
    valid ones before filtering, so that an occluder's edge (a bright lid, dark lashes) does not
    ring into the neighbouring bits. bits = (Re > 0, Im > 0); mask = valid and |response| ≥
    `WEAK_SHARE` × the median magnitude over the ring's valid samples. The default
    wavelength is A/16 samples: 16 cycles around the iris, about 17 px on the built-in eyes'
    280 px circumference, close to Masek's best (18 samples of 240); σ/f₀ = 0.5 gives his bandwidth
    of about two octaves.
    """
    polar = np.asarray(polar, np.float64)
    valid = np.asarray(valid, bool)
    n_angles = polar.shape[1]
    ring_mean = np.where(valid, polar, 0.0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    polar = np.where(valid, polar, ring_mean[:, None])
    gabor = log_gabor(n_angles, n_angles / 16 if wavelength is None else wavelength, sigma_on_f)
    response = np.fft.ifft(np.fft.fft(polar, axis=1) * gabor, axis=1)
    bits = np.stack([response.real > 0, response.imag > 0], axis=-1)
    magnitude = np.abs(response)
    mask = np.zeros(valid.shape, bool)
    for i in np.flatnonzero(valid.any(axis=1)):
        mask[i] = valid[i] & (magnitude[i] >= WEAK_SHARE * np.median(magnitude[i, valid[i]]))
    return IrisCode(bits, mask)


def code_image(img: np.ndarray, cfg: CircularityConfig,
               grid: tuple[int, int] = DEFAULT_GRID) -> tuple[IrisCode | None, str]:
    """The iris code of one image (HW / HWC; uint8, uint16 or float in [0, 1]) and "", or None and
    why not: "no pupil", "no iris boundary" or "too little iris visible" (fewer than
    `MIN_USABLE_SHARE` of the bits usable). A sample is valid where its nearest pixel is one of the
    usable iris pixels the check found (`Geometry.visible`)."""
    metrics, geometry = analyze_with_geometry(img, cfg)
    if not metrics["pupil_found"]:
        return None, "no pupil"
    if not metrics["iris_found"]:
        return None, "no iris boundary"
    polar, xs, ys = rubber_sheet(to_grey_unit(img), geometry.pupil, geometry.iris, grid)
    code = encode(polar, visible_at(geometry.visible, geometry.visible_origin, xs, ys))
    if np.count_nonzero(code.mask) < MIN_USABLE_SHARE * code.mask.size:
        return None, "too little iris visible"
    return code, ""


def visible_at(visible: np.ndarray | None, origin: tuple[int, int], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Whether the nearest pixel of each point (xs, ys) is True in `visible`, a mask whose pixel
    (0, 0) is the image's pixel `origin` (x, y); points outside it (or no mask) are not."""
    if visible is None:
        return np.zeros(xs.shape, bool)
    cols = np.floor(xs + 0.5).astype(np.int64) - origin[0]
    rows = np.floor(ys + 0.5).astype(np.int64) - origin[1]
    h, w = visible.shape
    inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    out = np.zeros(xs.shape, bool)
    out[inside] = visible[rows[inside], cols[inside]]
    return out
