"""Prior quality of a trained VAE: what share of sampled priors has a single round pupil without bleed?

A self-contained measure (threshold + contour, NumPy/OpenCV), so it does not depend on the full
circularity check:
  1. threshold halfway between the darkest 1 % of the image and its median grey;
  2. pupil = the largest dark 8-connected component whose centroid lies within 0.35·size of the
     image centre (holes, e.g. glints, filled);
  3. circularity = 4πA/P² of the boundary polygon, divided by the same value for a rasterised
     perfect disc of equal area (pixel-grid correction: a rasterised circle scores 1);
  4. bleed = share of dark pixels, outside the pupil, in a ring just outside the pupil's
     equivalent circle (from 1.25·r + 1 px, width max(2 px, 0.6·r));
  5. single = no other dark component of ≥ max(4 px, 10 % of the pupil) within 2.5·r.
Pass: pupil found, circularity ≥ 0.9, bleed ≤ 0.02, single.

The priors also go through the project's full check (`pipeline.check.analyze`, thresholds of
`configs/circularity.yaml` defaults), reported beside this measure.

`--calibrate N` also runs the measure on N training images (should nearly all pass) and on N
images with labelled defects (bleed / irregular / oval should mostly fail), and reports both.

    python benchmarks/vae_prior_quality.py --vae runs/vae/vae.keras --n 200 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.images import from_uint, to_uint8

MIN_CIRCULARITY = 0.9
MIN_AXIS_RATIO = 0.85
MAX_BLEED = 0.02
NOT_FOUND = {"found": False, "circularity": 0.0, "axis_ratio": 0.0, "bleed": 1.0, "single": False, "passed": False}


def _raw_circularity(mask: np.ndarray) -> float:
    """4πA/P² of the outer boundary polygon (through boundary pixel centres) of a binary mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    area, perimeter = cv2.contourArea(contour), cv2.arcLength(contour, True)
    return 4.0 * math.pi * area / perimeter**2 if perimeter > 0 else 0.0


@functools.lru_cache(maxsize=512)
def _disc_circularity(radius_q: int) -> float:
    """Mean raw circularity of rasterised discs of radius radius_q/4 px over a few sub-pixel offsets."""
    r = radius_q / 4.0
    size = int(2 * r + 8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    values = []
    for dx, dy in ((0.0, 0.0), (0.25, 0.5), (0.5, 0.25), (0.37, 0.11)):
        c = size / 2 + 0.5
        values.append(_raw_circularity((xx - c - dx) ** 2 + (yy - c - dy) ** 2 <= r * r))
    return float(np.mean(values))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with enclosed background (holes) filled."""
    padded = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    cv2.floodFill(padded, None, (0, 0), 2)
    return mask | (padded[1:-1, 1:-1] == 1)


def _central_blob(mask: np.ndarray) -> tuple[tuple[float, float], float] | None:
    """Centre (x, y) and equivalent radius of the most compact-and-large blob near the image centre."""
    size = mask.shape[0]
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    centre = np.array([(size - 1) / 2, (size - 1) / 2])
    near = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= 5
            and np.linalg.norm(centroids[k] - centre) <= 0.35 * size]
    if not near:
        return None
    k = max(near, key=lambda j: stats[j, cv2.CC_STAT_AREA] * _raw_circularity(labels == j) ** 2)
    return (float(centroids[k][0]), float(centroids[k][1])), math.sqrt(stats[k, cv2.CC_STAT_AREA] / math.pi)


def measure_pupil(image: np.ndarray) -> dict:
    """Pupil facts of one (C, H, W) image in [-1, 1]: found, circularity, axis ratio, bleed, single, passed."""
    raw = (image.mean(axis=0) if image.ndim == 3 else image).astype(np.float32)
    grey = cv2.GaussianBlur(raw, (0, 0), 0.7)
    size = grey.shape[0]
    lo, mid = np.percentile(grey, [1, 50])
    found = _central_blob(grey < lo + 0.25 * (mid - lo))  # pass 1: the dark core, to find the levels
    if found is None:
        return dict(NOT_FOUND)
    (cx, cy), r0 = found
    dist = np.hypot(*np.mgrid[0:size, 0:size][::-1] - np.array([cx, cy])[:, None, None])
    iris_ring = (dist >= 1.2 * r0 + 1.5) & (dist < 1.2 * r0 + 1.5 + max(2.0, 0.3 * r0))
    iris_level = np.median(grey[iris_ring])
    # specular glints on or near the pupil: inpaint them so they neither punch holes nor notches
    glints = (raw > iris_level + 0.5 * (raw.max() - iris_level)) & (dist <= 1.5 * r0 + 2)
    if glints.any():
        glints = cv2.dilate(glints.astype(np.uint8), np.ones((3, 3), np.uint8))
        grey = cv2.GaussianBlur(from_uint(cv2.inpaint(to_uint8(raw), glints, 2, cv2.INPAINT_TELEA)), (0, 0), 0.7)
    pupil_level = np.median(grey[dist <= 0.7 * r0]) if (dist <= 0.7 * r0).any() else lo
    dark = grey < 0.5 * (pupil_level + iris_level)  # pass 2: half-way between the levels
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(dark.astype(np.uint8), connectivity=8)
    if n <= 1:
        return dict(NOT_FOUND)
    k = labels[min(size - 1, int(round(cy))), min(size - 1, int(round(cx)))]
    if k == 0:
        k = max(range(1, n), key=lambda j: stats[j, cv2.CC_STAT_AREA] / (1 + np.hypot(*(centroids[j] - (cx, cy)))))
    pupil = _fill_holes(labels == k)
    area = int(pupil.sum())
    r = math.sqrt(area / math.pi)
    circ = _raw_circularity(pupil) / _disc_circularity(max(4, round(4 * r)))
    m = cv2.moments(pupil.astype(np.uint8), binaryImage=True)
    eig = np.linalg.eigvalsh(np.array([[m["mu20"], m["mu11"]], [m["mu11"], m["mu02"]]]))
    axis_ratio = math.sqrt(max(eig[0], 0.0) / eig[1]) if eig[1] > 0 else 0.0  # second-moment ellipse
    cy, cx = np.argwhere(pupil).mean(axis=0)
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy - cy, xx - cx)
    inner = 1.25 * r + 1.0
    ring = (dist >= inner) & (dist < inner + max(2.0, 0.6 * r))
    # bleed: dark pixels in the ring that belong to the pupil or to dark blobs touching it
    grown = cv2.dilate(pupil.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    touching = np.isin(labels, np.unique(labels[grown & dark]))
    bleed = float((dark & touching & ring).sum() / max(1, ring.sum()))
    others = [j for j in range(1, n) if j != k and stats[j, cv2.CC_STAT_AREA] >= max(6, 0.15 * area)
              and np.hypot(*(centroids[j] - (cx, cy))) <= 2.5 * r and _raw_circularity(labels == j) >= 0.5]
    single = not others
    passed = circ >= MIN_CIRCULARITY and axis_ratio >= MIN_AXIS_RATIO and bleed <= MAX_BLEED and single
    return {"found": True, "circularity": float(circ), "axis_ratio": float(axis_ratio), "bleed": bleed,
            "single": single, "radius": r, "passed": bool(passed)}


def summarise(images: np.ndarray) -> dict:
    """Pass rate and the distribution of the per-image measures."""
    rows = [measure_pupil(img) for img in images]
    circ = np.array([r["circularity"] for r in rows])
    return {
        "n": len(rows),
        "pass_rate": float(np.mean([r["passed"] for r in rows])),
        "found_rate": float(np.mean([r["found"] for r in rows])),
        "round_rate": float(np.mean(circ >= MIN_CIRCULARITY)),
        "axis_ratio_ok_rate": float(np.mean([r["axis_ratio"] >= MIN_AXIS_RATIO for r in rows])),
        "no_bleed_rate": float(np.mean([r["bleed"] <= MAX_BLEED for r in rows])),
        "single_rate": float(np.mean([r["single"] for r in rows])),
        "circularity_median": float(np.median(circ)),
        "circularity_p05": float(np.percentile(circ, 5)),
        "failures": [i for i, r in enumerate(rows) if not r["passed"]],
    }


def circularity_check(images: np.ndarray) -> dict:
    """The same images through the project's full check (`pipeline.check.analyze`, default thresholds)."""
    from pipeline.check.analyze import analyze_batch
    from pipeline.check.rules import round_pupil_without_bleed
    from pipeline.common.config import CircularityConfig

    cfg = CircularityConfig()
    rows = analyze_batch(images, cfg)
    pupil_ok = [round_pupil_without_bleed(r, cfg) for r in rows]
    reasons = Counter(r["reason"].split(" ")[0] if r["reason"] else "pass" for r in rows)
    return {"pass_rate_all_rules": float(np.mean([r["pass"] for r in rows])),
            "round_pupil_no_bleed_rate": float(np.mean(pupil_ok)),
            "first_failed_rule": dict(reasons.most_common())}


def calibrate(n: int, size: int, channels: int) -> dict:
    """The measure on clean training-style images and on labelled defects (per defect kind)."""
    from pipeline.data.synthetic import generate_irises

    clean, _ = generate_irises(n, size, seed=12345, channels=channels)
    bad, records = generate_irises(n, size, seed=54321, channels=channels, defects=1.0)
    per_kind: dict[str, list[bool]] = {}
    for img, rec in zip(bad, records, strict=True):
        per_kind.setdefault(str(rec["defect"]), []).append(measure_pupil(img)["passed"])
    clean_summary = summarise(clean)
    clean_summary.pop("failures")
    return {"clean": clean_summary, "clean_circularity_check": circularity_check(clean),
            "defect_pass_rate": {k: float(np.mean(v)) for k, v in sorted(per_kind.items())},
            "defect_counts": dict(Counter(str(r["defect"]) for r in records))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="a .keras VAE written by train-vae")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--calibrate", type=int, default=0, metavar="N")
    parser.add_argument("--grid", help="also write the priors as a grid PNG here")
    parser.add_argument("--json", help="write the results here (also printed)")
    args = parser.parse_args()

    from pipeline.common.images import make_grid, write_png
    from vae.priors import load_vae, sample_priors, vae_image_shape

    vae = load_vae(args.vae)
    channels, size, _ = vae_image_shape(vae)
    t0 = time.perf_counter()
    priors = sample_priors(vae, args.n, args.seed, temperature=args.temperature)
    sample_s = time.perf_counter() - t0
    result = {"vae": str(args.vae), "image_shape": [channels, size, size], "seed": args.seed,
              "temperature": args.temperature, "sampling_s": sample_s, "priors": summarise(priors),
              "circularity_check": circularity_check(priors),
              "rule": f"found, circularity >= {MIN_CIRCULARITY}, axis ratio >= {MIN_AXIS_RATIO}, bleed <= {MAX_BLEED}, single dark blob"}
    if args.calibrate:
        result["calibration"] = calibrate(args.calibrate, size, channels)
    if args.grid:
        write_png(args.grid, make_grid(priors[:64]))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
