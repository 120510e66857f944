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
from pipeline.data.synthetic import generate_irises

MIN_CIRCULARITY = 0.9
MIN_AXIS_RATIO = 0.85
MAX_BLEED = 0.02
DIVERSITY_TOLERANCE = 0.2  # priors' spread of pupil radius and pupil/iris ratio within 20 % of the training images'
REFERENCE_SEED = 12345  # training-style images measured beside the priors
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
    """The images through the project's full check (`pipeline.check.analyze`, default thresholds):
    the round-pupil-without-bleed rule and all rules, with Wilson 95 % intervals, the first failed
    rule, and the spread (standard deviation) of the pupil radius and the pupil/iris ratio."""
    from pipeline.check.analyze import analyze_batch
    from pipeline.check.rules import round_pupil_without_bleed
    from pipeline.check.stats import wilson_interval
    from pipeline.common.config import CircularityConfig

    cfg = CircularityConfig()
    rows = analyze_batch(images, cfg)
    n, pupil_ok, passed = len(rows), sum(round_pupil_without_bleed(r, cfg) for r in rows), sum(r["pass"] for r in rows)
    reasons = Counter(r["reason"].split(" ")[0] if r["reason"] else "pass" for r in rows)

    def spread(key: str) -> float:
        values = np.array([r[key] for r in rows], np.float64)
        return float(np.std(values[np.isfinite(values)])) if np.isfinite(values).sum() > 1 else float("nan")

    return {"n": n, "round_pupil_no_bleed_rate": pupil_ok / n, "round_pupil_no_bleed_ci95": wilson_interval(pupil_ok, n),
            "pass_rate_all_rules": passed / n, "all_rules_ci95": wilson_interval(passed, n),
            "first_failed_rule": dict(reasons.most_common()),
            "pupil_r_std_px": spread("pupil_r"), "pupil_iris_ratio_std": spread("pupil_iris_ratio")}


def calibrate(n: int, size: int, channels: int) -> dict:
    """The measure on clean training-style images and on labelled defects (per defect kind)."""
    clean, _ = generate_irises(n, size, seed=REFERENCE_SEED, channels=channels)
    bad, records = generate_irises(n, size, seed=54321, channels=channels, defects=1.0)
    per_kind: dict[str, list[bool]] = {}
    for img, rec in zip(bad, records, strict=True):
        per_kind.setdefault(str(rec["defect"]), []).append(measure_pupil(img)["passed"])
    clean_summary = summarise(clean)
    clean_summary.pop("failures")
    return {"clean": clean_summary, "clean_circularity_check": circularity_check(clean),
            "defect_pass_rate": {k: float(np.mean(v)) for k, v in sorted(per_kind.items())},
            "defect_counts": dict(Counter(str(r["defect"]) for r in records))}


def diversity(priors: dict, training: dict) -> dict:
    """Spread of the priors over the spread of the training images (1 = as diverse), and whether
    both lie within DIVERSITY_TOLERANCE of 1."""
    ratios = {key: priors[key] / training[key] for key in ("pupil_r_std_px", "pupil_iris_ratio_std")}
    return {**ratios, "within_tolerance": all(abs(r - 1) <= DIVERSITY_TOLERANCE for r in ratios.values())}


def measure_route(vae_path: str, size: int | None, n: int, seed: int, temperature: float,
                  references: dict[int, dict]) -> dict:
    """One route: priors of the VAE at `vae_path`, resized to `size` (as `generate` does), measured."""
    from pipeline.common.resize import fit_priors
    from vae.priors import load_vae, sample_priors, vae_image_shape

    vae = load_vae(vae_path)
    channels, native, _ = vae_image_shape(vae)
    size = size or native
    t0 = time.perf_counter()
    priors, resized = fit_priors(sample_priors(vae, n, seed, temperature=temperature), (channels, size, size))
    sample_s = time.perf_counter() - t0
    if size not in references:
        clean, _ = generate_irises(n, size, seed=REFERENCE_SEED, channels=channels)
        references[size] = circularity_check(clean)
    check = circularity_check(priors)
    return {"vae": str(vae_path), "route": f"{native} px VAE" + (f" resized to {size} px ({resized['method']})"
                                                                  if size != native else ""),
            "image_shape": [channels, size, size], "seed": seed, "temperature": temperature, "sampling_s": sample_s,
            "circularity_check": check, "training_images": references[size],
            "diversity_vs_training": diversity(check, references[size]),
            "own_rule": summarise(priors), "priors": priors}


def markdown_rows(results: list[dict]) -> str:
    """One Markdown table row per route (the README's table)."""
    def pct(rate: float, ci: list[float]) -> str:
        return f"{100 * rate:.1f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"

    head = ("| route | N | round pupil, no bleed (check) | all rules (check) | training images: round / all "
            "| spread vs training: pupil r / ratio | own looser rule |\n|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        c, t, d = r["circularity_check"], r["training_images"], r["diversity_vs_training"]
        rows.append(f"| {r['route']} | {c['n']} | {pct(c['round_pupil_no_bleed_rate'], c['round_pupil_no_bleed_ci95'])} "
                    f"| {pct(c['pass_rate_all_rules'], c['all_rules_ci95'])} "
                    f"| {100 * t['round_pupil_no_bleed_rate']:.1f}% / {100 * t['pass_rate_all_rules']:.1f}% "
                    f"| {d['pupil_r_std_px']:.2f}x / {d['pupil_iris_ratio_std']:.2f}x "
                    f"| {100 * r['own_rule']['pass_rate']:.1f}% |")
    return "\n".join([head, *rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, action="append",
                        help="a .keras VAE written by train-vae; repeat to measure several routes")
    parser.add_argument("--size", type=int, action="append",
                        help="resize each VAE's priors to this size first, as generate does for a larger "
                             "diffusion model (one per --vae, or one for all; default: the VAE's own size)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--calibrate", type=int, default=0, metavar="N")
    parser.add_argument("--grid", help="also write the first route's priors as a grid PNG here")
    parser.add_argument("--json", help="write the results here (also printed)")
    parser.add_argument("--markdown", help="write the routes as a Markdown table here")
    args = parser.parse_args()
    sizes = args.size or [None]
    if len(sizes) not in (1, len(args.vae)):
        parser.error("give --size once, or once per --vae")
    sizes = sizes * len(args.vae) if len(sizes) == 1 else sizes

    from results_io import machine_facts

    from pipeline.common.images import make_grid, write_image

    references: dict[int, dict] = {}
    results = [measure_route(path, size, args.n, args.seed, args.temperature, references)
               for path, size in zip(args.vae, sizes, strict=True)]
    if args.grid:
        write_image(args.grid, make_grid(results[0]["priors"][:64]))
    for r in results:
        del r["priors"]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_facts(), "routes": results,
              "headline_rule": "circularity-check's round_pupil_without_bleed: pupil found, circularity >= 0.90, "
                               "axis ratio >= 0.85, bleed <= 1 % (configs/circularity.yaml)",
              "own_rule": f"this script's looser measure: found, circularity >= {MIN_CIRCULARITY}, axis ratio >= "
                          f"{MIN_AXIS_RATIO}, bleed <= {MAX_BLEED}, single dark blob"}
    if args.calibrate:
        size = results[0]["image_shape"][1]
        result["calibration"] = calibrate(args.calibrate, size, results[0]["image_shape"][0])
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_rows(results))
    print(text)
    print(markdown_rows(results))


if __name__ == "__main__":
    main()
