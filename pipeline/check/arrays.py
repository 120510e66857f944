"""Small, fast array helpers shared by the measurement modules: order statistics, cyclic shifts,
memoised disk structuring elements and memoised random draws (deterministic per seed)."""

from __future__ import annotations

import functools

import cv2
import numpy as np


def quantiles(a: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """Order statistics (nearest rank) of an array: cheaper than np.quantile for a few of them."""
    flat = a.ravel()
    ranks = [min(len(flat) - 1, int(round(q * (len(flat) - 1)))) for q in qs]
    part = np.partition(flat, ranks)
    return [float(part[r]) for r in ranks]


def median(a: np.ndarray) -> float:
    """The median (nearest rank) of an array."""
    return quantiles(a, (0.5,))[0]


@functools.lru_cache(maxsize=64)
def disk(radius: int) -> np.ndarray:
    """Elliptic (disk) structuring element of `radius` pixels (at least 1), for OpenCV morphology."""
    r = max(1, radius)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def kernel(radius: float) -> np.ndarray:
    """`disk` of a radius rounded to whole pixels."""
    return disk(int(round(radius)))


@functools.lru_cache(maxsize=1024)
def random_indices(seed: int, highs: tuple[int, ...], size: int | tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """`rng.integers(0, high, size)` for each high in turn, rng = np.random.default_rng(seed).
    Memoised: seeding costs more than drawing, and the same counts recur image after image."""
    rng = np.random.default_rng(seed)
    draws = tuple(rng.integers(0, high, size) for high in highs)
    for d in draws:
        d.flags.writeable = False
    return draws


def linear_quantile(a: np.ndarray, q: float) -> np.ndarray | float:
    """np.quantile(a, q, axis=-1) (linear interpolation), from one partition instead of a sort."""
    n = a.shape[-1]
    pos = q * (n - 1)
    lo = int(pos)
    hi, t = min(lo + 1, n - 1), pos - lo
    part = np.partition(a, hi, axis=-1)
    above = part[..., hi]
    below = part[..., :hi].max(axis=-1) if hi > lo else above  # the largest below the hi-th: the lo-th
    return below + (above - below) * t if t < 0.5 else above - (above - below) * (1 - t)


def cyclic_shift(a: np.ndarray, k: int) -> np.ndarray:
    """a[(i + k) mod n] for every i (np.roll by −k, without its overhead)."""
    k %= len(a)
    return np.concatenate([a[k:], a[:k]]) if k else a
