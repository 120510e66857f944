"""Speed of identity-check at 128×128: iris codes per second, and Hamming comparisons per second.

    python benchmarks/bench_identity.py [--quick]

N synthetic eyes (400; 150 with --quick) are written as PNGs to a temp folder. Measured:
  code_only     `code_image` on decoded images in this process: wall and CPU ms per image;
  folder        `code_set` on the folder (find, decode, code; the process pool for 2 workers,
                including its start-up) for workers = 1 and 2: wall images/s of the first call (the
                fork server starting) and best/median of the calls after it;
  pairwise      `pairwise_hamming` at the default grid (16, 256) and identity.max_shift (±8): the
                N codes against themselves (N(N − 1)/2 pairs) and against another N codes (N² pairs,
                as for the nearest training image): pairs per second, best of the repeats.
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

from pipeline.check.hamming import pairwise_hamming
from pipeline.check.iris_code import DEFAULT_GRID, IrisCode, code_image
from pipeline.common.config import CircularityConfig, IdentityConfig
from pipeline.common.images import to_unit, write_image
from pipeline.data.synthetic import generate_irises
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
    return out


def _timed(func) -> float:
    t = time.perf_counter()
    func()
    return time.perf_counter() - t


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
    result = {"benchmark": "identity-check at 128x128", "quick": args.quick, "code_only": alone,
              "folder": folders, "pairwise": pairs}
    one, two = folders
    result["headline"] = [
        headline(f"iris codes, folder of {n} images (128 px), 2 workers, calls after the first",
                 f"{two['best_images_per_s']:.0f} best, {two['median_images_per_s']:.0f} median images/s"),
        headline("1 worker; `code_image` alone",
                 f"{one['median_images_per_s']:.0f} images/s; {alone['cpu_ms_per_image']:.2f} CPU-ms/image"),
        headline(f"pairwise_hamming, {DEFAULT_GRID[0]}x{DEFAULT_GRID[1]} codes, ±{max_shift} shifts, 1 core",
                 f"{pairs['self']['pairs_per_s']:,} pairs/s ({len(codes)} vs themselves); "
                 f"{pairs['a_vs_b']['pairs_per_s']:,} pairs/s (a vs b)"),
    ]
    result["machine"] = machine_facts()
    write_result(RESULTS, result)


if __name__ == "__main__":
    main()
