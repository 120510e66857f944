"""Real-frame readiness: the checker's accuracy on the built-in 128 px eyes and on synthetic
640x480 camera frames, and `prepare-data`'s speed and crops on a folder of such frames.

    python benchmarks/bench_prepare.py [--quick] [--frames N] [--workers 2] [--figure PNG]

Measured (truth from the generators: `pipeline.data.synthetic`, `pipeline.data.synthetic_frames`):
  eyes_128   200 good built-in eyes and 60 of each defect (seed 1, as tests/test_circularity.py):
             mean pupil/iris centre error (px) and radius error (%), good eyes passing, defects
             failing, and defects failing for the rule that names them.
  frames     N frames (70 % good, 20 % occluded, 10 % cut; seed 11; N in --quick too: 40 frames
             hold ~4 cut ones, too few for a mean error against 0.05): on the frames whose eye is
             found, mean centre and radius errors of the good ones; per kind, the usable iris area
             error (mean |measured − truth| ± its standard error, and bias) over the frames whose
             limbus was found right (within 2 px and 3 %: the area is measured inside it) and over
             all found, and the margin adequacy error.
  prepare    the same frames (40 with --quick) as BMP files through `prepare-data` (1 and N workers): frames/s, kept
             and rejected by reason per group of frames (cut, or by true usable iris area: the
             default limit is 0.5), and on the kept good crops the iris centre's distance from the
             crop centre (% of the side) and its radius against size/(2·margin).
JSON to stdout and benchmarks/results/bench_prepare.json, with the machine's facts.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from results_io import headline, machine_facts, write_result

from pipeline.check.analyze import analyze_image, analyze_with_geometry
from pipeline.check.folder import draw_overlay
from pipeline.common.config import CircularityConfig, PrepareConfig, load_config
from pipeline.common.images import to_unit, write_image_uint
from pipeline.data.synthetic import generate_irises
from pipeline.data.synthetic_frames import FRAME_KINDS, iter_frames, render_frame, write_frames
from pipeline.prepare import Rejected, prepare_frame

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
        pairs = [(m, r) for m, r in found if r["kind"] == kind]
        if not pairs:
            continue
        right = [(m, r) for m, r in pairs if _iris_right(m, r)]
        err = np.array([m["usable_iris_area"] - r["usable_iris_area"] for m, r in pairs])
        err_right = np.array([m["usable_iris_area"] - r["usable_iris_area"] for m, r in right])
        margin = np.array([m["margin_adequacy"] - r["margin_adequacy"] for m, r in pairs])
        out[f"usable_area_{kind}"] = {
            "n": len(pairs), "mean_abs_error": round(float(np.mean(np.abs(err))), 4), "bias": round(float(np.mean(err)), 4),
            "iris_right": len(right), "mean_abs_error_iris_right": round(float(np.mean(np.abs(err_right))), 4),
            "standard_error_iris_right": round(float(np.std(np.abs(err_right), ddof=1) / math.sqrt(len(right))), 4)
            if len(right) > 1 else None,
            "margin_adequacy_mean_abs_error": round(float(np.mean(np.abs(margin))), 4)}
    return out


def _iris_right(m: dict, r: dict) -> bool:
    """The limbus circle found within 2 px and 3 % of the truth (the usable area is measured in it)."""
    return math.hypot(m["iris_cx"] - r["iris_cx"], m["iris_cy"] - r["iris_cy"]) < 2 and abs(m["iris_r"] / r["iris_r"] - 1) < 0.03


def _crop_errors(labels: list[dict], truth: dict[str, dict], size: int, margin: float) -> dict:
    """On kept crops of good frames: the true iris centre's distance from the crop centre (% of the
    side) and the true iris radius against size / (2 · margin) (%), the truth mapped into the crop
    with the label's box and scale."""
    centre, radius = [], []
    for lab in labels:
        rec = truth[Path(lab["source"]).name]
        if rec["kind"] != "good":
            continue
        left, top, scale = lab["crop_box"][0], lab["crop_box"][1], lab["scale"]
        x, y = (rec["iris_cx"] - left + 0.5) * scale - 0.5, (rec["iris_cy"] - top + 0.5) * scale - 0.5
        centre.append(100 * math.hypot(x - (size - 1) / 2, y - (size - 1) / 2) / size)
        radius.append(100 * abs(rec["iris_r"] * scale / (size / (2 * margin)) - 1))
    return {"n": len(centre), "iris_centre_off_pct_of_side": {"mean": round(float(np.mean(centre)), 3), "max": round(float(np.max(centre)), 3)},
            "iris_radius_error_pct": {"mean": round(float(np.mean(radius)), 3), "max": round(float(np.max(radius)), 3)}}


VERDICT_GROUPS = ("usable ≥ 0.6", "usable 0.4–0.6", "usable < 0.4", "cut")


def _verdict_group(rec: dict) -> str:
    """A frame's group by its truth: cut by the frame's edge, else its true usable iris area."""
    if rec["kind"] == "cut":
        return "cut"
    usable = rec["usable_iris_area"]
    return VERDICT_GROUPS[0] if usable >= 0.6 else VERDICT_GROUPS[1] if usable >= 0.4 else VERDICT_GROUPS[2]


def prepare_speed(n: int, workers: list[int], size: int = 128) -> dict:
    """`prepare-data` on n BMP frames (640x480): wall frames/s per worker count, reasons by kind of
    frame, and the crops' placement."""
    out: dict = {"n": n, "size": size}
    with tempfile.TemporaryDirectory() as tmp:
        src = write_frames(Path(tmp, "frames"), n, 480, 640, seed=11, kinds=FRAME_SHARES, fmt="bmp")
        truth = {rec["file"]: rec for rec in json.loads((src / "labels.json").read_text())}
        (src / "labels.json").unlink()  # the frames only: prepare-data must find everything itself
        for w in workers:
            dest = Path(tmp, f"prepared_{w}")
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline.cli.prepare_data", str(src), str(dest), "--size", str(size),
                            "--workers", str(w)], check=True, capture_output=True)
            seconds = time.perf_counter() - start
            out[f"workers_{w}"] = {"seconds": round(seconds, 2), "frames_per_second": round(n / seconds, 1)}
        summary = json.loads((dest / "summary.json").read_text())
        labels = json.loads((dest / "labels.json").read_text())
        with open(dest / "rejects.csv", newline="") as f:
            rejects = list(csv.DictReader(f))
        verdicts: dict[str, Counter] = {group: Counter() for group in VERDICT_GROUPS}
        for name, verdict in [(Path(lab["source"]).name, "kept") for lab in labels] + \
                             [(Path(row["file"]).name, row["reason"]) for row in rejects]:
            verdicts[_verdict_group(truth[name])][verdict] += 1
        out["verdicts_by_truth"] = {group: dict(c) for group, c in verdicts.items()}
        out["margin"] = summary["config"]["margin"]
        out["crops"] = _crop_errors(labels, truth, size, out["margin"])
    return out


def write_figure(path: Path, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """Frames (a good, an occluded and a cut one per seed row) with the boundaries the checker found,
    each beside its prepared crop or the reason it was turned away."""
    cfg, circularity = PrepareConfig(), CircularityConfig()
    rows = []
    for seed in seeds:
        tiles = []
        for kind in FRAME_KINDS:
            frame, _ = render_frame(np.random.default_rng([40, seed]), 480, 640, kind)
            metrics, geometry = analyze_with_geometry(frame, circularity)
            tiles.append(cv2.resize(draw_overlay(frame, metrics, geometry), (240, 180), interpolation=cv2.INTER_AREA))
            crop = np.full((180, 180, 3), 255, np.uint8)
            try:
                image, _ = prepare_frame(frame, cfg, circularity)
                crop[26:154, 26:154] = image[0][:, :, None]
            except Rejected as exc:
                cv2.putText(crop, exc.reason, (8, 95), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (200, 0, 0), 1, cv2.LINE_AA)
            tiles.append(crop)
        rows.append(np.hstack(tiles))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image_uint(path, np.vstack(rows))


def _headlines(result: dict) -> list[dict]:
    eyes, frames, prep = result["eyes_128"], result["frames"], result["prepare"]
    good = frames["good"]
    usable = {k: frames[f"usable_area_{k}"] for k in ("good", "occluded", "cut") if f"usable_area_{k}" in frames}
    failed = sum(eyes[f"{d}_failed"] for d in DEFECT_RULES)
    defects = len(DEFECT_RULES) * eyes["per_defect"]
    rates = sorted((int(k.split("_")[1]), v["frames_per_second"]) for k, v in prep.items() if k.startswith("workers_"))
    speed = " / ".join(f"{rate:.1f}" for _, rate in rates) + " frames/s with " + " / ".join(str(w) for w, _ in rates) \
        + " workers" + (f": {rates[-1][1] / rates[0][1]:.2f}x the 1-worker rate (same run)" if len(rates) > 1 else "")
    return [
        headline(f"checker on {eyes['n']} built-in 128 px eyes: pupil / iris centre error",
                 f"{eyes['pupil_centre_px']:.3f} / {eyes['iris_centre_px']:.3f} px", "≤ 0.1 / ≤ 0.2 px",
                 eyes["pupil_centre_px"] <= 0.1 and eyes["iris_centre_px"] <= 0.2),
        headline("checker on 128 px eyes: good pass, defects caught",
                 f"{eyes['good_pass']}/{eyes['n']} pass, {failed}/{defects} defects fail", "≥ 99 %, ≥ 95 %",
                 eyes["good_pass"] >= 0.99 * eyes["n"] and failed >= 0.95 * defects),
        headline(f"checker on {good['n']} good 640x480 frames: pupil / iris centre, radii",
                 f"{good['pupil_centre_px']:.2f} / {good['iris_centre_px']:.2f} px, {good['pupil_radius_pct']:.2f} / "
                 f"{good['iris_radius_pct']:.2f} %", "< 1 / < 2 px, < 3 %",
                 good["pupil_centre_px"] < 1 and good["iris_centre_px"] < 2 and max(good["pupil_radius_pct"], good["iris_radius_pct"]) < 3),
        headline("usable iris area error where the limbus was found right (good / occluded / cut frames)",
                 " / ".join(f"{v['mean_abs_error_iris_right']:.3f}" + (f" ± {v['standard_error_iris_right']:.3f}"
                                                                         if v["standard_error_iris_right"] is not None else "")
                            for v in usable.values()) + " (mean ± standard error)", "< 0.05",
                 all(v["mean_abs_error_iris_right"] < 0.05 for v in usable.values())),
        headline("… limbus found right / found; usable area error over all found",
                 " / ".join(f"{v['iris_right']}/{v['n']}" for v in usable.values()) + "; "
                 + " / ".join(f"{v['mean_abs_error']:.3f}" for v in usable.values()), "", None),
        headline("prepare-data on 640x480 BMP frames, whole command", speed, "", None),
        headline("prepared crops (good frames): iris centre off the crop centre, radius error",
                 f"{prep['crops']['iris_centre_off_pct_of_side']['max']:.2f} % of the side (max), "
                 f"{prep['crops']['iris_radius_error_pct']['max']:.2f} % (max)", "< 2 %, < 3 %",
                 prep["crops"]["iris_centre_off_pct_of_side"]["max"] < 2 and prep["crops"]["iris_radius_error_pct"]["max"] < 3),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    parser.add_argument("--frames", type=int, default=200, help="synthetic 640x480 frames (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="prepare-data workers besides 1 (default 2)")
    parser.add_argument("--figure", type=Path, metavar="PNG", help="also draw frames, boundaries and crops here")
    args = parser.parse_args()
    if args.figure:
        write_figure(args.figure)
    cfg = load_config(None).circularity
    n = 40 if args.quick else args.frames  # prepare-data's folder; the checker's accuracy always takes --frames
    eyes = eyes_128(cfg, 20 if args.quick else 200, 6 if args.quick else 60)
    eyes["n"] = 20 if args.quick else 200
    result = {"benchmark": "bench_prepare", "date": time.strftime("%Y-%m-%d"), "machine": machine_facts(),
              "eyes_128": eyes, "frames": frames_accuracy(cfg, args.frames),
              "prepare": prepare_speed(n, sorted({1, args.workers}))}
    result["headline"] = _headlines(result)
    write_result(RESULTS, result)


if __name__ == "__main__":
    main()
