"""Bleed and the image-quality figures, measured in the iris annulus once pupil and limbus are found.

5. Bleed. Pixels darker than the half-height level inside the iris disk, outside the pupil proper
   plus a thin band (1 px + 5 % of its radius), opened to drop lashes and noise, and connected to
   the pupil's rim (bleed flows out of the pupil; detached crypts and lash clumps do not count), as
   a fraction of the visible annulus. Not visible: pixels brighter than the iris/sclera midpoint
   (skin, sclera) and, below upper-lid skin inside the iris disk, its shadowed margin and lashes
   (0.45 iris radii).
6. ISO/IEC 29794-6 style quality figures. With P, I, S the median pupil, iris and sclera grey
   levels (0–255): iris-pupil contrast 100·W/(0.75 + W), W = (I − P)/(20 + P) (a Weber ratio), and
   iris-sclera contrast 100·(S − I)/(S + I − 2P), as the standard's clauses 6.2.2–6.2.3 define them
   (the reference implementation is NIST/MITRE's BIQT-Iris); grey-scale utilisation = entropy in
   bits of the 256-bin histogram over the iris disk (clause 6.2.5; whole image if no iris);
   sharpness = mean power of Daugman's 8×8 band-pass kernel (−3 in the central 4×4, +1 around;
   "How iris recognition works", 2004) on 0–255 levels (not normalised: compare like with like);
   usable iris area (clause 6.2.1) = the share of the annulus between the pupil boundary and the
   limbus circle (π(R² − r²), so iris outside the image counts as hidden) that looks like iris:
   textured, not skin-bright, not a lash (see `usable_iris_area`). Margin adequacy (6.2.10) needs
   only the circle and the image size: `pipeline.check.analyze.margin_adequacy`.

Lengths are for 128-px images and scale with the image (see `pipeline.check.analyze`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipeline.check.arrays import kernel, median
from pipeline.check.limbus import SECTOR_UP_DEG
from pipeline.check.pupil import Pupil

LID_MIN_AREA, LID_SPILL = 0.03, 3.5  # smooth regions this big (share of the disk) lose this rim (× scale)
TEXTURE_SHARE = 0.25  # iris: band-pass energy at least this share of the visible iris's median
LASH_CONTRAST = 0.2  # lashes: at least this share of the iris level darker than their surroundings


def annulus_metrics(g: np.ndarray, sm: np.ndarray, pupil: Pupil, iris: tuple[float, float, float],
                    scale: float) -> tuple[dict, np.ndarray, tuple[int, int]]:
    """Bleed fraction, ISO contrasts, grey-scale utilisation and usable iris area from the iris
    annulus; and the usable iris pixels (`usable_iris`) as a mask of the window around the iris
    whose top-left pixel is returned last, (x0, y0) in `g`."""
    icx, icy, ir = iris
    h, w = g.shape
    reach = 1.25 * ir + 2
    y0, y1 = max(0, int(icy - reach)), min(h, int(icy + reach) + 2)
    x0, x1 = max(0, int(icx - reach)), min(w, int(icx + reach) + 2)
    g, sm = g[y0:y1, x0:x1], sm[y0:y1, x0:x1]
    dx, dy = np.arange(x0, x1) - np.float32(icx), (np.arange(y0, y1) - np.float32(icy))[:, None]
    r_iris = np.sqrt(dx * dx + dy * dy)
    in_iris = r_iris < ir - scale
    pupil_mask = np.zeros(g.shape, np.uint8)
    pts = np.round((pupil.contour - (x0, y0)) * 16).astype(np.int32)
    cv2.fillPoly(pupil_mask, [pts], 1, cv2.LINE_8, shift=4)
    inner = cv2.erode(pupil_mask, kernel(1.5 * scale)) > 0
    band = cv2.dilate(pupil_mask, kernel(scale + 0.05 * pupil.r))
    annulus = in_iris & (band == 0)
    sideways = np.abs(dy) < np.float32(math.tan(math.radians(SECTOR_UP_DEG))) * np.abs(dx)
    sclera_ring = (r_iris > 1.1 * ir) & (r_iris < 1.25 * ir) & sideways
    p_med = median(g[inner]) if inner.any() else pupil.dark
    i_med = median(g[annulus]) if annulus.any() else math.nan
    s_med = median(g[sclera_ring]) if sclera_ring.any() else math.nan
    visible = annulus
    if s_med > i_med + 0.02:
        # Not iris: eyelid skin and sclera, and below the upper lid's skin its shadowed margin and
        # lashes (up to 0.45 iris radii).
        skin = sm > 0.5 * (i_med + s_med)
        lid = (skin & (r_iris < ir) & (dy < 0)).astype(np.uint8)
        reach = max(2, int(round(0.45 * ir)))
        below_lid = cv2.dilate(lid, np.ones((reach, 1), np.uint8), anchor=(0, reach - 1)) > 0
        visible = annulus & ~skin & ~below_lid
    usable = usable_iris(g, sm, r_iris < ir, pupil_mask, dy, sideways, (i_med, s_med), scale)
    out = {"grey_utilisation": entropy_bits(g[in_iris]),
           "usable_iris_area": np.count_nonzero(usable) / (math.pi * (ir * ir - pupil.r * pupil.r))}
    n_visible = np.count_nonzero(visible)
    if n_visible:
        dark = (visible & (sm < pupil.level)).astype(np.uint8)
        dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, kernel(scale))  # thin lashes, noise
        # Bleed flows out of the pupil: keep dark patches that start at its rim (not lash clumps).
        rim = (cv2.dilate(band, kernel(2 * scale)) > 0) & (band == 0)
        out["bleed_fraction"] = np.count_nonzero(_touching(dark, rim & (dark > 0))) / n_visible
    out["iris_pupil_contrast"], out["iris_sclera_contrast"] = _iso_contrasts(p_med, i_med, s_med)
    return out, usable, (x0, y0)


def entropy_bits(values: np.ndarray) -> float:
    """Entropy (bits) of the 256-bin histogram of [0, 1] values: ISO 29794-6 grey-scale utilisation."""
    if values.size == 0:
        return math.nan
    hist = np.bincount((values * 255.0 + 0.5).astype(np.int64).ravel(), minlength=256)
    p = hist[hist > 0] / values.size
    return float(-(p * np.log2(p)).sum())


def sharpness(g: np.ndarray) -> float:
    """Mean power of Daugman's 8×8 band-pass kernel response, on 0–255 grey levels."""
    if min(g.shape) < 16:
        return math.nan
    # The kernel is the 8×8 box minus 4× the central 4×4 box: two running sums, not 64 products.
    resp = (cv2.boxFilter(g, cv2.CV_32F, (8, 8), normalize=False)[4:-4, 4:-4]
            - 4.0 * cv2.boxFilter(g, cv2.CV_32F, (4, 4), normalize=False)[4:-4, 4:-4])
    return cv2.norm(resp, cv2.NORM_L2SQR) / resp.size * 255.0**2


def _iso_contrasts(p: float, i: float, s: float) -> tuple[float, float]:
    """ISO/IEC 29794-6 iris-pupil and iris-sclera contrasts (0–100) from median levels in [0, 1]."""
    p8, i8, s8 = 255.0 * p, 255.0 * i, 255.0 * s
    weber = (i8 - p8) / (20.0 + p8)
    ipc = 100.0 * weber / (0.75 + weber) if weber > 0 else 0.0
    den = s8 + i8 - 2.0 * p8
    isc = max(0.0, 100.0 * (s8 - i8) / den) if den > 0 and math.isfinite(s8) else math.nan
    return ipc, isc


def usable_iris(g: np.ndarray, sm: np.ndarray, disk: np.ndarray, pupil_mask: np.ndarray, dy: np.ndarray,
                sideways: np.ndarray, levels: tuple[float, float], scale: float) -> np.ndarray:
    """The pixels (a bool mask) of the iris disk outside the pupil that look like iris: textured
    (band-pass energy at least `TEXTURE_SHARE` of its median in the sideways sectors, where the
    limbus was found: lid skin and its shadowed margin are smooth), not brighter than the
    iris/sclera midpoint (skin, glints), not within `LID_SPILL` of a large smooth region (the
    energy's spill into a lid), and not on a lash: a dark thin line (black-hat) in the upper half
    joined to what is not iris above it (lid, its margin, the sclera beyond the limbus)."""
    i_med, s_med = levels
    annulus = disk & (pupil_mask == 0)
    band = cv2.GaussianBlur(g, (0, 0), 0.5 * scale) - cv2.GaussianBlur(g, (0, 0), 1.5 * scale)
    energy = cv2.GaussianBlur(band * band, (0, 0), scale)  # texture energy about each pixel
    reference = annulus & sideways
    textured = energy >= TEXTURE_SHARE * median(energy[reference]) if reference.any() else np.ones_like(disk)
    # Not skin, not a glint (where the sclera stands out from the iris at all).
    not_bright = (sm <= 0.5 * (i_med + s_med)) & (g <= s_med) if s_med > i_med + 0.02 else np.ones_like(disk)
    iris_like = textured & not_bright
    # Texture energy spills a few pixels past the iris into a smooth lid that is as grey as the iris
    # (where brightness cannot tell them apart): pull the iris back from every large smooth region.
    smooth = (~textured & not_bright & annulus).astype(np.uint8)
    n, labels = cv2.connectedComponentsWithAlgorithm(smooth, 8, cv2.CV_32S, cv2.CCL_GRANA)
    large = np.bincount(labels.ravel(), minlength=n) >= LID_MIN_AREA * np.count_nonzero(disk)  # areas
    large[0] = False
    if large.any():
        iris_like &= cv2.dilate(large[labels].astype(np.uint8), kernel(LID_SPILL * scale)) == 0
    return annulus & _drop_lashes(iris_like, sm, disk, pupil_mask, dy, i_med, scale)


def _drop_lashes(iris_like: np.ndarray, sm: np.ndarray, disk: np.ndarray, pupil_mask: np.ndarray, dy: np.ndarray,
                 i_med: float, scale: float) -> np.ndarray:
    """`iris_like` (changed in place) without lashes: dark thin lines (black-hat over `LASH_CONTRAST`
    of the iris level) above the iris centre joined to what is not iris above it. They are looked for
    in the window's top rows only (dy grows downwards); a closing reads at most its kernel's side − 1
    rows below a row, so the rows further down are not read at all."""
    top = slice(0, int(np.count_nonzero(dy < 0)))
    if top.stop == 0:
        return iris_like
    lash_kernel = kernel(3 * scale)
    closed = cv2.morphologyEx(sm[: top.stop + lash_kernel.shape[0] - 1], cv2.MORPH_CLOSE, lash_kernel)[top]
    dark_lines = (closed - sm[top] > LASH_CONTRAST * i_med).astype(np.uint8)
    above = ((~iris_like[top] | ~disk[top]) & (pupil_mask[top] == 0)).astype(np.uint8)
    iris_like[top] &= ~(_touching(dark_lines | above, above > 0) & (dark_lines > 0))
    return iris_like


def _touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The pixels of the connected components (8-connected) of a 0/1 uint8 `mask` that hold a pixel of `seed`."""
    # 16-bit labels where they cannot overflow (8-connected components: at most one per 2×2 pixels)
    depth = cv2.CV_16U if mask.size // 4 < 65535 else cv2.CV_32S
    n, labels = cv2.connectedComponentsWithAlgorithm(mask, 8, depth, cv2.CCL_GRANA)
    hit = np.zeros(max(n, 256), np.uint8)
    hit[labels[seed]] = 1
    hit[0] = 0
    if n <= 256:  # a table lookup on 8-bit labels: OpenCV's LUT is several times NumPy's gather
        return cv2.LUT(labels.astype(np.uint8), hit[:256]).view(bool)
    return hit.take(labels).view(bool)
