"""Fitting curves to boundary points: polygon area and centroid, the algebraic least-squares
circle, and the robust (least-quantile-of-squares) ellipse with its residuals and noise scale."""

from __future__ import annotations

import functools
import math
import statistics

import numpy as np

from pipeline.check.arrays import cyclic_shift, linear_quantile, random_indices

_LTS_QUANTILE = 0.4  # the robust pupil ellipse must fit at least this share of the boundary
_NORMAL_ABS_QUANTILE = statistics.NormalDist().inv_cdf(0.5 + _LTS_QUANTILE / 2)
_SINGULAR = 1e-12  # |det| / Hadamard bound below which a 5x5 system counts as singular


def polygon_stats(xy: np.ndarray) -> tuple[float, float, float, float, float]:
    """Area, perimeter, centroid (x, y) and signed area (> 0 counter-clockwise) of a closed polygon."""
    x, y = xy[:, 0], xy[:, 1]
    nxt = cyclic_shift(xy, 1)
    xn, yn = nxt[:, 0], nxt[:, 1]
    cross = x * yn - xn * y
    area2 = float(cross.sum())
    perim = float(np.hypot(xn - x, yn - y).sum())
    if abs(area2) < 1e-9:
        return 0.0, perim, float(x.mean()), float(y.mean()), 0.0
    cx = float(((x + xn) * cross).sum() / (3.0 * area2))
    cy = float(((y + yn) * cross).sum() / (3.0 * area2))
    return abs(area2) / 2.0, perim, cx, cy, area2 / 2.0


def circle_lsq(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
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


def ellipse_residual(xy: np.ndarray, ellipse) -> tuple[np.ndarray, float]:
    """Distance of points outside an OpenCV ellipse along its radii (negative inside), and the
    ellipse's mean radius √(ab)."""
    (cx, cy), (w, h), angle = ellipse
    a, b = 0.5 * w, 0.5 * h
    t = math.radians(angle)
    dx, dy = xy[:, 0] - cx, xy[:, 1] - cy
    u, v = dx * math.cos(t) + dy * math.sin(t), dy * math.cos(t) - dx * math.sin(t)
    rho = np.hypot(u, v)
    return rho * (1.0 - a * b / np.sqrt((b * u) ** 2 + (a * v) ** 2 + 1e-12)), math.sqrt(max(a * b, 1e-12))


def _null_vectors(systems: np.ndarray) -> np.ndarray:
    """A null vector of each 5×6 system, scaled to a last component of 1, and zero where there is no
    unique one: where the left 5×5 block is singular to rounding (|det| below 1e-12 of Hadamard's
    bound, the product of its row norms), decided before LAPACK solves the rest at once. (LAPACK's
    own test, an exactly zero pivot, depends on the CPU's rounding: two equal rows failed on an
    AVX2 EPYC and came out as an arbitrary member of the pencil on an AVX-512 one.)"""
    a = systems[:, :, :5]
    with np.errstate(all="ignore"):
        det = np.linalg.det(a)
    unique = np.abs(det) > _SINGULAR * np.prod(np.linalg.norm(a, axis=2), axis=1)
    x = np.zeros((len(systems), 6))
    x[unique, :5] = np.linalg.solve(a[unique], -systems[unique, :, 5:])[:, :, 0]
    x[unique, 5] = 1.0
    return x


def robust_ellipse(pts: np.ndarray, trials: int = 150) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Conic (A, B, C, D, E, F) through 5 of `pts` whose 40th-percentile Sampson distance to all of
    them is least (least quantile of squares: up to 60% of the points may be outliers), with the
    centre and scale of the coordinates it is expressed in."""
    n = len(pts)
    c = pts.mean(axis=0)
    sc = float(np.abs(pts - c).mean()) or 1.0
    x, y = ((pts - c) / sc).T
    design = np.column_stack([x * x, x * y, y * y, x, y, np.ones(n)])
    conics = _null_vectors(design[_five_distinct(n, trials)])
    a, b, cc = conics[:, 0], conics[:, 1], conics[:, 2]
    ok = b * b - 4 * a * cc < 0  # ellipses only
    if not ok.any():
        return None
    conics = conics[ok]
    q = conics @ design.T
    gx = 2 * conics[:, :1] * x + conics[:, 1:2] * y + conics[:, 3:4]
    gy = conics[:, 1:2] * x + 2 * conics[:, 2:3] * y + conics[:, 4:5]
    low = linear_quantile(np.abs(q) / np.maximum(np.hypot(gx, gy), 1e-9), _LTS_QUANTILE)
    return conics[int(np.argmin(low))], c, sc


@functools.lru_cache(maxsize=256)
def _five_distinct(n: int, trials: int) -> np.ndarray:
    """The draws of 5 of `n` points (`random_indices` seeded by `n`) that name 5 distinct points."""
    pick = random_indices(n, (n,), (trials, 5))[0]
    pick = pick[(np.diff(np.sort(pick, axis=1), axis=1) > 0).all(axis=1)]
    pick.flags.writeable = False  # shared by every call
    return pick


def robust_sigma(res: np.ndarray) -> float:
    """Scale of residuals from a low quantile of their magnitude (as for a normal law), so that
    outliers (up to 1 − `_LTS_QUANTILE` of them) do not inflate it."""
    return float(linear_quantile(np.abs(res), _LTS_QUANTILE)) / _NORMAL_ABS_QUANTILE
