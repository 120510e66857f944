"""Finding the pupil proper: its dark region, its glints filled, its sub-pixel edge, and the bleed
tongues reaching out of it cut off.

1. Pupil region. The smoothed image is thresholded between its dark end (0.5th percentile) and its
   median; an opening removes lashes and noise; of the dark components, the one that best combines
   size, darkness of its core (10th percentile, to the 4th power), compactness (a clump of lashes is
   not a disk) and nearness to the image centre (a border-touching one is heavily discounted) is
   kept and its holes filled; if it holds a much darker core (a small pupil and a dim iris both
   under the threshold of a large frame), the core is taken instead. Specular reflections near it (small spots far brighter than their
   surroundings: white top-hat) are filled by harmonic interpolation from around them. The level
   is then refined to the midpoint between the pupil level P and the level I of a ring just outside
   it: a blurred step crosses half height at the true edge, whatever the blur or contrast.
2. Pupil proper. The region as black as the pupil (P + 0.1(I − P)) around the first guess; grey
   smears are not pupil. Its edge is a sub-pixel iso-contour (marching squares) at the half-height
   level. Black tongues reaching out of it are separated by a robust ellipse: the least-quantile
   (40 %) fit to the outermost boundary point of each 4° sector, refined by least squares; boundary
   runs bulging more than max(3 robust σ, 0.15 radii) outside it, and runs under a glint, are
   replaced by an arc interpolated between their ends. A lobed pupil has residuals on both sides
   (wide σ: nothing is cut), an oval fits exactly, a round pupil with tongues fits its round part.

Lengths are for 128-px images and scale with the image (see `pipeline.check.analyze`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.check.arrays import cyclic_shift, disk, kernel, median, quantiles
from pipeline.check.contour import longest_closed_contour
from pipeline.check.fit import (
    circle_lsq,
    ellipse_residual,
    polygon_stats,
    robust_ellipse,
    robust_sigma,
)

_MIN_BULGE = 0.15  # a bleed tongue reaches at least this many pupil radii beyond the pupil ellipse


@dataclass
class Pupil:
    """The pupil proper: its boundary, centroid, radius √(A/π) and the grey levels it was traced at."""

    contour: np.ndarray  # pupil proper, (K, 2) x, y
    cx: float
    cy: float
    r: float
    level: float  # iso-level of the boundary
    dark: float  # P
    around: float  # I (ring just outside)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The inside of the largest outer contour of a 0/1 uint8 mask."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    if contours:
        cv2.drawContours(filled, [max(contours, key=cv2.contourArea)], -1, 1, cv2.FILLED)
    return filled


def _pick_dark_component(mask: np.ndarray, sm: np.ndarray, lo: float, med: float, s: float) -> np.ndarray | None:
    """The dark component that best combines size, darkness, compactness (π·(largest inscribed
    radius)²/area: 1 for a disk, small for a clump of lashes) and nearness to the image centre."""
    # Grana's algorithm: the default (Spaghetti) takes about 3× as long once it gathers statistics.
    n, labels, stats, centres = cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_GRANA)
    h, w = mask.shape
    min_area = math.pi * (0.025 * s) ** 2
    best, best_score = 0, 0.0
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if area < min_area:
            continue
        d = math.hypot(centres[i][0] - (w - 1) / 2, centres[i][1] - (h - 1) / 2)
        box = (slice(y, y + bh), slice(x, x + bw))
        low = quantiles(sm[box][labels[box] == i], (0.1,))[0]  # its core: blurred rims and glints aside
        darkness = max(0.0, (med - low) / (med - lo))
        part = cv2.copyMakeBorder((labels[box] == i).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        compact = min(1.0, math.pi * float(cv2.distanceTransform(part, cv2.DIST_L2, 3).max()) ** 2 / area)
        score = area * darkness**4 * compact * math.exp(-((d / (0.3 * min(h, w))) ** 2))
        if x == 0 or y == 0 or x + bw == w or y + bh == h:
            score *= 0.1  # cut by the border: rather a corner, frame or shadow than a pupil
        if score > best_score:
            best, best_score = i, score
    return (labels == best).astype(np.uint8) if best else None


def _darkest_core(comp: np.ndarray, sm: np.ndarray, spread: float, s: float, scale: float) -> np.ndarray:
    """The pupil inside a dark component that also holds a dim iris (a small pupil in a large frame
    falls below the image's 0.5th percentile, so the first threshold takes the iris too): while the
    component's median is far (over 0.12, and a quarter of the image's dark-to-median spread) above
    its dark end, keep its largest part below 40 % of the way between the two."""
    for _ in range(2):
        x, y, w, h = cv2.boundingRect(comp)
        box = (slice(y, y + h), slice(x, x + w))
        dark, mid = quantiles(sm[box][comp[box] > 0], (0.02, 0.5))
        if mid - dark < max(0.12, 0.25 * spread):
            break
        inner = np.zeros_like(comp)
        inner[box] = cv2.morphologyEx(((sm[box] < dark + 0.4 * (mid - dark)) & (comp[box] > 0)).astype(np.uint8),
                                      cv2.MORPH_OPEN, kernel(1.5 * scale))
        n, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(inner[box], 8, cv2.CV_32S, cv2.CCL_GRANA)
        if n < 2 or stats[1:, cv2.CC_STAT_AREA].max() < math.pi * (0.015 * s) ** 2:
            break
        inner[box] = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        comp = _fill_holes(inner)
    return comp


def _remove_glints(g: np.ndarray, comp: np.ndarray, reach: float, scale: float,
                   contrast: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Fill small spots far brighter than their surroundings (specular reflections) within `reach`
    of the region `comp` by harmonic interpolation from the pixels around them (so an edge crossing
    a spot continues smoothly through it); return the image and the spots (None if there are none)."""
    margin = max(1, int(round(reach))) + int(round(7 * scale)) + 2  # the near zone, and the top-hat's
    x, y, w, h = cv2.boundingRect(comp)
    y0, y1 = max(y - margin, 0), min(y + h + margin, g.shape[0])
    x0, x1 = max(x - margin, 0), min(x + w + margin, g.shape[1])
    tophat = cv2.morphologyEx(g[y0:y1, x0:x1], cv2.MORPH_TOPHAT, kernel(5 * scale))
    ys, xs = np.nonzero(tophat > max(0.15, 0.4 * contrast))
    near = cv2.distanceTransform(1 - comp[y0:y1, x0:x1], cv2.DIST_L2, 3)[ys, xs] <= reach
    if not near.any():
        return g, None
    spots = np.zeros(g.shape, np.uint8)
    spots[ys[near] + y0, xs[near] + x0] = 1
    spots = cv2.dilate(spots, kernel(2 * scale))
    x, y, w, h = cv2.boundingRect(spots)
    y0, y1, x0, x1 = max(y - 2, 0), min(y + h + 2, g.shape[0]), max(x - 2, 0), min(x + w + 2, g.shape[1])
    out = g.copy()
    win, hole = out[y0:y1, x0:x1], spots[y0:y1, x0:x1] > 0
    win[hole] = median(win[~hole]) if (~hole).any() else 0.0
    for _ in range(int(max(w, h))):  # Jacobi iterations of Laplace's equation in the holes
        np.copyto(win, cv2.blur(win, (3, 3), borderType=cv2.BORDER_REPLICATE), where=hole)
    return out, spots


def find_pupil(g: np.ndarray, s: float, scale: float) -> tuple[Pupil, np.ndarray, np.ndarray] | None:
    """The pupil proper, the glint-free image and its smoothed version; None if no pupil."""
    sigma = max(0.7, 0.8 * scale)
    sm = cv2.GaussianBlur(g, (0, 0), sigma)
    lo, med, hi = quantiles(sm[::2, ::2], (0.005, 0.5, 0.999))
    if med - lo < 0.06:
        return None  # nothing stands out as dark: constant, all black, all white…
    first = cv2.morphologyEx((sm < lo + 0.4 * (med - lo)).astype(np.uint8), cv2.MORPH_OPEN, kernel(1.5 * scale))
    comp = _pick_dark_component(first, sm, lo, med, s)
    if comp is None:
        return None
    comp = _darkest_core(_fill_holes(comp), sm, med - lo, s, scale)
    r0 = math.sqrt(cv2.countNonZero(comp) / math.pi)
    g, glints = _remove_glints(g, comp, 0.3 * r0 + 4 * scale, scale, hi - lo)
    if glints is not None:
        sm = cv2.GaussianBlur(g, (0, 0), sigma)

    reach = 2 * scale + max(2 * scale, 0.25 * r0)
    x, y, w, h = cv2.boundingRect(comp)
    pad = int(reach) + 2
    win = (slice(max(y - pad, 0), y + h + pad), slice(max(x - pad, 0), x + w + pad))
    part, sm_part = comp[win], sm[win]
    outside = cv2.distanceTransform(1 - part, cv2.DIST_L2, 3)
    ring = (outside > 2 * scale) & (outside <= reach)
    inner = cv2.erode(part, kernel(1.5 * scale)) > 0
    dark = median(sm_part[inner]) if inner.any() else float(sm_part[part > 0].min())
    around = median(sm_part[ring]) if ring.any() else dark
    if around - dark < 0.05:
        return None
    level = 0.5 * (dark + around)
    # The pupil proper is as black as the pupil: tongues of the same black belong to it, but
    # smears (dark grey, below the half-height level) do not; its edge is traced at half height.
    black = cv2.morphologyEx((sm < dark + 0.1 * (around - dark)).astype(np.uint8), cv2.MORPH_OPEN, kernel(1.5 * scale))
    if glints is not None:
        black |= glints  # a reflection must not split the pupil; its part of the rim is bridged below
    labels = cv2.connectedComponentsWithAlgorithm(black, 8, cv2.CV_32S, cv2.CCL_GRANA)[1]
    hits = np.bincount(labels[comp > 0], minlength=2)
    hits[0] = 0  # the black component that overlaps the first guess most
    if hits.max() == 0:
        return None
    core = _fill_holes((labels == int(np.argmax(hits))).astype(np.uint8))
    band = max(2, int(round(3 * scale)) + 1)
    xy = _trace_boundary(sm, core, level, dark, band)
    if xy is None:
        return None
    drop = _protrusions(xy, core)
    if glints is not None:  # where a glint covered the rim, bridge along the pupil's curve, not the chord
        cols, rows = np.clip(np.rint(xy), 0, (g.shape[1] - 1, g.shape[0] - 1)).astype(int).T
        drop |= glints[rows, cols] > 0
    if drop.any():
        xy = _bridge_gaps(xy, ~drop)
    area, _, cx, cy, _ = polygon_stats(xy)
    if area < math.pi * (0.02 * s) ** 2:
        return None
    return Pupil(xy, cx, cy, math.sqrt(area / math.pi), level, dark, around), g, sm


def _trace_boundary(sm: np.ndarray, region: np.ndarray, level: float, dark: float, band: int) -> np.ndarray | None:
    """Sub-pixel iso-contour (x, y) of `sm` at `level` around `region` (a filled 0/1 mask),
    looked for no farther than `band` pixels from the region's edge."""
    x, y, bw, bh = cv2.boundingRect(region)
    y0, y1 = max(y - band - 1, 0), min(y + bh + band + 1, sm.shape[0])
    x0, x1 = max(x - band - 1, 0), min(x + bw + band + 1, sm.shape[1])
    crop = sm[y0:y1, x0:x1].copy()
    part = region[y0:y1, x0:x1]
    crop[cv2.dilate(part, disk(band)) == 0] = 1.0  # only this region's edge may be traced
    inside = cv2.erode(part, disk(band)) > 0
    crop[inside] = np.minimum(crop[inside], dark)  # no holes from texture inside
    crop = cv2.copyMakeBorder(crop, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1.0)
    xy = longest_closed_contour(crop, level)
    return None if xy is None else xy + (x0 - 1, y0 - 1)


def _runs(mask: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the runs of True in a cyclic boolean sequence."""
    if mask.all():
        return [np.arange(len(mask))]
    order = cyclic_shift(np.arange(len(mask)), int(np.argmin(mask)))  # start on a False: no run wraps
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask[order].astype(np.int8), [0]])))
    return [order[i:j] for i, j in zip(edges[::2], edges[1::2], strict=True)]


def _protrusions(xy: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Boundary points on dark matter reaching out of the pupil (bleed tongues) rather than on the
    pupil: runs bulging far outside a robustly fitted ellipse.

    The ellipse is the least-quantile-of-squares fit (40%) to the outermost boundary point of each 4°
    sector around the deepest point of the black core, refined by least squares on its inliers;
    the outlier threshold is 3 robust sigmas of the residuals, but at least 0.15 radii. A lobed
    pupil thus has large residuals on both sides (a wide threshold: nothing protrudes), an oval
    fits exactly, and a round pupil with tongues fits its round part, leaving the tongues out."""
    x, y, w, h = cv2.boundingRect(core)
    part = cv2.copyMakeBorder(core[y : y + h, x : x + w], 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    _, _, _, (ix, iy) = cv2.minMaxLoc(cv2.distanceTransform(part, cv2.DIST_L2, 3))
    ix, iy = ix + x - 1, iy + y - 1
    d = np.hypot(xy[:, 0] - ix, xy[:, 1] - iy)
    sector = ((np.arctan2(xy[:, 1] - iy, xy[:, 0] - ix) + math.pi) * (45 / math.pi)).astype(int) % 90
    order = np.lexsort((d, sector))
    last = np.flatnonzero(np.diff(np.append(sector[order], -1)))
    reps = order[last]  # the farthest point of each sector
    if len(reps) < 12:
        return np.zeros(len(xy), bool)
    res, radius = ellipse_residual(xy[reps], cv2.fitEllipse(xy[reps].astype(np.float32)))
    if np.abs(res).max() < max(0.5 * _MIN_BULGE * radius, 1.0):
        return np.zeros(len(xy), bool)  # already an ellipse: the common, quick case
    robust = robust_ellipse(xy[reps])
    if robust is None:
        return np.zeros(len(xy), bool)
    conic, c, sc = robust
    x, y = ((xy[reps] - c) / sc).T
    q = conic @ np.stack([x * x, x * y, y * y, x, y, np.ones(len(x))])
    gx = 2 * conic[0] * x + conic[1] * y + conic[3]
    gy = conic[1] * x + 2 * conic[2] * y + conic[4]
    res = sc * np.abs(q) / np.maximum(np.hypot(gx, gy), 1e-9)
    use = reps[res < max(3.0 * robust_sigma(res), 1.0)]
    for _ in range(4):  # least-squares refinement on the inliers
        if len(use) < 6:
            return np.zeros(len(xy), bool)
        ellipse = cv2.fitEllipse(xy[use].astype(np.float32))
        res, radius = ellipse_residual(xy, ellipse)
        limit = max(3.0 * robust_sigma(res[reps]), _MIN_BULGE * radius, 1.5)
        new_use = reps[np.abs(res[reps]) < limit]
        if np.array_equal(new_use, use):
            break
        use = new_use
    out = np.zeros(len(xy), bool)
    for run in _runs(res > min(limit, 0.05 * radius + 1.0)):  # a bulge's whole flank
        if (res[run] > limit).any():
            out[run] = True
    return out


def _bridge_gaps(xy: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Replace each run of dropped boundary points by an arc interpolated in polar coordinates
    (about the circle fitted to the kept points) between the run's kept neighbours."""
    if keep.sum() < 8:
        return xy
    fit = circle_lsq(xy[keep, 0], xy[keep, 1])
    if fit is None:
        return xy
    cx, cy, _ = fit
    turn = 1.0 if polygon_stats(xy)[4] > 0 else -1.0  # counter-clockwise: angles increase
    order = cyclic_shift(np.arange(len(xy)), int(np.argmax(keep)))  # start on a kept point
    runs = np.split(order, np.flatnonzero(np.diff(keep[order].astype(np.int8))) + 1)
    out = []
    for i, run in enumerate(runs):  # kept and dropped runs alternate, kept first
        if keep[run[0]]:
            out.append(xy[run])
            continue
        a, b = xy[runs[i - 1][-1]], xy[runs[(i + 1) % len(runs)][0]]
        ta, tb = math.atan2(a[1] - cy, a[0] - cx), math.atan2(b[1] - cy, b[0] - cx)
        ra, rb = math.hypot(a[0] - cx, a[1] - cy), math.hypot(b[0] - cx, b[1] - cy)
        dt = turn * ((turn * (tb - ta)) % (2 * math.pi))  # the way the contour runs
        steps = max(2, int(abs(dt) * max(ra, rb) / 0.7))
        f = np.arange(1, steps) / steps
        th, rr = ta + dt * f, ra + (rb - ra) * f
        out.append(np.column_stack([cx + rr * np.cos(th), cy + rr * np.sin(th)]))
    return np.concatenate(out)
