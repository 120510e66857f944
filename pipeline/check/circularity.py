"""Per-image pupil/iris geometry and the pass/fail rules of `circularity-check` (pure NumPy/OpenCV).

How one grey image is measured (every length scales with the image size s = min(H, W); the
constants below are for s = 128 and are multiplied by s/128):

1. Pupil region. The smoothed image is thresholded between its dark end (0.5th percentile) and its
   median; an opening removes lashes and noise; of the dark components, the one that best combines
   size, darkness and nearness to the image centre (a border-touching one is heavily discounted)
   is kept and its holes filled. Specular reflections near it (small spots far brighter than their
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
3. Pupil shape. From that polygon: centroid, radius √(A/π), 4πA/P² measured on the boundary
   smoothed along its length over 1 px (this removes the pixel staircase: a rasterised circle of
   radius ≥ 8 px scores ≥ 0.98, no correction table), the least-squares ellipse's minor/major axis
   ratio (cv2.fitEllipse) and the radial deviation (std/mean of the boundary's distance from the
   centroid, weighted by arc length).
4. Iris (limbus). Along rays from the pupil centre in two sectors about the horizontal (30° above
   to 40° below, left and right: where eyelids and lashes rarely reach), the two strongest
   dark→bright steps outside the pupil are candidate edges; a circle is refined by least squares
   on the edges within 1.5 px of it, started from the fit to each ray's strongest edge when 90 % of
   the edge strength then agrees with it (an unoccluded limbus), else from a RANSAC circle (most
   edge strength within 1.5 px); rays are cast again from its centre and the circle refitted. This
   is Daugman's radial-gradient search restricted to occlusion-free sectors.
   `iris_circularity` = 1 − 1.4826·MAD/median of the limbus distance from the fitted centre over
   those rays (a robust 1 − std/mean: a few rays caught by lashes do not count).
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
   "How iris recognition works", 2004) on 0–255 levels (not normalised: compare like with like).

Rules are the fields of `CircularityConfig`, in order: `min_<metric>` needs metric ≥ value and
`max_<metric>` needs metric ≤ value; the first that fails is the image's `reason`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.common.config import CircularityConfig
from pipeline.common.images import to_unit

NO_PUPIL = "no dark pupil region"
NO_IRIS = "no iris boundary"

# Per-image metrics, in CSV column order (besides file, size, pass and reason).
METRICS = (
    "pupil_found", "pupil_cx", "pupil_cy", "pupil_r", "pupil_circularity", "pupil_axis_ratio",
    "pupil_radial_dev", "iris_found", "iris_cx", "iris_cy", "iris_r", "iris_circularity",
    "concentricity", "pupil_iris_ratio", "bleed_fraction", "iris_pupil_contrast",
    "iris_sclera_contrast", "grey_utilisation", "sharpness",
)

_LTS_QUANTILE = 0.4  # the robust pupil ellipse must fit at least this share of the boundary
_NORMAL_ABS_QUANTILE = statistics.NormalDist().inv_cdf(0.5 + _LTS_QUANTILE / 2)
_MIN_BULGE = 0.15  # a bleed tongue reaches at least this many pupil radii beyond the pupil ellipse
_SECTOR_UP_DEG, _SECTOR_DOWN_DEG = 30.0, 40.0  # limbus search sectors about the horizontal
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Rule:
    """One pass/fail rule: `metric` must be ≥ (kind "min") or ≤ (kind "max") `threshold`."""

    metric: str
    kind: str
    threshold: float

    def passes(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.threshold if self.kind == "min" else value <= self.threshold

    def describe(self, value: float) -> str:
        op = "<" if self.kind == "min" else ">"
        return f"{self.metric} {value:.3g} {op} {self.threshold:.3g}"


def rules_from_config(cfg: CircularityConfig) -> list[Rule]:
    """The rules, in the order of the config fields."""
    rules = []
    for f in dataclasses.fields(cfg):
        kind, _, metric = f.name.partition("_")
        if kind not in ("min", "max") or metric not in METRICS:
            raise ValueError(f"circularity config field {f.name!r} is not min_/max_<metric>")
        rules.append(Rule(metric, kind, float(getattr(cfg, f.name))))
    return rules


def evaluate_rules(metrics: dict, cfg: CircularityConfig) -> tuple[bool, str]:
    """(passed, reason): the reason names the first failed rule ("" when all pass)."""
    if not metrics["pupil_found"]:
        return False, NO_PUPIL
    if not metrics["iris_found"]:
        return False, NO_IRIS
    for rule in rules_from_config(cfg):
        value = float(metrics[rule.metric])
        if not rule.passes(value):
            return False, rule.describe(value)
    return True, ""


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


PUPIL_SHAPE_METRICS = ("pupil_circularity", "pupil_axis_ratio", "bleed_fraction")


def round_pupil_without_bleed(metrics: dict, cfg: CircularityConfig) -> bool:
    """The pupil-shape rules alone (a pupil found; its circularity, axis ratio and bleed within
    the thresholds): the failure VAE seeding is meant to fix, apart from iris and quality rules."""
    return bool(metrics["pupil_found"]) and all(
        rule.passes(float(metrics[rule.metric])) for rule in rules_from_config(cfg) if rule.metric in PUPIL_SHAPE_METRICS)


def analyze_with_geometry(img: np.ndarray, cfg: CircularityConfig) -> tuple[dict, Geometry]:
    """`analyze_image` plus the boundaries it found, for overlays."""
    metrics, geometry = _measure(to_grey_unit(img))
    metrics["pass"], metrics["reason"] = evaluate_rules(metrics, cfg)
    return metrics, geometry


# --------------------------------------------------------------------------------------------
# Measurement


@dataclass
class _Pupil:
    contour: np.ndarray  # pupil proper, (K, 2) x, y
    cx: float
    cy: float
    r: float
    level: float  # iso-level of the boundary
    dark: float  # P
    around: float  # I (ring just outside)


def _measure(g: np.ndarray) -> tuple[dict, Geometry]:
    h, w = g.shape
    s = float(min(h, w))
    scale = s / 128.0
    m = {name: math.nan for name in METRICS}
    m.update(pupil_found=False, iris_found=False, sharpness=_sharpness(g))
    nan3 = (math.nan, math.nan, math.nan)
    geometry = Geometry(np.zeros((0, 2)), nan3, nan3)
    found = _find_pupil(g, s, scale) if s >= 16 else None
    if found is None:
        m["grey_utilisation"] = _entropy_bits(g)  # of the whole image: no iris to look at
        return m, geometry
    pupil, g, sm = found
    m.update(pupil_found=True, pupil_cx=pupil.cx, pupil_cy=pupil.cy, pupil_r=pupil.r, **_shape_metrics(pupil, scale))
    geometry = Geometry(pupil.contour, (pupil.cx, pupil.cy, pupil.r), nan3)

    iris = _find_iris(sm, pupil, s, scale)
    if iris is None:
        m["grey_utilisation"] = _entropy_bits(g)
        return m, geometry
    icx, icy, ir, icirc = iris
    m.update(
        iris_found=True, iris_cx=icx, iris_cy=icy, iris_r=ir, iris_circularity=icirc,
        concentricity=math.hypot(pupil.cx - icx, pupil.cy - icy) / ir, pupil_iris_ratio=pupil.r / ir,
    )
    geometry.iris = (icx, icy, ir)
    m.update(_annulus_metrics(g, sm, pupil, (icx, icy, ir), scale))
    return m, geometry


def _quantiles(a: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """Order statistics (nearest rank) of an array: cheaper than np.quantile for a few of them."""
    flat = a.ravel()
    ranks = [min(len(flat) - 1, int(round(q * (len(flat) - 1)))) for q in qs]
    part = np.partition(flat, ranks)
    return [float(part[r]) for r in ranks]


def _median(a: np.ndarray) -> float:
    return _quantiles(a, (0.5,))[0]


@functools.lru_cache(maxsize=64)
def _disk(radius: int) -> np.ndarray:
    r = max(1, radius)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _kernel(radius: float) -> np.ndarray:
    return _disk(int(round(radius)))


@functools.lru_cache(maxsize=1024)
def _random_indices(seed: int, highs: tuple[int, ...], size: int | tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """`rng.integers(0, high, size)` for each high in turn, rng = np.random.default_rng(seed).
    Memoised: seeding costs more than drawing, and the same counts recur image after image."""
    rng = np.random.default_rng(seed)
    draws = tuple(rng.integers(0, high, size) for high in highs)
    for d in draws:
        d.flags.writeable = False
    return draws


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The inside of the largest outer contour of a 0/1 uint8 mask."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    if contours:
        cv2.drawContours(filled, [max(contours, key=cv2.contourArea)], -1, 1, cv2.FILLED)
    return filled


def _pick_dark_component(mask: np.ndarray, sm: np.ndarray, lo: float, med: float, s: float) -> np.ndarray | None:
    """The dark component that best combines size, darkness and nearness to the image centre."""
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
        mean = float(sm[box][labels[box] == i].mean(dtype=np.float64))
        darkness = max(0.0, (med - mean) / (med - lo))
        score = area * darkness**2 * math.exp(-((d / (0.3 * s)) ** 2))
        if x == 0 or y == 0 or x + bw == w or y + bh == h:
            score *= 0.1  # cut by the border: rather a corner, frame or shadow than a pupil
        if score > best_score:
            best, best_score = i, score
    return (labels == best).astype(np.uint8) if best else None


def _remove_glints(g: np.ndarray, comp: np.ndarray, reach: float, scale: float,
                   contrast: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Fill small spots far brighter than their surroundings (specular reflections) within `reach`
    of the region `comp` by harmonic interpolation from the pixels around them (so an edge crossing
    a spot continues smoothly through it); return the image and the spots (None if there are none)."""
    margin = max(1, int(round(reach))) + int(round(7 * scale)) + 2  # the near zone, and the top-hat's
    x, y, w, h = cv2.boundingRect(comp)
    y0, y1 = max(y - margin, 0), min(y + h + margin, g.shape[0])
    x0, x1 = max(x - margin, 0), min(x + w + margin, g.shape[1])
    tophat = cv2.morphologyEx(g[y0:y1, x0:x1], cv2.MORPH_TOPHAT, _kernel(5 * scale))
    ys, xs = np.nonzero(tophat > max(0.15, 0.4 * contrast))
    near = cv2.distanceTransform(1 - comp[y0:y1, x0:x1], cv2.DIST_L2, 3)[ys, xs] <= reach
    if not near.any():
        return g, None
    spots = np.zeros(g.shape, np.uint8)
    spots[ys[near] + y0, xs[near] + x0] = 1
    spots = cv2.dilate(spots, _kernel(2 * scale))
    x, y, w, h = cv2.boundingRect(spots)
    y0, y1, x0, x1 = max(y - 2, 0), min(y + h + 2, g.shape[0]), max(x - 2, 0), min(x + w + 2, g.shape[1])
    out = g.copy()
    win, hole = out[y0:y1, x0:x1], spots[y0:y1, x0:x1] > 0
    win[hole] = _median(win[~hole]) if (~hole).any() else 0.0
    for _ in range(int(max(w, h))):  # Jacobi iterations of Laplace's equation in the holes
        np.copyto(win, cv2.blur(win, (3, 3), borderType=cv2.BORDER_REPLICATE), where=hole)
    return out, spots


def _find_pupil(g: np.ndarray, s: float, scale: float) -> tuple[_Pupil, np.ndarray, np.ndarray] | None:
    """The pupil proper, the glint-free image and its smoothed version; None if no pupil."""
    sigma = max(0.7, 0.8 * scale)
    sm = cv2.GaussianBlur(g, (0, 0), sigma)
    lo, med, hi = _quantiles(sm[::2, ::2], (0.005, 0.5, 0.999))
    if med - lo < 0.06:
        return None  # nothing stands out as dark: constant, all black, all white…
    first = cv2.morphologyEx((sm < lo + 0.4 * (med - lo)).astype(np.uint8), cv2.MORPH_OPEN, _kernel(1.5 * scale))
    comp = _pick_dark_component(first, sm, lo, med, s)
    if comp is None:
        return None
    comp = _fill_holes(comp)
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
    inner = cv2.erode(part, _kernel(1.5 * scale)) > 0
    dark = _median(sm_part[inner]) if inner.any() else float(sm_part[part > 0].min())
    around = _median(sm_part[ring]) if ring.any() else dark
    if around - dark < 0.05:
        return None
    level = 0.5 * (dark + around)
    # The pupil proper is as black as the pupil: tongues of the same black belong to it, but
    # smears (dark grey, below the half-height level) do not; its edge is traced at half height.
    black = cv2.morphologyEx((sm < dark + 0.1 * (around - dark)).astype(np.uint8), cv2.MORPH_OPEN, _kernel(1.5 * scale))
    if glints is not None:
        black |= glints  # a reflection must not split the pupil; its part of the rim is bridged below
    labels = cv2.connectedComponents(black)[1]
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
    area, _, cx, cy, _ = _polygon_stats(xy)
    if area < math.pi * (0.02 * s) ** 2:
        return None
    return _Pupil(xy, cx, cy, math.sqrt(area / math.pi), level, dark, around), g, sm


def _trace_boundary(sm: np.ndarray, region: np.ndarray, level: float, dark: float, band: int) -> np.ndarray | None:
    """Sub-pixel iso-contour (x, y) of `sm` at `level` around `region` (a filled 0/1 mask),
    looked for no farther than `band` pixels from the region's edge."""
    x, y, bw, bh = cv2.boundingRect(region)
    y0, y1 = max(y - band - 1, 0), min(y + bh + band + 1, sm.shape[0])
    x0, x1 = max(x - band - 1, 0), min(x + bw + band + 1, sm.shape[1])
    crop = sm[y0:y1, x0:x1].copy()
    part = region[y0:y1, x0:x1]
    crop[cv2.dilate(part, _disk(band)) == 0] = 1.0  # only this region's edge may be traced
    inside = cv2.erode(part, _disk(band)) > 0
    crop[inside] = np.minimum(crop[inside], dark)  # no holes from texture inside
    crop = cv2.copyMakeBorder(crop, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1.0)
    xy = _longest_closed_contour(crop, level)
    return None if xy is None else xy + (x0 - 1, y0 - 1)


# Marching squares as skimage.measure.find_contours runs it (low values fully connected): a cell's
# case has bit 1, 2, 4, 8 set when its upper-left, upper-right, lower-left, lower-right corner lies
# above the level, and its segments run from one side to another with the low values on their
# left. Sides 0-3: top, bottom, left, right; each is the edge from its start to its end corner
# ((row, col) offsets in the cell): along a row for top and bottom, down a column for left and right.
_CELL_SEGMENTS = {1: [(0, 2)], 2: [(3, 0)], 3: [(3, 2)], 4: [(2, 1)], 5: [(0, 1)], 6: [(3, 0), (2, 1)],
                  7: [(3, 1)], 8: [(1, 3)], 9: [(0, 2), (1, 3)], 10: [(1, 0)], 11: [(1, 2)], 12: [(2, 3)],
                  13: [(0, 3)], 14: [(2, 0)]}
_SEGMENT_SIDES = np.zeros((2, 16, 2), np.intp)  # [slot, case] → (from side, to side)
for _case, _segments in _CELL_SEGMENTS.items():
    _SEGMENT_SIDES[: len(_segments), _case] = _segments
_SIDE_START = np.array([(0, 0), (1, 0), (0, 0), (0, 1)])
_SIDE_END = np.array([(0, 1), (1, 1), (1, 0), (1, 1)])


def _longest_closed_contour(a: np.ndarray, level: float) -> np.ndarray | None:
    """Points (x, y) of the longest iso-contour of `a` at `level`, for an image whose border lies
    above the level (every contour closes): those, in the order and from the start, that
    skimage.measure.find_contours gives (without the repeated end); None under 8 points. Vectorised
    but for the walk along the segments, which costs a fraction of skimage's assembly."""
    a = a.astype(np.float64)
    h, w = a.shape
    up = (a > level).view(np.uint8)
    corners = up[:-1] + 4 * up[1:]  # per cell row: the bits of a cell's left corners, its right ones doubled
    case = corners[:, :-1] + 2 * corners[:, 1:]
    cell = np.flatnonzero((case - 1) < 14)  # uint8: the cells neither all below (0) nor all above (15)
    kind = case.ravel()[cell]
    slot = np.zeros(len(cell), np.intp)
    saddle = (kind == 6) | (kind == 9)
    if saddle.any():  # their second segment, processed after all the first ones
        cell, kind = np.concatenate([cell, cell[saddle]]), np.concatenate([kind, kind[saddle]])
        slot = np.concatenate([slot, np.ones(np.count_nonzero(saddle), np.intp)])
    side_from, side_to = _SEGMENT_SIDES[slot, kind].T
    row, col = np.divmod(cell, w - 1)
    corner = row * w + col
    edge_from = 2 * (corner + _SIDE_START[side_from] @ (w, 1)) + (side_from >= 2)
    edge_to = 2 * (corner + _SIDE_START[side_to] @ (w, 1)) + (side_to >= 2)
    segment_from = np.empty(2 * h * w, np.intp)
    segment_from[edge_from] = np.arange(len(cell))
    following = segment_from[edge_to].tolist()
    seen, longest, unseen = bytearray(len(cell)), [], len(cell)
    for first in range(len(cell)):
        if unseen <= len(longest):
            break  # no longer chain is left
        if seen[first]:
            continue
        chain, i = [], first
        while not seen[i]:
            seen[i] = 1
            chain.append(i)
            i = following[i]
        unseen -= len(chain)
        if len(chain) > len(longest):
            longest = chain
    if len(longest) < 8:
        return None
    # skimage's contour starts where the segment it met last (cells in raster order) closed it.
    chain = np.asarray(longest)
    last = int(np.argmax((2 * cell + slot)[chain]))
    chain = np.concatenate([chain[last + 1 :], chain[: last + 1]])
    start = _SIDE_START[side_from[chain]] + np.column_stack([row[chain], col[chain]])
    end = start + (_SIDE_END - _SIDE_START)[side_from[chain]]
    v0, v1 = a[start[:, 0], start[:, 1]], a[end[:, 0], end[:, 1]]
    frac = ((level - v0) / (v1 - v0))[:, None]
    return (start + (end - start) * frac)[:, ::-1]


def _runs(mask: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the runs of True in a cyclic boolean sequence."""
    if mask.all():
        return [np.arange(len(mask))]
    order = _cyclic_shift(np.arange(len(mask)), int(np.argmin(mask)))  # start on a False: no run wraps
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask[order].astype(np.int8), [0]])))
    return [order[i:j] for i, j in zip(edges[::2], edges[1::2], strict=True)]


def _ellipse_residual(xy: np.ndarray, ellipse) -> tuple[np.ndarray, float]:
    """Distance of points outside an OpenCV ellipse along its radii (negative inside), and the
    ellipse's mean radius √(ab)."""
    (cx, cy), (w, h), angle = ellipse
    a, b = 0.5 * w, 0.5 * h
    t = math.radians(angle)
    dx, dy = xy[:, 0] - cx, xy[:, 1] - cy
    u, v = dx * math.cos(t) + dy * math.sin(t), dy * math.cos(t) - dx * math.sin(t)
    rho = np.hypot(u, v)
    return rho * (1.0 - a * b / np.sqrt((b * u) ** 2 + (a * v) ** 2 + 1e-12)), math.sqrt(max(a * b, 1e-12))


def _linear_quantile(a: np.ndarray, q: float) -> np.ndarray | float:
    """np.quantile(a, q, axis=-1) (linear interpolation), from one partition instead of a sort."""
    n = a.shape[-1]
    pos = q * (n - 1)
    lo = int(pos)
    hi, t = min(lo + 1, n - 1), pos - lo
    part = np.partition(a, (lo, hi), axis=-1)
    below, above = part[..., lo], part[..., hi]
    return np.where(t < 0.5, below + (above - below) * t, above - (above - below) * (1 - t))


def _null_vectors(systems: np.ndarray) -> np.ndarray:
    """A null vector of each 5×6 system, scaled to a last component of 1 (zero where there is none
    such): Gaussian elimination with partial pivoting, vectorised over the systems."""
    a = systems.copy()
    every = np.arange(len(a))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for j in range(5):
            p = j + np.argmax(np.abs(a[:, j:, j]), axis=1)
            a[every, p], a[every, j] = a[every, j], a[every, p]
            a[:, j + 1 :] -= a[:, j + 1 :, j : j + 1] / a[:, j : j + 1, j : j + 1] * a[:, j : j + 1]
        x = np.ones((len(a), 6))
        for j in range(4, -1, -1):  # back substitution
            x[:, j] = -np.einsum("ij,ij->i", a[:, j, j + 1 :], x[:, j + 1 :]) / a[:, j, j]
    return np.where(np.isfinite(x).all(axis=1, keepdims=True), x, 0.0)  # 0: a degenerate system


def _robust_ellipse(pts: np.ndarray, trials: int = 150) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Conic (A, B, C, D, E, F) through 5 of `pts` whose 40th-percentile Sampson distance to all of
    them is least (least quantile of squares: up to 60% of the points may be outliers), with the
    centre and scale of the coordinates it is expressed in."""
    n = len(pts)
    c = pts.mean(axis=0)
    sc = float(np.abs(pts - c).mean()) or 1.0
    x, y = ((pts - c) / sc).T
    design = np.column_stack([x * x, x * y, y * y, x, y, np.ones(n)])
    pick = _random_indices(n, (n,), (trials, 5))[0]
    pick = pick[(np.diff(np.sort(pick, axis=1), axis=1) > 0).all(axis=1)]  # 5 distinct points
    conics = _null_vectors(design[pick])
    a, b, cc = conics[:, 0], conics[:, 1], conics[:, 2]
    ok = b * b - 4 * a * cc < 0  # ellipses only
    if not ok.any():
        return None
    conics = conics[ok]
    q = conics @ design.T
    gx = 2 * conics[:, :1] * x + conics[:, 1:2] * y + conics[:, 3:4]
    gy = conics[:, 1:2] * x + 2 * conics[:, 2:3] * y + conics[:, 4:5]
    low = _linear_quantile(np.abs(q) / np.maximum(np.hypot(gx, gy), 1e-9), _LTS_QUANTILE)
    return conics[int(np.argmin(low))], c, sc


def _robust_sigma(res: np.ndarray) -> float:
    """Scale of residuals from a low quantile of their magnitude (as for a normal law), so that
    outliers (up to 1 − `_LTS_QUANTILE` of them) do not inflate it."""
    return float(_linear_quantile(np.abs(res), _LTS_QUANTILE)) / _NORMAL_ABS_QUANTILE


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
    res, radius = _ellipse_residual(xy[reps], cv2.fitEllipse(xy[reps].astype(np.float32)))
    if np.abs(res).max() < max(0.5 * _MIN_BULGE * radius, 1.0):
        return np.zeros(len(xy), bool)  # already an ellipse: the common, quick case
    robust = _robust_ellipse(xy[reps])
    if robust is None:
        return np.zeros(len(xy), bool)
    conic, c, sc = robust
    x, y = ((xy[reps] - c) / sc).T
    q = conic @ np.stack([x * x, x * y, y * y, x, y, np.ones(len(x))])
    gx = 2 * conic[0] * x + conic[1] * y + conic[3]
    gy = conic[1] * x + 2 * conic[2] * y + conic[4]
    res = sc * np.abs(q) / np.maximum(np.hypot(gx, gy), 1e-9)
    use = reps[res < max(3.0 * _robust_sigma(res), 1.0)]
    for _ in range(4):  # least-squares refinement on the inliers
        if len(use) < 6:
            return np.zeros(len(xy), bool)
        ellipse = cv2.fitEllipse(xy[use].astype(np.float32))
        res, radius = _ellipse_residual(xy, ellipse)
        limit = max(3.0 * _robust_sigma(res[reps]), _MIN_BULGE * radius, 1.5)
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
    fit = _circle_lsq(xy[keep, 0], xy[keep, 1])
    if fit is None:
        return xy
    cx, cy, _ = fit
    turn = 1.0 if _polygon_stats(xy)[4] > 0 else -1.0  # counter-clockwise: angles increase
    order = _cyclic_shift(np.arange(len(xy)), int(np.argmax(keep)))  # start on a kept point
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


def _cyclic_shift(a: np.ndarray, k: int) -> np.ndarray:
    """a[(i + k) mod n] for every i (np.roll by −k, without its overhead)."""
    k %= len(a)
    return np.concatenate([a[k:], a[:k]]) if k else a


def _polygon_stats(xy: np.ndarray) -> tuple[float, float, float, float, float]:
    """Area, perimeter, centroid (x, y) and signed area (> 0 counter-clockwise) of a closed polygon."""
    x, y = xy[:, 0], xy[:, 1]
    nxt = _cyclic_shift(xy, 1)
    xn, yn = nxt[:, 0], nxt[:, 1]
    cross = x * yn - xn * y
    area2 = float(cross.sum())
    perim = float(np.hypot(xn - x, yn - y).sum())
    if abs(area2) < 1e-9:
        return 0.0, perim, float(x.mean()), float(y.mean()), 0.0
    cx = float(((x + xn) * cross).sum() / (3.0 * area2))
    cy = float(((y + yn) * cross).sum() / (3.0 * area2))
    return abs(area2) / 2.0, perim, cx, cy, area2 / 2.0


@functools.lru_cache(maxsize=8)
def _half_pixel_gaussian(sigma: float) -> np.ndarray:
    """Normalised Gaussian of `sigma` pixels sampled every half pixel out to 3 sigma."""
    half = int(math.ceil(3 * sigma / 0.5))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * 0.5 / sigma) ** 2)
    kernel /= kernel.sum()
    kernel.flags.writeable = False
    return kernel


def _smooth_polygon(xy: np.ndarray, seg: np.ndarray, sigma: float) -> np.ndarray:
    """The closed polygon (with `seg` the lengths of its sides) resampled every half pixel of arc
    and smoothed along it with a Gaussian of `sigma` pixels: removes the pixel-grid staircase that
    would lengthen the perimeter."""
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(16, int(arc[-1] / 0.5))
    t = np.arange(n) * (arc[-1] / n)
    closed = np.vstack([xy, xy[:1]])
    pts = np.column_stack([np.interp(t, arc, closed[:, 0]), np.interp(t, arc, closed[:, 1])])
    kernel = _half_pixel_gaussian(sigma)
    half = len(kernel) // 2
    padded = np.vstack([pts[-half:], pts, pts[:half]]) if half < n else pts
    if half >= n:
        return pts
    return np.column_stack([np.convolve(padded[:, i], kernel, mode="valid") for i in range(2)])


def _shape_metrics(p: _Pupil, scale: float) -> dict:
    """Circularity 4πA/P² (of the boundary smoothed over ~1 px, so that a rasterised circle
    scores ≈ 1), fitted-ellipse axis ratio and radial deviation of the pupil proper."""
    xy = p.contour
    seg = np.hypot(*(_cyclic_shift(xy, 1) - xy).T)
    area, perim, _, _, _ = _polygon_stats(_smooth_polygon(xy, seg, max(1.0, scale)))
    d = np.hypot(xy[:, 0] - p.cx, xy[:, 1] - p.cy)
    wts = seg + _cyclic_shift(seg, -1)  # each point stands for half of each neighbouring segment
    total = float(wts.sum())
    mean = float(wts @ d) / total
    std = math.sqrt(float(wts @ (d - mean) ** 2) / total)
    _, axes, _ = cv2.fitEllipse(xy.astype(np.float32))
    return {
        "pupil_circularity": 4.0 * math.pi * area / perim**2 if perim > 0 else math.nan,
        "pupil_axis_ratio": min(axes) / max(axes) if max(axes) > 0 else math.nan,
        "pupil_radial_dev": std / mean,
    }


# --------------------------------------------------------------------------------------------
# Iris


def _circle_lsq(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic (Kåsa) least-squares circle u² + v² + D u + E v + F = 0 through points, in coordinates
    u, v centred on their mean: there F = −mean(u² + v²), and D, E solve a 2×2 system."""
    n = len(x)
    if n < 3:
        return None
    uvz = np.empty((3, n))
    uvz[0], uvz[1] = x, y
    mean = uvz[:2].sum(axis=1) / n
    uvz[:2] -= mean[:, None]
    np.add(uvz[0] * uvz[0], uvz[1] * uvz[1], out=uvz[2])
    (suu, suv, suz), (_, svv, svz) = (uvz[:2] @ uvz.T).tolist()
    det = suu * svv - suv * suv
    if not det > 0:  # all on a line
        return None
    d, e = (suv * svz - svv * suz) / det, (suv * suz - suu * svz) / det
    r2 = 0.25 * (d * d + e * e) + float(uvz[2].sum()) / n
    return (float(mean[0]) - 0.5 * d, float(mean[1]) - 0.5 * e, math.sqrt(r2)) if r2 > 0 else None


def _refine_circle(x: np.ndarray, y: np.ndarray, tol: float,
                   circle: tuple[float, float, float]) -> tuple[tuple[float, float, float], np.ndarray] | None:
    """Least-squares circle, refitted on the points within `tol` of the previous circle."""
    keep = None
    for _ in range(6):
        new_keep = np.abs(np.hypot(x - circle[0], y - circle[1]) - circle[2]) <= tol
        if keep is not None and (new_keep == keep).all():
            break
        keep = new_keep
        if np.count_nonzero(keep) < 6:
            return None
        circle = _circle_lsq(x[keep], y[keep])
        if circle is None:
            return None
    return circle, keep


def _consensus_circle(x: np.ndarray, y: np.ndarray, weight: np.ndarray, tol: float,
                      near: tuple[float, float], r_range: tuple[float, float]) -> tuple[float, float, float] | None:
    """RANSAC: of circles through 3 candidate edges (x, y, weight: (rays, k) arrays), the one that
    the most edge weight agrees with (one candidate per ray, within `tol`), its centre within half
    a radius of `near` and its radius in `r_range`."""
    flat = np.flatnonzero(weight.ravel() > 0)
    half = weight.size // 2  # rays of the right sector come first, then the left
    right, left = flat[flat < half], flat[flat >= half]
    if len(flat) < 6 or not len(right) or not len(left):
        return None
    # Each circle through an edge on either side and a third anywhere; deterministic: same edges → same circle.
    pick_right, pick_left, pick_any = _random_indices(len(flat), (len(right), len(left), len(flat)), 96)
    tri = np.column_stack([right[pick_right], left[pick_left], flat[pick_any]])
    tri = tri[(tri[:, 2] != tri[:, 0]) & (tri[:, 2] != tri[:, 1])]
    px, py = x.ravel()[tri], y.ravel()[tri]
    (x1, x2, x3), (y1, y2, y3) = px.T, py.T
    den = 2.0 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    ok = np.abs(den) > 1e-6
    den = np.where(ok, den, 1.0)
    q1, q2, q3 = x1 * x1 + y1 * y1, x2 * x2 + y2 * y2, x3 * x3 + y3 * y3
    ux = (q1 * (y2 - y3) + q2 * (y3 - y1) + q3 * (y1 - y2)) / den
    uy = (q1 * (x3 - x2) + q2 * (x1 - x3) + q3 * (x2 - x1)) / den
    r = np.hypot(x1 - ux, y1 - uy)
    ok &= (r > r_range[0]) & (r < r_range[1]) & (np.hypot(ux - near[0], uy - near[1]) < 0.5 * r)
    if not ok.any():
        return None
    ux, uy, r = ux[ok, None], uy[ok, None], r[ok, None]
    best = int(np.argmax(_support(x, y, weight, tol, ux, uy, r)))
    return float(ux[best, 0]), float(uy[best, 0]), float(r[best, 0])


def _support(x: np.ndarray, y: np.ndarray, weight: np.ndarray, tol: float,
             ux: np.ndarray, uy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per circle (ux, uy, r: (circles, 1)), the candidate-edge weight (x, y, weight: (rays, k))
    that agrees with it: per ray, the heaviest candidate within `tol` of the circle."""
    res = np.hypot(x.T[:, None] - ux, y.T[:, None] - uy)  # (k, circles, rays): max over k is then cheap
    res -= r
    agree = np.where(np.abs(res) < tol, weight.T[:, None], np.float32(0.0))
    return agree.max(axis=0).sum(axis=1)


def _plausible(circle: tuple[float, float, float], near: tuple[float, float], r_range: tuple[float, float]) -> bool:
    """Radius in `r_range` and centre within half a radius of `near`."""
    cx, cy, r = circle
    return r_range[0] < r < r_range[1] and math.hypot(cx - near[0], cy - near[1]) < 0.5 * r


def _agreement(x: np.ndarray, y: np.ndarray, weight: np.ndarray, tol: float,
               circle: tuple[float, float, float]) -> float:
    """Share of the candidate edges' weight (x, y, weight: (rays, k)) that supports a circle, as
    `_consensus_circle` scores its candidates (`_support`)."""
    total = float(weight.max(axis=1).sum())
    if total <= 0:
        return 0.0
    return float(_support(x, y, weight, tol, *(np.array([[v]]) for v in circle))[0]) / total


def _first_limbus_circle(x: np.ndarray, y: np.ndarray, weight: np.ndarray, tol: float, near: tuple[float, float],
                         r_range: tuple[float, float]) -> tuple[tuple[float, float, float], np.ndarray] | None:
    """The limbus circle from the first-pass candidates, refined (`_refine_circle`): started from the
    least-squares circle through each ray's best edge when, refined, 90 % of the edge weight agrees
    with it (an unoccluded limbus: no consensus to search for), else from the RANSAC consensus."""
    keep = weight > 0
    best = keep[:, 0]
    if np.count_nonzero(best) >= 6:
        guess = _circle_lsq(x[best, 0], y[best, 0])
        fit = _refine_circle(x[keep], y[keep], tol, guess) if guess is not None else None
        if fit is not None and _plausible(fit[0], near, r_range) and _agreement(x, y, weight, tol, fit[0]) >= 0.9:
            return fit
    circle = _consensus_circle(x, y, weight, tol, near, r_range)
    return None if circle is None else _refine_circle(x[keep], y[keep], tol, circle)


def _ray_angles() -> np.ndarray:
    """Ray directions (image y points down): 30° above to 40° below the horizontal, right and left."""
    right = np.arange(-_SECTOR_UP_DEG, _SECTOR_DOWN_DEG + 1e-6, 2.5)
    return np.deg2rad(np.concatenate([right, 180.0 - right]))


_ANGLES = _ray_angles()
_COS, _SIN = np.cos(_ANGLES).astype(np.float32), np.sin(_ANGLES).astype(np.float32)
# Per ray, the 2.5° direction bins (of 144) within ±5° of it.
_RAY_BINS = (np.round(_ANGLES * (72 / math.pi)).astype(int)[:, None] + np.arange(-2, 3)) % 144


def _limbus_candidates(sm: np.ndarray, cx: float, cy: float, r_from: np.ndarray, r_to: float,
                       dark_level: float, scale: float, k: int, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ray, the `k` best dark→bright steps (local maxima of the radial derivative) between
    `r_from` and `r_to` whose inner side is not pupil-dark, scored by step height × the level 3 px
    beyond (the limbus opens onto the bright sclera): x, y, score, each (rays, k), with score 0
    where there is none. Profiles are sampled every `step` pixels."""
    radii = np.arange(max(1.0, float(r_from.min()) - 2.0), r_to, step, dtype=np.float32)
    n = len(radii)
    lag = max(1, int(round(scale / step)))
    if n < 4 * lag + 3:  # no room between the pupil and the search limit
        none = np.zeros((len(_ANGLES), k))
        return none, none, none
    prof = cv2.remap(sm, cx + _COS[:, None] * radii, cy + _SIN[:, None] * radii,
                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    lo, hi = 2 * lag, n - lag  # where the step and the level 2 lags in can be read
    grad = np.zeros_like(prof)
    valid = (prof[:, : hi - 2 * lag] >= dark_level) & (radii[lo:hi] >= r_from[:, None])
    grad[:, lo:hi] = np.where(valid, prof[:, lo + lag :] - prof[:, lo - lag : hi - lag], 0.0)
    core = grad[:, lo:hi]
    is_max = (core >= grad[:, lo - 1 : hi - 1]) & (core > grad[:, lo + 1 : hi + 1]) & (core > 0.02)
    beyond = np.minimum(np.arange(lo, hi) + int(round(3 * scale / step)), n - 1)
    score = np.where(is_max, core * prof[:, beyond], 0.0)  # a step into the bright sclera beats steps inside the iris
    rows = np.arange(len(score))
    j = np.empty((len(score), k), np.intp)
    strength = np.empty((len(score), k), score.dtype)
    for i in range(k):  # the k best peaks, best first
        j[:, i] = np.argmax(score, axis=1)
        strength[:, i] = score[rows, j[:, i]]
        score[rows, j[:, i]] = -1.0
    strength = np.maximum(strength, 0.0)
    j += lo
    gm, g0, gp = grad[rows[:, None], j - 1], grad[rows[:, None], j], grad[rows[:, None], j + 1]
    den = gm - 2 * g0 + gp
    offset = np.where(den < 0, 0.5 * (gm - gp) / np.where(den < 0, den, -1.0), 0.0)
    r = radii[j] + np.clip(offset, -1.0, 1.0) * step
    return cx + _COS[:, None] * r, cy + _SIN[:, None] * r, strength


def _find_iris(sm: np.ndarray, pupil: _Pupil, s: float, scale: float) -> tuple[float, float, float, float] | None:
    """Limbus circle (cx, cy, r) and iris circularity, from the left/right sectors."""
    tol = max(1.0, scale)
    xy = pupil.contour
    th = np.arctan2(xy[:, 1] - pupil.cy, xy[:, 0] - pupil.cx)
    d = np.hypot(xy[:, 0] - pupil.cx, xy[:, 1] - pupil.cy)
    reach = np.zeros(144)  # farthest pupil boundary per 2.5° bin, then over ±5° around each ray
    np.maximum.at(reach, np.round(th * (72 / math.pi)).astype(int) % 144, d)
    pupil_reach = reach[_RAY_BINS].max(axis=1)
    r_from = np.maximum(pupil_reach, pupil.r) + 2 * scale + 0.05 * pupil.r
    x, y, wt = _limbus_candidates(sm, pupil.cx, pupil.cy, r_from, 0.75 * s, pupil.level, scale, k=2, step=1.0)
    fit = _first_limbus_circle(x, y, wt, 1.5 * tol, (pupil.cx, pupil.cy), (1.05 * pupil.r, 0.75 * s))
    if fit is None:
        return None
    # Second pass: rays from the fitted centre (now normal to the limbus), searched near it.
    icx, icy, ir = fit[0]
    x, y, wt = _limbus_candidates(sm, icx, icy, np.full(len(_ANGLES), 0.85 * ir), 1.15 * ir, pupil.level, scale, k=1, step=0.5)
    keep = wt[:, 0] > 0
    fit = _refine_circle(x[keep, 0], y[keep, 0], tol, (icx, icy, ir))
    if fit is None:
        return None
    (icx, icy, ir), _ = fit
    if ir <= pupil.r:
        return None
    dist = np.hypot(x[keep, 0] - icx, y[keep, 0] - icy)
    med = float(_linear_quantile(dist, 0.5))
    return icx, icy, ir, 1.0 - 1.4826 * float(_linear_quantile(np.abs(dist - med), 0.5)) / med


# --------------------------------------------------------------------------------------------
# Bleed and quality figures


def _annulus_metrics(g: np.ndarray, sm: np.ndarray, pupil: _Pupil, iris: tuple[float, float, float],
                     scale: float) -> dict:
    """Bleed fraction, ISO contrasts and grey-scale utilisation from the iris annulus."""
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
    inner = cv2.erode(pupil_mask, _kernel(1.5 * scale)) > 0
    band = cv2.dilate(pupil_mask, _kernel(scale + 0.05 * pupil.r))
    annulus = in_iris & (band == 0)
    sideways = np.abs(dy) < np.float32(math.tan(math.radians(_SECTOR_UP_DEG))) * np.abs(dx)
    sclera_ring = (r_iris > 1.1 * ir) & (r_iris < 1.25 * ir) & sideways
    p_med = _median(g[inner]) if inner.any() else pupil.dark
    i_med = _median(g[annulus]) if annulus.any() else math.nan
    s_med = _median(g[sclera_ring]) if sclera_ring.any() else math.nan
    visible = annulus
    if s_med > i_med + 0.02:
        # Not iris: eyelid skin and sclera, and below the upper lid's skin its shadowed margin and
        # lashes (up to 0.45 iris radii).
        skin = sm > 0.5 * (i_med + s_med)
        lid = (skin & (r_iris < ir) & (dy < 0)).astype(np.uint8)
        reach = max(2, int(round(0.45 * ir)))
        below_lid = cv2.dilate(lid, np.ones((reach, 1), np.uint8), anchor=(0, reach - 1)) > 0
        visible = annulus & ~skin & ~below_lid
    out = {"grey_utilisation": _entropy_bits(g[in_iris])}
    n_visible = np.count_nonzero(visible)
    if n_visible:
        dark = (visible & (sm < pupil.level)).astype(np.uint8)
        dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, _kernel(scale))  # thin lashes, noise
        # Bleed flows out of the pupil: keep dark patches that start at its rim (not lash clumps).
        n, labels = cv2.connectedComponents(dark)
        out["bleed_fraction"] = 0.0
        if n > 1:
            rim = (cv2.dilate(band, _kernel(2 * scale)) > 0) & (band == 0)
            attached = np.zeros(n, bool)
            attached[labels[rim & (dark > 0)]] = True
            out["bleed_fraction"] = np.count_nonzero(attached[labels]) / n_visible
    out["iris_pupil_contrast"], out["iris_sclera_contrast"] = _iso_contrasts(p_med, i_med, s_med)
    return out


def _entropy_bits(values: np.ndarray) -> float:
    """Entropy (bits) of the 256-bin histogram of [0, 1] values: ISO 29794-6 grey-scale utilisation."""
    if values.size == 0:
        return math.nan
    hist = np.bincount((values * 255.0 + 0.5).astype(np.int64).ravel(), minlength=256)
    p = hist[hist > 0] / values.size
    return float(-(p * np.log2(p)).sum())


def _sharpness(g: np.ndarray) -> float:
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
