"""Speed of the circularity check at 128×128: analysis alone, and whole folders with 1 and 2 workers.

    python benchmarks/bench_circularity.py [--quick] [--count N] [--out FILE]

Synthetic eyes (30 % with defects, like a poor sample folder) are written as PNGs to a temp folder.
Measured:
  one_shot              the whole `circularity-check DIR --workers 2` command in a fresh interpreter,
                        as a user runs it (the headline; target ≥ 300 images/s on 2 cores), and
                        how its time splits: measuring (summary.json's seconds) and the rest;
  analyze_ms_per_image  `analyze_image` on decoded images in this process (wall and CPU time), with
                        the allocator setting the workers use (`keep_freed_memory`);
  folder                `analyze_folder` (find, decode, analyse; the process pool for 2 workers,
                        including its start-up) for workers = 1 and 2: wall images/s of the first
                        call (the fork server starting) and best/median of the calls after it, and
                        for 1 worker images per CPU-second (× cores ≈ an idle machine's ceiling).
JSON to stdout and to benchmarks/results/bench_circularity.json, with the load average (the
numbers are only as good as the machine is quiet).

The one-shot calls run with Python's bytecode cache on, as a user's Python runs (this project's CI
machines set PYTHONDONTWRITEBYTECODE, which would recompile the project's modules on every call,
~0.07 s in the command and again in its worker server).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from results_io import headline, machine_facts, write_result

from pipeline.check.analyze import analyze_image
from pipeline.check.folder import analyze_folder
from pipeline.common.config import CircularityConfig
from pipeline.common.images import to_unit, write_image
from pipeline.common.pool import keep_freed_memory
from pipeline.data.synthetic import generate_irises

RESULTS = Path(__file__).parent / "results" / "bench_circularity.json"
REPO = Path(__file__).resolve().parents[1]
ONE_SHOT_CALLS = 5  # the headline is their median: a VM's speed can drift by a quarter within minutes


def analyze_only(images: np.ndarray, cfg: CircularityConfig, repeats: int) -> dict:
    """Median per-image wall and CPU milliseconds of `analyze_image` over `repeats` passes."""
    grey = [to_unit(img[0]) for img in images]
    for g in grey[:5]:
        analyze_image(g, cfg)  # warm caches
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for g in grey:
            analyze_image(g, cfg)
        wall.append((time.perf_counter() - t) / len(grey) * 1e3)
        cpu.append((time.process_time() - c) / len(grey) * 1e3)
    return {"n": len(grey), "wall_ms_per_image": round(float(np.median(wall)), 3),
            "cpu_ms_per_image": round(float(np.median(cpu)), 3)}


def one_shot(folder: Path, workers: int, repeats: int) -> dict:
    """What a user's call costs: the whole `circularity-check DIR --workers N` command in a fresh
    interpreter (start-up, imports, the pool, results.csv, summary, plots), `repeats` times; and,
    from each call's summary.json, the seconds it spent measuring (finding, decoding and analysing
    the images in its pool, the pool's start included) against the rest of the command. One call
    before them is not counted (as in any benchmark's warm-up: the files' page cache, and this VM's
    cores, which run faster a few seconds into a load than straight from idle)."""
    rates, measuring, rest = [], [], []
    n = len(list(folder.iterdir()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # see the module docstring
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pipeline.cli.circularity_check", str(folder), "--out", f"{tmp}/out",
               "--workers", str(workers), "--overwrite"]
        call = functools.partial(subprocess.run, cmd, check=True, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, cwd=REPO, env=env)
        call()  # warm-up (and the bytecode cache written)
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            wall = time.perf_counter() - t
            seconds = json.loads(Path(tmp, "out", "summary.json").read_text())["seconds"]
            rates.append(n / wall)
            measuring.append(n / seconds)
            rest.append(wall - seconds)
    return {"workers": workers, "calls": repeats, "median_images_per_s": round(float(np.median(rates)), 1),
            "best_images_per_s": round(max(rates), 1), "worst_images_per_s": round(min(rates), 1),
            "measuring_median_images_per_s": round(float(np.median(measuring)), 1),
            "rest_of_command_median_s": round(float(np.median(rest)), 3)}


def folder_speed(folder: Path, cfg: CircularityConfig, workers: int, repeats: int) -> dict:
    """Wall images/s of `analyze_folder` with `workers` processes: the first call (which starts
    the fork server) apart, then best and median of `repeats` more. Inline (1 worker) also
    images per CPU-second of this process, which other load on the machine disturbs less."""
    rates, per_cpu = [], []
    for _ in range(repeats + 1):
        t, c = time.perf_counter(), time.process_time()
        rows, _ = analyze_folder(folder, cfg, workers)
        rates.append(len(rows) / (time.perf_counter() - t))
        per_cpu.append(len(rows) / (time.process_time() - c))
    out = {"workers": workers, "images": len(rows), "first_call_images_per_s": round(rates[0], 1),
           "best_images_per_s": round(max(rates[1:]), 1), "median_images_per_s": round(float(np.median(rates[1:])), 1)}
    if workers == 1:
        out["images_per_cpu_s"] = round(float(np.median(per_cpu[1:])), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--count", type=int, default=1000, help="images in the folder (default 1000)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    keep_freed_memory()  # as in the workers (and inline runs) of `analyze_folder`
    n, repeats = args.count, 2 if args.quick else 5  # a folder of 1000: the pool's start-up amortised as in use
    cfg = CircularityConfig()
    images, _ = generate_irises(n, 128, seed=0, defects=0.3)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "eyes"
        folder.mkdir()
        for i, img in enumerate(images):
            write_image(folder / f"{i:05d}.png", img)
        result = {
            "benchmark": "circularity-check at 128x128",
            "quick": args.quick,
            "analyze_only": analyze_only(images, cfg, repeats),
            "one_shot": one_shot(folder, 2, ONE_SHOT_CALLS),
            "folder": [folder_speed(folder, cfg, w, repeats) for w in (1, 2)],
            "target_images_per_s_2_workers": 300,
        }
    two, one, alone, shot = result["folder"][1], result["folder"][0], result["analyze_only"], result["one_shot"]
    result["headline"] = [
        headline(f"`circularity-check` on a folder of {n} images (128 px), 2 workers, the whole command "
                 f"(median of {shot['calls']} calls after a warm-up call)", f"{shot['median_images_per_s']:.0f} images/s",
                 "≥ 300 images/s", shot["median_images_per_s"] >= 300),
        headline("the same calls: measuring (the pool's start included) / the rest of the command (start-up, "
                 "imports, writing the outputs, exit)",
                 f"{shot['measuring_median_images_per_s']:.0f} images/s / {shot['rest_of_command_median_s']:.2f} s "
                 "(medians)"),
        headline("the same folder through `analyze_folder` in a warm process, calls after the first",
                 f"{two['best_images_per_s']:.0f} best, {two['median_images_per_s']:.0f} median images/s"),
        headline("the same, first call (fork server starting)", f"{two['first_call_images_per_s']:.0f} images/s"),
        headline("1 worker; `analyze_image` alone",
                 f"{one['median_images_per_s']:.0f} images/s; {alone['cpu_ms_per_image']:.2f} CPU-ms/image"),
    ]
    result["machine"] = {
        **machine_facts(), "cores_usable": len(os.sched_getaffinity(0)),  # (machine_facts: CPU, flags, cores, Python)
        "load_average_1min_before": round(load_before, 2), "load_average_1min_after": round(os.getloadavg()[0], 2),
        "numpy": np.__version__, "opencv": cv2.__version__,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
