"""Speed of identity-check at 128×128: iris codes per second, and Hamming comparisons per second.

    python benchmarks/bench_identity.py [--quick]

N synthetic eyes (400; 150 with --quick) are written as PNGs to a temp folder. Measured:
  code_only     `code_image` on decoded images in this process: wall and CPU ms per image;
  folder        `code_set` on the folder (find, decode, code; the process pool for 2 workers,
                including its start-up) for workers = 1 and 2: wall images/s of the first call (the
                fork server starting) and best/median of the calls after it;
  pairwise      `pairwise_hamming` at the default grid (16, 256) and identity.max_shift (±8): the
                N codes against themselves (N(N − 1)/2 pairs) and against another N codes (N² pairs,
                as for the nearest training image): pairs per second, best of the repeats, and
                as the baseline in the same run `hamming_distance` one pair at a time (the 780
                pairs of the first 40 codes), with the ratio;
  separation    200 synthetic identities x 4 captures (50 with --quick; pipeline.data.synthetic_identities):
                genuine and impostor raw HDs at ±16 shifts, the impostors' degrees of freedom and
                the equal error rate (target ≤ 1 %).
JSON to stdout and to benchmarks/results/bench_identity.json, with the machine's facts (the
numbers are only as good as the machine is quiet).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from results_io import headline, machine_facts, write_result

from pipeline.check.hamming import (
    degrees_of_freedom,
    equal_error_rate,
    genuine_and_impostor,
    hamming_distance,
    pairwise_hamming,
)
from pipeline.check.iris_code import DEFAULT_GRID, IrisCode, code_image
from pipeline.common.config import CircularityConfig, IdentityConfig
from pipeline.common.images import to_unit, write_image
from pipeline.data.synthetic import generate_irises
from pipeline.data.synthetic_identities import iter_identities
from pipeline.identity import code_set, open_set

RESULTS = Path(__file__).parent / "results" / "bench_identity.json"


def code_only(images: np.ndarray, cfg: CircularityConfig, repeats: int) -> tuple[dict, list[IrisCode]]:
    """Median per-image wall and CPU milliseconds of `code_image`, and the usable codes."""
    grey = [to_unit(img[0]) for img in images]
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        codes = [code_image(g, cfg)[0] for g in grey]
        wall.append((time.perf_counter() - t) / len(grey) * 1e3)
        cpu.append((time.process_time() - c) / len(grey) * 1e3)
    usable = [code for code in codes if code is not None]
    return {"n": len(grey), "usable": len(usable), "wall_ms_per_image": round(float(np.median(wall)), 3),
            "cpu_ms_per_image": round(float(np.median(cpu)), 3)}, usable


def folder_speed(folder: Path, circularity: CircularityConfig, workers: int, repeats: int) -> dict:
    """Wall images/s of `code_set` on a folder with `workers` processes: the first call apart, then
    best and median of `repeats` more."""
    cfg = IdentityConfig(workers=workers)
    images = open_set("generated", folder)
    rates = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        coded = code_set(images, cfg, circularity)
        rates.append(len(coded.rows) / (time.perf_counter() - t))
    return {"workers": workers, "images": len(coded.rows), "first_call_images_per_s": round(rates[0], 1),
            "best_images_per_s": round(max(rates[1:]), 1), "median_images_per_s": round(float(np.median(rates[1:])), 1)}


def pairwise_speed(codes: list[IrisCode], max_shift: int, repeats: int) -> dict:
    """Pairs per second of `pairwise_hamming`: the codes against themselves, and the first half
    against the second (as the nearest training search does), best of `repeats`."""
    half = len(codes) // 2
    out = {"codes": len(codes), "max_shift": max_shift, "grid": list(DEFAULT_GRID)}
    for name, a, b, pairs in (("self", codes, None, len(codes) * (len(codes) - 1) // 2),
                              ("a_vs_b", codes[:half], codes[half:], half * (len(codes) - half))):
        best = min(_timed(lambda a=a, b=b: pairwise_hamming(a, b, max_shift)) for _ in range(repeats))
        out[name] = {"pairs": pairs, "seconds": round(best, 3), "pairs_per_s": round(pairs / best)}
    # Baseline in the same run: one pair at a time (`hamming_distance`), on the first 40 codes' pairs.
    sample = [(a, b) for i, a in enumerate(codes[:40]) for b in codes[i + 1 : 40]]
    best = min(_timed(lambda: [hamming_distance(a, b, max_shift) for a, b in sample]) for _ in range(repeats))
    out["one_pair_at_a_time"] = {"pairs": len(sample), "seconds": round(best, 3), "pairs_per_s": round(len(sample) / best)}
    out["speedup_over_one_pair_at_a_time"] = round(out["self"]["pairs_per_s"] / out["one_pair_at_a_time"]["pairs_per_s"], 1)
    return out


def _timed(func) -> float:
    t = time.perf_counter()
    func()
    return time.perf_counter() - t


SEPARATION_SHIFT = 16  # two captures turn by up to ±10° each: ±16 of 256 angular samples (±22.5°) cover it


def separation(circularity: CircularityConfig, identities: int, captures: int) -> dict:
    """Genuine (captures of one synthetic eye) against impostor (different eyes) raw HDs: means,
    Daugman's degrees of freedom of the impostors and the equal error rate."""
    codes, ids = [], []
    for img, rec in iter_identities(identities, captures, 128, seed=5):
        code, _ = code_image(to_unit(img[0]), circularity)
        if code is not None:
            codes.append(code)
            ids.append(rec["identity"])
    hd, _ = pairwise_hamming(codes, None, SEPARATION_SHIFT)
    genuine, impostor = genuine_and_impostor(hd, np.array(ids))
    eer, threshold = equal_error_rate(genuine, impostor)
    return {"identities": identities, "captures": captures, "coded": len(codes), "max_shift": SEPARATION_SHIFT,
            "genuine_mean": float(np.nanmean(genuine)), "genuine_max": float(np.nanmax(genuine)),
            "impostor_mean": float(np.nanmean(impostor)), "impostor_min": float(np.nanmin(impostor)),
            "impostor_dof": degrees_of_freedom(impostor), "eer": eer, "eer_threshold": threshold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer eyes and repeats")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    n, repeats = (150, 1) if args.quick else (400, 3)
    circularity, max_shift = CircularityConfig(), IdentityConfig().max_shift
    images, _ = generate_irises(n, 128, seed=0)
    alone, codes = code_only(images, circularity, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "eyes"
        folder.mkdir()
        for i, img in enumerate(images):
            write_image(folder / f"{i:05d}.png", img)
        folders = [folder_speed(folder, circularity, w, repeats) for w in (1, 2)]
    pairs = pairwise_speed(codes, max_shift, repeats)
    result = {"benchmark": "identity-check at 128x128", "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
              "code_only": alone, "folder": folders, "pairwise": pairs,
              "separation": separation(circularity, 50 if args.quick else 200, 4)}
    one, two = folders
    result["headline"] = [
        headline(f"iris codes, folder of {n} images (128 px), 2 workers, calls after the first",
                 f"{two['best_images_per_s']:.0f} best, {two['median_images_per_s']:.0f} median images/s: "
                 f"{two['median_images_per_s'] / one['median_images_per_s']:.2f}x 1 worker's median (same run)"),
        headline("1 worker; `code_image` alone",
                 f"{one['median_images_per_s']:.0f} images/s; {alone['cpu_ms_per_image']:.2f} CPU-ms/image"),
        headline(f"pairwise_hamming, {DEFAULT_GRID[0]}x{DEFAULT_GRID[1]} codes, ±{max_shift} shifts, 1 core",
                 f"{pairs['self']['pairs_per_s']:,} pairs/s ({len(codes)} vs themselves); "
                 f"{pairs['a_vs_b']['pairs_per_s']:,} pairs/s (a vs b); {pairs['speedup_over_one_pair_at_a_time']}x "
                 f"hamming_distance one pair at a time ({pairs['one_pair_at_a_time']['pairs_per_s']:,} pairs/s, same run)"),
    ]
    sep = result["separation"]
    result["headline"].append(headline(
        f"synthetic identities, {sep['identities']} eyes x {sep['captures']} captures: genuine / impostor mean HD, EER",
        f"{sep['genuine_mean']:.3f} / {sep['impostor_mean']:.3f}, EER {100 * sep['eer']:.2f} %", "EER ≤ 1 %",
        sep["eer"] <= 0.01))
    result["machine"] = machine_facts()
    write_result(RESULTS, result)


if __name__ == "__main__":
    main()
