"""The pass/fail verdict of `circularity-check`: the metric names, the rules built from
`CircularityConfig` and the reason an image fails.

Rules are the fields of `CircularityConfig`, in order: `min_<metric>` needs metric ≥ value and
`max_<metric>` needs metric ≤ value; the first that fails is the image's `reason`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from pipeline.common.config import CircularityConfig

NO_PUPIL = "no dark pupil region"
NO_IRIS = "no iris boundary"

# Per-image metrics, in CSV column order (besides file, size, pass and reason).
METRICS = (
    "pupil_found", "pupil_cx", "pupil_cy", "pupil_r", "pupil_circularity", "pupil_axis_ratio",
    "pupil_radial_dev", "iris_found", "iris_cx", "iris_cy", "iris_r", "iris_circularity",
    "concentricity", "pupil_iris_ratio", "bleed_fraction", "iris_pupil_contrast",
    "iris_sclera_contrast", "grey_utilisation", "sharpness", "usable_iris_area", "margin_adequacy",
)


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


@functools.cache
def _rule_fields(config_class: type) -> tuple[tuple[str, str, str], ...]:
    """(field, kind, metric) of each rule field of a config class, read once (this runs per image)."""
    out = []
    for f in dataclasses.fields(config_class):
        kind, _, metric = f.name.partition("_")
        if kind not in ("min", "max") or metric not in METRICS:
            raise ValueError(f"circularity config field {f.name!r} is not min_/max_<metric>")
        out.append((f.name, kind, metric))
    return tuple(out)


def rules_from_config(cfg: CircularityConfig) -> tuple[Rule, ...]:
    """The rules, in the order of the config fields."""
    fields = _rule_fields(type(cfg))
    return _rules(fields, tuple(float(getattr(cfg, name)) for name, _, _ in fields))


@functools.lru_cache(maxsize=16)
def _rules(fields: tuple[tuple[str, str, str], ...], thresholds: tuple[float, ...]) -> tuple[Rule, ...]:
    """The rules for these thresholds, built once (they are read per image and per row)."""
    return tuple(Rule(metric, kind, t) for (_, kind, metric), t in zip(fields, thresholds, strict=True))


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


PUPIL_SHAPE_METRICS = ("pupil_circularity", "pupil_axis_ratio", "bleed_fraction")
IRIS_PLACE_METRICS = ("concentricity", "pupil_iris_ratio")  # where the limbus sits around the pupil


def passes_rules(metrics: dict, cfg: CircularityConfig, names: tuple[str, ...]) -> bool:
    """Whether the metrics pass every rule of `cfg` on one of the metrics `names` (NaN fails)."""
    return all(rule.passes(float(metrics[rule.metric])) for rule in rules_from_config(cfg) if rule.metric in names)


def round_pupil_without_bleed(metrics: dict, cfg: CircularityConfig) -> bool:
    """The pupil-shape rules alone (a pupil found; its circularity, axis ratio and bleed within
    the thresholds): the failure VAE seeding is meant to fix, apart from iris and quality rules."""
    return bool(metrics["pupil_found"]) and passes_rules(metrics, cfg, PUPIL_SHAPE_METRICS)
