"""Real-frame readiness: the checker's accuracy on the built-in 128 px eyes and on synthetic
640x480 camera frames, and `prepare-data`'s speed and crops on a folder of such frames.

    python benchmarks/bench_prepare.py [--quick] [--frames N] [--workers 2]

Measured (truth from the generators: `pipeline.data.synthetic`, `pipeline.data.synthetic_frames`):
  eyes_128   200 good built-in eyes and 60 of each defect (seed 1, as tests/test_circularity.py):
             mean pupil/iris centre error (px) and radius error (%), good eyes passing, defects
             failing, and defects failing for the rule that names them.
  frames     N frames (70 % good, 20 % occluded, 10 % cut; seed 11): on the frames whose eye is
             found, mean centre and radius errors of the good ones; per kind, the usable iris area
             error (mean |measured − truth|, and bias) and the margin adequacy error.
  prepare    the same frames as BMP files through `prepare-data` (1 and N workers): frames/s, kept
             and rejected by reason per kind of frame, and on the kept good crops the iris centre's
             distance from the crop centre (% of the side) and its radius against size/(2·margin).
JSON to stdout and benchmarks/results/bench_prepare.json, with the machine's facts.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from results_io import headline, machine_facts, write_result

from pipeline.check.analyze import analyze_image
from pipeline.common.config import CircularityConfig, load_config
from pipeline.common.images import to_unit
from pipeline.data.synthetic import generate_irises
from pipeline.data.synthetic_frames import iter_frames, write_frames

RESULTS = Path(__file__).parent / "results" / "bench_prepare.json"
DEFECT_RULES = {"bleed": ("bleed_fraction",), "irregular": ("pupil_circularity", "pupil_radial_dev"),
                "oval": ("pupil_axis_ratio", "pupil_circularity"), "offcenter": ("concentricity",)}
FRAME_SHARES = (0.2, 0.1)  # occluded, cut


def _geometry_errors(pairs: list[tuple[dict, dict]]) -> dict:
    """Mean centre errors (px) and relative radius errors (%) of measured vs true circles."""
    def mean(f) -> float:
        return round(float(np.mean([f(m, r) for m, r in pairs])), 4)

    return {"n": len(pairs),
            "pupil_centre_px": mean(lambda m, r: math.hypot(m["pupil_cx"] - r["pupil_cx"], m["pupil_cy"] - r["pupil_cy"])),
            "pupil_radius_pct": mean(lambda m, r: 100 * abs(m["pupil_r"] - r["pupil_r"]) / r["pupil_r"]),
            "iris_centre_px": mean(lambda m, r: math.hypot(m["iris_cx"] - r["iris_cx"], m["iris_cy"] - r["iris_cy"])),
            "iris_radius_pct": mean(lambda m, r: 100 * abs(m["iris_r"] - r["iris_r"]) / r["iris_r"])}


def eyes_128(cfg: CircularityConfig, good: int, per_defect: int) -> dict:
    """Accuracy and verdicts on the built-in 128 px eyes."""
    kinds = [None] * good + [d for d in DEFECT_RULES for _ in range(per_defect)]
    images, records = generate_irises(len(kinds), 128, seed=1, defects=kinds)
    results = [(analyze_image(to_unit(img[0]), cfg), rec) for img, rec in zip(images, records, strict=True)]
    good_pairs = [(m, r) for m, r in results if r["defect"] is None and m["pupil_found"] and m["iris_found"]]
    out = {"good_found": len(good_pairs), **_geometry_errors(good_pairs),
           "good_pass": sum(m["pass"] for m, r in results if r["defect"] is None)}
    for defect, rules in DEFECT_RULES.items():
        found = [m for m, r in results if r["defect"] == defect]
        out[f"{defect}_failed"] = sum(not m["pass"] for m in found)
        out[f"{defect}_named"] = sum(m["reason"].split(" ")[0] in rules for m in found)
    out["per_defect"] = per_defect
    return out


def frames_accuracy(cfg: CircularityConfig, n: int) -> dict:
    """Checker accuracy on synthetic 640x480 frames, and its usable-area and margin errors by kind."""
    results = [(analyze_image(frame, cfg), rec) for frame, rec in iter_frames(n, 480, 640, seed=11, kinds=FRAME_SHARES)]
    found = [(m, r) for m, r in results if m["pupil_found"] and m["iris_found"]]
    out = {"n": n, "found": len(found), "good": _geometry_errors([(m, r) for m, r in found if r["kind"] == "good"])}
    for kind in ("good", "occluded", "cut"):
        err = np.array([m["usable_iris_area"] - r["usable_iris_area"] for m, r in found if r["kind"] == kind])
        margin = np.array([m["margin_adequacy"] - r["margin_adequacy"] for m, r in found if r["kind"] == kind])
        if len(err):
            out[f"usable_area_{kind}"] = {"n": len(err), "mean_abs_error": round(float(np.mean(np.abs(err))), 4),
                                          "bias": round(float(np.mean(err)), 4),
                                          "margin_adequacy_mean_abs_error": round(float(np.mean(np.abs(margin))), 4)}
    return out
