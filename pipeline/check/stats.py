"""Statistics for comparing image sets: Wilson score intervals for pass rates, McNemar's exact test
for two rates measured on the same seeds (paired images), a paired bootstrap for any other statistic
of paired images (KID, mean bleed), and Holm's adjustment for a family of tests."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default z)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # rounding never excludes p


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """McNemar's exact test of equal pass rates for paired outcomes (a[i], b[i] on the same seed).

    Only discordant pairs count: `a_only` (a passes, b fails) and `b_only`. Under equal rates each
    discordant pair goes either way with probability 1/2, so the two-sided p-value is twice the
    smaller binomial(a_only + b_only, 1/2) tail, capped at 1.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    b_only = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    m = a_only + b_only
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1)) / 2**m if m else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail),
            "difference": (a_only - b_only) / len(a) if len(a) else 0.0}


def paired_bootstrap(difference: Callable[[np.ndarray], np.ndarray], n: int, resamples: int = 2000,
                     seed: int = 0) -> dict:
    """Percentile bootstrap of a statistic of n paired images (image i of both sets from seed i).

    `difference(counts)` takes counts (B, n), how often each pair is drawn in each of B resamples
    (all ones = the sets themselves), and returns B values of the statistic (e.g. KID of set A minus
    KID of set B). Pairs are drawn together, so what the two sets share through their seeds cancels.
    Returns the estimate (all ones), the 95 % interval, and the two-sided p-value of "no difference":
    twice the share of resamples on the far side of 0 (at least 1 / resamples), capped at 1.
    """
    if n < 2 or resamples < 1:
        raise ValueError(f"need n >= 2 pairs and resamples >= 1, got n={n}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])
    values = np.asarray(difference(counts), np.float64)
    estimate = float(np.asarray(difference(np.ones((1, n))), np.float64)[0])
    lo, hi = np.percentile(values, [2.5, 97.5])
    far = min((values <= 0).mean(), (values >= 0).mean())
    return {"estimate": estimate, "ci95": (float(lo), float(hi)),
            "p_value": float(min(1.0, max(2 * far, 1.0 / resamples)))}


def mean_difference(a: Sequence[float], b: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    """For `paired_bootstrap`: the weighted mean of a[i] - b[i] over the pairs where both are finite."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    keep = np.isfinite(d)
    d = np.where(keep, d, 0.0)

    def of(counts: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(counts) * keep
        return (w @ d) / np.maximum(w.sum(axis=1), 1)

    return of


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: p-values one may compare with 5 % while keeping the chance of
    any false finding in the whole family at or below 5 %."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
