"""What a folder check reports: the summary (counts, pass rate, statistics, failure reasons), the
results CSV, the worst-images sheet, the histograms, the console table and, against a reference
folder, the distribution distances."""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.check.folder import draw_overlay, read_image
from pipeline.check.rules import (
    METRICS,
    NO_IRIS,
    NO_PUPIL,
    Rule,
    round_pupil_without_bleed,
    rules_from_config,
)
from pipeline.common.config import CircularityConfig

if TYPE_CHECKING:
    from pipeline.check.inception import InceptionFeatures

PLOT_METRICS = (
    "pupil_circularity", "pupil_axis_ratio", "pupil_radial_dev", "bleed_fraction", "concentricity",
    "iris_circularity", "pupil_iris_ratio", "pupil_r", "iris_r", "iris_pupil_contrast",
    "iris_sclera_contrast", "grey_utilisation", "sharpness", "usable_iris_area", "margin_adequacy",
)
TABLE_METRICS = ("pupil_circularity", "pupil_axis_ratio", "pupil_radial_dev", "bleed_fraction",
                 "concentricity", "iris_circularity", "pupil_iris_ratio", "usable_iris_area")
WORST_COUNT = 24


def failure_key(reason: str) -> str:
    """What a failure is counted under: the rule's metric, or the detection failure."""
    return reason if reason in (NO_PUPIL, NO_IRIS) else reason.split(" ")[0]


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    a = a[np.isfinite(a)]
    if not a.size:
        return {"n": 0, "mean": None, "median": None, "p5": None, "p95": None}
    p5, med, p95 = np.percentile(a, [5, 50, 95])
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(med), "p5": float(p5), "p95": float(p95)}


def summarize(folder: Path, rows: list[dict], unreadable: list[dict], cfg: CircularityConfig) -> dict:
    """Counts, pass rate, per-metric statistics and failure reasons (the summary.json content)."""
    n = len(rows)
    passed = sum(bool(r["pass"]) for r in rows)
    round_pupil = sum(round_pupil_without_bleed(r, cfg) for r in rows)
    reasons: dict[str, int] = {}
    for r in rows:
        if not r["pass"]:
            key = failure_key(r["reason"])
            reasons[key] = reasons.get(key, 0) + 1
    numeric = [m for m in METRICS if m not in ("pupil_found", "iris_found")]
    return {
        "folder": str(folder),
        "n_files": n + len(unreadable),
        "n_analysed": n,
        "n_unreadable": len(unreadable),
        "unreadable": unreadable,
        "n_pass": passed,
        "n_fail": n - passed,
        "pass_rate": passed / n if n else 0.0,
        "n_round_pupil": round_pupil,
        "round_pupil_rate": round_pupil / n if n else 0.0,
        "pupil_found_rate": sum(bool(r["pupil_found"]) for r in rows) / n if n else 0.0,
        "iris_found_rate": sum(bool(r["iris_found"]) for r in rows) / n if n else 0.0,
        "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "metrics": {m: _stats([r[m] for r in rows]) for m in numeric},
        "rules": [{"metric": r.metric, "kind": r.kind, "threshold": r.threshold} for r in rules_from_config(cfg)],
    }


def write_csv(rows: list[dict], path: Path) -> None:
    """results.csv: file, width, height, pass, reason, then every metric (NaN → empty)."""
    columns = ["file", "width", "height", "pass", "reason", *METRICS]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if isinstance(r[c], float) and not math.isfinite(r[c])
                             else f"{r[c]:.6g}" if isinstance(r[c], float) else r[c] for c in columns])


def _badness(row: dict, rules: tuple[Rule, ...]) -> float:
    """How far an image is from passing `rules` (largest relative violation; detection failures worst)."""
    if not row["pupil_found"]:
        return math.inf
    if not row["iris_found"]:
        return 1e9
    worst = -math.inf
    for rule in rules:
        v = row[rule.metric]
        if not math.isfinite(v):
            return 1e8
        excess = (rule.threshold - v) if rule.kind == "min" else (v - rule.threshold)
        worst = max(worst, excess / max(abs(rule.threshold), 1e-6))
    return worst


def worst_rows(cfg: CircularityConfig) -> tuple[int, Callable[[dict], float]]:
    """`analyze_folder`'s `worst` argument for the worst-cases sheet: how many, and how bad a row is."""
    return WORST_COUNT, functools.partial(_badness, rules=rules_from_config(cfg))


def write_worst_sheet(folder: Path, rows: list[dict], cfg: CircularityConfig, path: Path) -> None:
    """Contact sheet of the images furthest from passing, with their boundaries drawn (the rows that
    kept them: `analyze_folder(..., worst=worst_rows(cfg))`)."""
    from pipeline.check.plots import contact_sheet

    _, badness = worst_rows(cfg)
    worst = sorted((r for r in rows if "_geometry" in r), key=lambda r: -badness(r))
    tiles = [draw_overlay(read_image(folder / r["file"]), r, r["_geometry"]) for r in worst]
    captions = [f"{r['file'][-28:]}\n{r['reason'] or 'pass'}" for r in worst]
    contact_sheet(tiles, captions, path, title=f"{folder.name}: {len(worst)} worst of {len(rows)}")


def plot_groups(groups: dict[str, list[dict]], path: Path, cfg: CircularityConfig, title: str) -> None:
    """Histograms of `PLOT_METRICS`, one colour per group of rows, with the rules' thresholds."""
    from pipeline.check.plots import plot_histograms

    thresholds: dict[str, list[float]] = {}
    for rule in rules_from_config(cfg):
        thresholds.setdefault(rule.metric, []).append(rule.threshold)
    data = {label: {m: [r[m] for r in rows] for m in PLOT_METRICS} for label, rows in groups.items()}
    plot_histograms(data, path, PLOT_METRICS, thresholds, title=title)


def fmt_value(v: object) -> str:
    """A table cell: 4 significant digits for floats, '-' for None and non-finite values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def text_table(labels: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """Right-aligned columns under `labels`, one line per (name, values) row."""
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'':24s}" + "".join(f"{label[:width]:>{width + 2}s}" for label in labels)]
    lines += [f"{name:24s}" + "".join(f"{v:>{width + 2}s}" for v in values) for name, values in rows]
    return "\n".join(lines)


def console_table(summaries: list[tuple[str, dict]]) -> str:
    """A few lines: counts, pass rate, key medians, top failure reasons, one column per folder."""
    rows = [
        ("images (unreadable)", [f"{s['n_analysed']} ({s['n_unreadable']})" for _, s in summaries]),
        ("pass rate", [f"{100 * s['pass_rate']:.1f}%" for _, s in summaries]),
        ("round pupil, no bleed", [f"{100 * s['round_pupil_rate']:.1f}%" for _, s in summaries]),
        ("pupil / iris found", [f"{100 * s['pupil_found_rate']:.0f}% / {100 * s['iris_found_rate']:.0f}%"
                                for _, s in summaries]),
        *((f"median {m}", [fmt_value(s["metrics"][m]["median"]) for _, s in summaries]) for m in TABLE_METRICS),
    ]
    lines = [text_table([label for label, _ in summaries], rows)]
    for label, s in summaries:
        top = ", ".join(f"{k} {v}" for k, v in list(s["failure_reasons"].items())[:4]) or "none"
        lines.append(f"failures ({label}): {top}")
    return "\n".join(lines)


def distances(rows_a: list[dict], rows_b: list[dict], folder_a: Path, folder_b: Path,
              inception: InceptionFeatures | None) -> dict:
    """Proxy FD/KID always; FID/KID on Inception-v3 features (clean-fid) when `inception` is given."""
    from pipeline.check.metrics import PROXY_NOTE, fid_from_features, kid

    out: dict = {}
    fa = np.array([r["_features"] for r in rows_a])
    fb = np.array([r["_features"] for r in rows_b])
    if min(len(fa), len(fb)) >= 2:
        mean, std = kid(fa, fb, subsets=100, subset_size=1000)
        out.update(proxy_fd=fid_from_features(fa, fb), proxy_kid_mean=mean, proxy_kid_std=std, proxy_note=PROXY_NOTE)
    if inception is not None:
        ia = inception.from_files([folder_a / r["file"] for r in rows_a])
        ib = inception.from_files([folder_b / r["file"] for r in rows_b])
        mean, std = kid(ia, ib, subsets=100, subset_size=1000)
        out.update(fid=fid_from_features(ia, ib), kid_mean=mean, kid_std=std, features=inception.label,
                   inception_weights=str(inception.weights))
    return out
