"""Finding the iris's outer boundary (the limbus) around the pupil.

4. Iris (limbus). Along rays from the pupil centre in two sectors about the horizontal (30° above
   to 40° below, left and right: where eyelids and lashes rarely reach), the two strongest
   dark→bright steps outside the pupil are candidate edges. Only visible arcs count: a step must
   face the ray (its component across the ray at most tan 35° of the one along it: an eyelid's
   edge faces up or down), and a ray beyond the image's edge sees none. A circle is refined by
   least squares on the edges within 1.5 px of it, started from the fit to each ray's strongest
   edge when 90 % of the edge strength then agrees with it (an unoccluded limbus), else from a
   RANSAC circle (most edge strength within 1.5 px); if that circle's centre is over 0.15 radii
   from the pupil's, the best nearly concentric circle (RANSAC within 0.15 radii, one side's edges
   alone allowed) replaces it unless the eccentric one has over 1/0.7 times its support (an
   eccentric iris keeps its circle; edges of lids, lashes or a cut-off side do not). Rays are cast
   again from its centre and the circle refitted. This is Daugman's radial-gradient search
   restricted to occlusion-free sectors.
   `iris_circularity` = 1 − 1.4826·MAD/median of the limbus distance from the fitted centre over
   those rays (a robust 1 − std/mean: a few rays caught by lashes do not count).

Lengths are for 128-px images and scale with the image (see `pipeline.check.analyze`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipeline.check.arrays import linear_quantile, random_indices
from pipeline.check.fit import circle_lsq
from pipeline.check.pupil import Pupil

SECTOR_UP_DEG, _SECTOR_DOWN_DEG = 30.0, 40.0  # limbus search sectors about the horizontal
_CONCENTRIC = 0.15  # a limbus centre within this many radii of the pupil's is nearly concentric
_ECCENTRIC_SUPPORT = 0.7  # an eccentric limbus needs 1/0.7 times the edge support of a concentric one
_MAX_TILT = math.tan(math.radians(35.0))  # an edge facing more than this far from the ray is not the limbus


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
        circle = circle_lsq(x[keep], y[keep])
        if circle is None:
            return None
    return circle, keep


def _consensus_circle(x: np.ndarray, y: np.ndarray, weight: np.ndarray, tol: float, near: tuple[float, float],
                      r_range: tuple[float, float], offset: float = 0.5) -> tuple[float, float, float] | None:
    """RANSAC: of circles through 3 candidate edges (x, y, weight: (rays, k) arrays), the one that
    the most edge weight agrees with (one candidate per ray, within `tol`), its centre within
    `offset` radii of `near` and its radius in `r_range`."""
    flat = np.flatnonzero(weight.ravel() > 0)
    half = weight.size // 2  # rays of the right sector come first, then the left
    right, left = flat[flat < half], flat[flat >= half]
    if len(flat) < 6 or (not (len(right) and len(left)) and offset > _CONCENTRIC):
        return None  # edges on one side only (the other beyond the image, say): a nearly concentric circle at most
    if offset <= _CONCENTRIC:  # centred: any three edges, one side alone included
        right = left = flat
    # Each circle through an edge on either side and a third anywhere; deterministic: same edges → same circle.
    pick_right, pick_left, pick_any = random_indices(len(flat), (len(right), len(left), len(flat)), 96)
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
    ok &= (r > r_range[0]) & (r < r_range[1]) & (np.hypot(ux - near[0], uy - near[1]) < offset * r)
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
    agree = weight.T[:, None] * (np.abs(res) < tol)  # weights ≥ 0: the product is np.where's result, cheaper
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
    with it (an unoccluded limbus: no consensus to search for), else from the RANSAC consensus; and
    when that circle is eccentric, the best nearly concentric one instead unless it has far less
    support (lid and lash edges, or one side of the iris beyond the image, fit eccentric circles)."""
    keep = weight > 0
    best = keep[:, 0]
    fit = None
    if np.count_nonzero(best) >= 6:
        guess = circle_lsq(x[best, 0], y[best, 0])
        fit = _refine_circle(x[keep], y[keep], tol, guess) if guess is not None else None
        if fit is not None and not (_plausible(fit[0], near, r_range) and _agreement(x, y, weight, tol, fit[0]) >= 0.9):
            fit = None
    if fit is None:
        circle = _consensus_circle(x, y, weight, tol, near, r_range)
        fit = None if circle is None else _refine_circle(x[keep], y[keep], tol, circle)
    if fit is None or math.hypot(fit[0][0] - near[0], fit[0][1] - near[1]) <= _CONCENTRIC * fit[0][2]:
        return fit
    # Off-centre: an eccentric iris, or edges of lids and lashes fitted where little limbus shows.
    # The best nearly concentric circle wins unless the eccentric one has far more support.
    circle = _consensus_circle(x, y, weight, tol, near, r_range, _CONCENTRIC)
    concentric = None if circle is None else _refine_circle(x[keep], y[keep], tol, circle)
    if concentric is not None and (_agreement(x, y, weight, tol, concentric[0])
                                   >= _ECCENTRIC_SUPPORT * _agreement(x, y, weight, tol, fit[0])):
        return concentric
    return fit


def _ray_angles() -> np.ndarray:
    """Ray directions (image y points down): 30° above to 40° below the horizontal, right and left."""
    right = np.arange(-SECTOR_UP_DEG, _SECTOR_DOWN_DEG + 1e-6, 2.5)
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
    xs, ys = cx + _COS[:, None] * radii, cy + _SIN[:, None] * radii
    prof = cv2.remap(sm, xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # The step across the ray (the image 1 lag to either side): an edge facing up or down (an eyelid)
    # has more of it than the limbus, a circle about the pupil whose edge faces the ray.
    side_x, side_y = -_SIN[:, None] * np.float32(lag), _COS[:, None] * np.float32(lag)
    across = (cv2.remap(sm, xs + side_x, ys + side_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
              - cv2.remap(sm, xs - side_x, ys - side_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    lo, hi = 2 * lag, n - lag  # where the step and the level 2 lags in can be read
    grad = np.zeros_like(prof)
    step_along = prof[:, lo + lag :] - prof[:, lo - lag : hi - lag]
    valid = (prof[:, : hi - 2 * lag] >= dark_level) & (radii[lo:hi] >= r_from[:, None])
    valid &= np.abs(across[:, lo:hi]) <= _MAX_TILT * step_along
    h, w = sm.shape
    inside = (xs >= 0) & (ys >= 0) & (xs <= w - 1) & (ys <= h - 1)  # beyond the image: no edge to see
    valid &= inside[:, lo + lag :]
    grad[:, lo:hi] = step_along * valid  # (−0.0 where a falling step is masked: equal to 0.0 in every comparison)
    core = grad[:, lo:hi]
    is_max = (core >= grad[:, lo - 1 : hi - 1]) & (core > grad[:, lo + 1 : hi + 1]) & (core > 0.02)
    beyond = np.minimum(np.arange(lo, hi) + int(round(3 * scale / step)), n - 1)
    score = core * prof[:, beyond] * is_max  # a step into the bright sclera beats steps inside the iris
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


def find_iris(sm: np.ndarray, pupil: Pupil, s: float, scale: float) -> tuple[float, float, float, float] | None:
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
    med = float(linear_quantile(dist, 0.5))
    return icx, icy, ir, 1.0 - 1.4826 * float(linear_quantile(np.abs(dist - med), 0.5)) / med
