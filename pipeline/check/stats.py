"""Statistics for pass rates: Wilson score intervals, and McNemar's exact test for two rates measured
on the same seeds (paired images)."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
