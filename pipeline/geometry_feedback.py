"""Closed-loop geometry (issue 23): regenerate the images that miss their geometry targets.

A geometry VAE decodes each prior under a condition c (pupil/iris ratio, iris radius, offset), but
diffusion repaints the pupil and drifts the measured ratio toward the mean. `close_loop` measures
every result with circularity-check's analysis and, for an image whose measured pupil ratio (and
iris radius, when the request sets it) misses its target by more than `tolerance`, decodes and
denoises it again under the corrected condition

    c ← c + (target − measured)    (of the latest try, clipped into `bounds`)

with the same latent ε and the same diffusion noise streams, so the condition is the only change:
the same seed and settings give the same images. Up to `rounds` times per image; each image keeps
its try whose measurement is nearest its target (the largest |measured − target| over the fed-back
keys), its first try on ties, and never trades a round pupil for geometry: when the first try's
pupil is round (circularity-check's round-pupil rule) only tries with a round pupil are kept, so
the loop cannot lower the round-pupil rate. An image that cannot be measured (no pupil or iris
found) keeps its first try; a retry that cannot be measured stops that image's loop; so does a correction clipped to
the condition it already tried (it would give the same image again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.common.errors import UserError
from pipeline.data.geometry import GEOMETRY_KEYS
from pipeline.geometry_targets import GeometryRequest, control_error

log = logging.getLogger(__name__)

# (conditions of some images, their row numbers) → (their priors, their results)
Render = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Measure = Callable[[np.ndarray], list[dict]]
MARGIN = 0.1  # how far (a share of the training span) a corrected condition may leave the training range
STEP = "condition ← condition + (target − measured) of the latest try, clipped into bounds"


def check_feedback(rounds: int, tolerance: float) -> None:
    """UserError unless `rounds` ≥ 0 and 0 < `tolerance` < 1."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise UserError(f"--geometry-feedback must be a whole number of rounds >= 0 (0 = open loop), got {rounds}")
    if not 0.0 < tolerance < 1.0:
        raise UserError(f"--geometry-tolerance must be in (0, 1), got {tolerance:g}")


def feedback_keys(request: GeometryRequest) -> tuple[str, ...]:
    """The targets fed back: the pupil ratio always, the iris radius when the request sets it."""
    iris = request.iris_radius is not None or "iris_radius" in (request.rows or {})
    return ("pupil_ratio", "iris_radius") if iris else ("pupil_ratio",)


def condition_bounds(bank: np.ndarray, keys: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Where a corrected condition may go: the VAE's training range of each key (its condition bank),
    widened by MARGIN of its span, inside (0, 1)."""
    bounds = {}
    for key in keys:
        column = np.asarray(bank, np.float64)[:, GEOMETRY_KEYS.index(key)]
        lo, hi = float(column.min()), float(column.max())
        pad = MARGIN * (hi - lo)
        bounds[key] = (max(lo - pad, 0.01), min(hi + pad, 0.99))
    return bounds


def miss(targets: np.ndarray, measured: list[dict], keys: tuple[str, ...]) -> np.ndarray:
    """Per image the largest |measured − target| over `keys`; NaN where one was not measured."""
    got = np.array([[m[key] for key in keys] for m in measured], np.float64).reshape(len(measured), len(keys))
    want = np.asarray(targets, np.float64)[:, [GEOMETRY_KEYS.index(key) for key in keys]]
    return np.abs(got - want).max(axis=1)


def corrected(tried: np.ndarray, targets: np.ndarray, measured: list[dict], keys: tuple[str, ...],
              bounds: dict[str, tuple[float, float]]) -> np.ndarray:
    """The next condition of each image: `tried` + (target − measured) on `keys`, clipped into `bounds`;
    where a key was not measured the condition stays."""
    out = np.array(tried, np.float32, copy=True)
    for key in keys:
        j = GEOMETRY_KEYS.index(key)
        lo, hi = bounds[key]
        got = np.array([m[key] for m in measured], np.float64)
        step = np.clip(tried[:, j] + (targets[:, j] - got), lo, hi)
        out[:, j] = np.where(np.isfinite(got), step, tried[:, j])
    return out


@dataclass
class Loop:
    """The kept try of every image (priors, results, their measurement, the condition it used) and
    the record of the loop for metadata.json."""

    priors: np.ndarray
    images: np.ndarray
    measured: list[dict]
    conditions: np.ndarray
    record: dict


def close_loop(targets: np.ndarray, priors: np.ndarray, images: np.ndarray, measured: list[dict], render: Render,
               measure: Measure, rounds: int, tolerance: float, keys: tuple[str, ...],
               bounds: dict[str, tuple[float, float]]) -> Loop:
    """Up to `rounds` corrections of the images that miss `targets` by more than `tolerance` (see the
    module docstring). `priors`, `images` and `measured` are the first tries, made under `targets`."""
    targets = np.asarray(targets, np.float32)
    kept = Loop(priors.copy(), images.copy(), list(measured), targets.copy(), {})
    tried, latest = targets.copy(), list(measured)
    first = miss(targets, measured, keys)
    best = first.copy()
    errors = [[_finite(e)] for e in first]
    tries, kept_try = np.ones(len(targets), int), np.zeros(len(targets), int)
    active = np.isfinite(best) & (best > tolerance)
    keep_round = [bool(m.get("round_pupil", False)) for m in measured]  # only round tries may replace a round one
    per_round, not_round = [], 0
    for r in range(1, rounds + 1):
        step = corrected(tried, targets, latest, keys, bounds)
        rows = np.flatnonzero(active & np.any(step != tried, axis=1))
        if not rows.size:
            break
        new_priors, new_images = render(step[rows], rows)
        new_measured = measure(new_images)
        err = miss(targets[rows], new_measured, keys)
        for k, row in enumerate(rows):
            tries[row] += 1
            tried[row], latest[row] = step[row], new_measured[k]
            errors[row].append(_finite(err[k]))
            shape_ok = not keep_round[row] or bool(new_measured[k].get("round_pupil", False))
            not_round += bool(err[k] < best[row] and not shape_ok)
            if err[k] < best[row] and shape_ok:  # a NaN (not measured) is never kept
                best[row], kept_try[row] = err[k], r
                kept.priors[row], kept.images[row] = new_priors[k], new_images[k]
                kept.measured[row], kept.conditions[row] = new_measured[k], step[row]
            active[row] = bool(np.isfinite(err[k]) and best[row] > tolerance)
        within = int(np.sum(best <= tolerance))
        per_round.append({"round": r, "regenerated": int(rows.size), "within_tolerance": within})
        log.info("geometry feedback round %d: regenerated %d image(s); %d of %d within %g of their targets",
                 r, rows.size, within, len(targets), tolerance)
    kept.record = {
        "rounds": rounds, "tolerance": tolerance, "keys": list(keys), "step": STEP,
        "bounds": {key: list(b) for key, b in bounds.items()},
        "images_regenerated": int(np.sum(tries > 1)), "extra_diffusion_passes": int(np.sum(tries - 1)),
        "not_measured_first_try": int(np.sum(~np.isfinite(first))),
        "within_tolerance_first_try": int(np.sum(first <= tolerance)),
        "within_tolerance": int(np.sum(best <= tolerance)),
        "nearer_but_not_round": not_round,  # tries nearer their target but not kept: the first try's pupil was round
        "per_round": per_round,
        "per_image": [{"tries": int(t), "kept_try": int(k), "condition": c.tolist(), "errors": e}
                      for t, k, c, e in zip(tries, kept_try, kept.conditions, errors, strict=True)],
    }
    return kept


def _finite(x: float) -> float | None:
    """`x`, or None (JSON null) when it is NaN."""
    return float(x) if np.isfinite(x) else None


def run_feedback(geometry: dict, request: GeometryRequest, bank: np.ndarray, priors: np.ndarray, images: np.ndarray,
                 render: Render, measure: Measure, rounds: int, tolerance: float) -> Loop:
    """`close_loop` on a `generate` run's first tries: measures them, keeps their measurement and control
    (measured_open_loop, control_open_loop) and the loop's record (feedback) in `geometry`, the run's
    metadata["prior"]["geometry"]; `bank` is the VAE's training geometry (for the bounds)."""
    targets = np.asarray(geometry["targets"], np.float32)
    measured = measure(images)
    keys = feedback_keys(request)
    geometry["measured_open_loop"] = measured
    geometry["control_open_loop"] = {key: control_error(targets, measured, key) for key in ("pupil_ratio", "iris_radius")}
    first = miss(targets, measured, keys)
    log.info("geometry feedback: %d of %d images miss their %s targets by more than %g (%d not measured); "
             "up to %d round(s)", np.sum(first > tolerance), len(first), " and ".join(keys), tolerance,
             np.sum(~np.isfinite(first)), rounds)
    loop = close_loop(targets, priors, images, measured, render, measure, rounds, tolerance, keys,
                      condition_bounds(bank, keys))
    geometry["feedback"] = loop.record
    return loop
