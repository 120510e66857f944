"""Same-process A/B of circularity-check's analysis (`analyze_image`), passes alternating:

    python benchmarks/circularity_analysis_ab.py code BEFORE_CHECKOUT [--passes 20]
        the code of an earlier checkout against this tree's, both with freed memory kept;
    python benchmarks/circularity_analysis_ab.py allocator [--passes 10]
        this tree's code with glibc's static defaults (mmap from 128 KiB, trim above 128 KiB)
        against `keep_freed_memory` (what the workers set).

CPU-ms per image (process time) over 400 synthetic 128 px eyes (seed 0, 30 % defects) per pass;
prints the medians, their ratio and the median of the per-pass-pair ratios (a VM's speed drifts
between passes: only the pairs are like for like). glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import sys
import time
from pathlib import Path

import cv2
import numpy as np

AFTER = Path(__file__).resolve().parents[1]


def load(root: Path):
    """`analyze_image` and a default config from the `pipeline` package under `root`."""
    for name in [k for k in sys.modules if k == "pipeline" or k.startswith("pipeline.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        analyze = importlib.import_module("pipeline.check.analyze")
        config = importlib.import_module("pipeline.common.config")
    finally:
        sys.path.remove(str(root))
    assert Path(analyze.__file__).is_relative_to(root), analyze.__file__
    return analyze.analyze_image, config.CircularityConfig()


def cpu_ms(analyze, cfg, grey: list[np.ndarray]) -> float:
    start = time.process_time()
    for g in grey:
        analyze(g, cfg)
    return (time.process_time() - start) / len(grey) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("code", "allocator"))
    parser.add_argument("before", nargs="?", help="checkout of the earlier code (for `code`)")
    parser.add_argument("--passes", type=int, default=None)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    sys.path.insert(0, str(AFTER))
    from pipeline.common.images import to_unit
    from pipeline.common.pool import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
    from pipeline.data.synthetic import generate_irises

    images, _ = generate_irises(400, 128, seed=0, defects=0.3)
    grey = [to_unit(img[0]) for img in images]
    mallopt = ctypes.CDLL(None).mallopt
    if args.what == "code":
        keep_freed_memory()
        variants = {"before": load(Path(args.before).resolve()), "after": load(AFTER)}
        setting = {"before": lambda: None, "after": lambda: None}
    else:
        variants = {"defaults": load(AFTER), "kept": load(AFTER)}
        setting = {"defaults": lambda: (mallopt(M_MMAP_THRESHOLD, 128 << 10), mallopt(M_TRIM_THRESHOLD, 128 << 10)),
                   "kept": keep_freed_memory}
    a, b = variants
    for name in variants:
        cpu_ms(*variants[name], grey[:30])  # warm-up
    times: dict[str, list[float]] = {a: [], b: []}
    passes = args.passes or (20 if args.what == "code" else 10)
    for i in range(passes):
        for name in (a, b) if i % 2 == 0 else (b, a):
            setting[name]()
            times[name].append(cpu_ms(*variants[name], grey))
    ta, tb = np.array(times[a]), np.array(times[b])
    print(f"{args.what}: {a} median {np.median(ta):.3f} CPU-ms/image, {b} median {np.median(tb):.3f}; "
          f"ratio of medians {np.median(tb) / np.median(ta):.3f}; per-pair ratios median {np.median(tb / ta):.3f} "
          f"(min {np.min(tb / ta):.3f}, max {np.max(tb / ta):.3f}); {passes} passes of {len(grey)} images each")


if __name__ == "__main__":
    main()
