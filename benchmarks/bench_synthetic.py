"""Speed of the procedural iris generator: images per second on one core at 64 and 128 px.

    python benchmarks/bench_synthetic.py [--quick]

Prints JSON and writes benchmarks/results/bench_synthetic.json: wall-clock images/s (best and
median of several repeats) and images per CPU-second of this process, which other processes on a
busy machine disturb less; the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np
from results_io import headline, write_result

from pipeline.data.synthetic import generate_irises

RESULTS = Path(__file__).parent / "results" / "bench_synthetic.json"


def images_per_second(n: int, size: int, defects: float, repeats: int) -> dict:
    """Best and median throughput of `generate_irises(n, size)` over `repeats` runs."""
    generate_irises(4, size, seed=1)  # warm caches (grids, noise bank)
    wall, cpu = [], []
    for r in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        generate_irises(n, size, seed=r, defects=defects)
        wall.append(n / (time.perf_counter() - start))
        cpu.append(n / (time.process_time() - start_cpu))
    return {"size": size, "n": n, "defects": defects,
            "best_images_per_s": round(max(wall), 1), "median_images_per_s": round(float(np.median(wall)), 1),
            "images_per_cpu_s": round(float(np.median(cpu)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core
    n, repeats = (60, 3) if args.quick else (300, 5)
    runs = [images_per_second(n, size, defects, repeats) for size in (64, 128) for defects in (0.0, 0.3)]
    result = {
        "benchmark": "synthetic irises, images/s on one core",
        "quick": args.quick,
        "runs": runs,
        "target_images_per_s_at_128": 500,
        "headline": [headline(f"{r['size']} px, {r['defects']:.0%} defects, one core", f"{r['images_per_cpu_s']:.0f} images/CPU-s",
                              "≥ 500 images/s" if r["size"] == 128 else "", r["images_per_cpu_s"] >= 500 if r["size"] == 128 else None)
                     for r in runs],
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
                    "numpy": np.__version__, "opencv": cv2.__version__},
    }
    write_result(RESULTS, result)


if __name__ == "__main__":
    main()
