"""`prepare-data`: real near-infrared frames → iris-centred training crops, their labels and a cache
the trainers load in one read.

Per frame (any size, 8/16-bit, grey or RGB, the eye anywhere in it), in this order; the first step
that fails is the frame's reject reason:
  unreadable         the file does not decode as an 8/16-bit image
  too small          its shorter side is below `prepare.min_frame_side` (64 px: below that the
                     measurement has too few pixels per pupil, and real frames are 240 px or more)
  no pupil           circularity-check's measurement (`analyze_with_geometry`) finds no dark pupil
  no limbus          … finds the pupil but no iris boundary around it, or one no eye has: its
                     centre farther from the pupil's than `circularity.max_concentricity` iris radii,
                     or the pupil/iris ratio outside the circularity limits (most often the limbus
                     hidden by lids and edges of lids or lashes fitted instead)
  iris cut by frame  more than `prepare.max_iris_outside` of the iris disk's area lies outside the
                     frame (`disk_outside_fraction`)
  occluded           the measured `usable_iris_area` (unoccluded share of the iris annulus) is below
                     `prepare.min_usable_iris_area`; a frame without that figure (NaN) is kept
Kept frames are cropped to a square of side 2 · margin · iris radius centred on the iris
(`pipeline.data.iris_crop`: reflect padding where it leaves the frame, area averaging / bicubic to
`prepare.size`, channels converted) and numbered in the sorted order of their files, so the output
does not depend on the number of workers.

The output folder (built in a temp folder beside it and renamed when complete):
  images/000000.png …  the crops, 16-bit where the frame was 16-bit, else 8-bit
  labels.json          one dict per crop (LABEL_KEYS): circles in the crop's pixels, the crop box,
                       scale and padding in the frame's, the quality figures
  rejects.csv          file, reason, detail for every frame not kept
  dataset.npz          images + labels + settings in one file (`pipeline.data.prepared`)
  summary.json         counts, rejects by reason, seconds, frames per second, settings
When no frame is kept, only rejects.csv and summary.json are written (the caller reports it).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.check.analyze import analyze_with_geometry
from pipeline.check.folder import find_images
from pipeline.check.rules import IRIS_PLACE_METRICS, passes_rules
from pipeline.common.config import CircularityConfig, PrepareConfig
from pipeline.common.errors import UserError
from pipeline.common.images import write_image_uint
from pipeline.common.pool import chunked_map, resolve_workers
from pipeline.data.folders import decode_image
from pipeline.data.iris_crop import crop_box, disk_outside_fraction, to_crop, training_crop
from pipeline.data.prepared import CACHE_NAME, write_cache

log = logging.getLogger(__name__)

REASONS = ("unreadable", "too small", "no pupil", "no limbus", "iris cut by frame", "occluded")
QUALITY = ("usable_iris_area", "margin_adequacy")  # circularity-check figures copied into the labels when finite
LABEL_KEYS = (
    "file",             # the crop, relative to the output folder
    "source",           # the frame, relative to the source folder
    "frame_size",       # [width, height] of the frame
    "bits",             # 8 or 16: the frame's (and the PNG's) bit depth
    "pupil", "iris",    # [cx, cy, r] in the crop's pixels (x = column, pixel (0, 0)'s centre at 0.0)
    "crop_box",         # [left, top, right, bottom] in the frame's pixels, right/bottom exclusive; may pass the frame
    "scale",            # crop pixels per frame pixel
    "padding",          # {left, top, right, bottom}: pixels of the box beyond the frame, reflect-padded
    "padded_fraction",  # share of the crop's area that is padding
    "iris_outside",     # share of the iris disk's area outside the frame
)


def check_settings(cfg: PrepareConfig) -> None:
    """UserError for settings no frame could be prepared with."""
    if cfg.size < 8:
        raise UserError(f"prepare.size must be >= 8, got {cfg.size}")
    if not cfg.margin >= 1.0:
        raise UserError(f"prepare.margin must be >= 1 (the crop holds the whole iris), got {cfg.margin}")
    if cfg.channels not in (1, 3):
        raise UserError(f"prepare.channels must be 1 or 3, got {cfg.channels}")
    if cfg.min_frame_side < 16:
        raise UserError(f"prepare.min_frame_side must be >= 16 (the measurement's own minimum), got {cfg.min_frame_side}")
    for key in ("max_iris_outside", "min_usable_iris_area"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise UserError(f"prepare.{key} is a fraction between 0 and 1, got {getattr(cfg, key)}")
    resolve_workers(cfg.workers)


class Rejected(Exception):
    """A frame not kept: its `reason` (one of REASONS) and a detail for rejects.csv."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _judge(metrics: dict, width: int, height: int, cfg: PrepareConfig, circularity: CircularityConfig) -> float:
    """The share of the iris outside the frame, or `Rejected` when the measured frame is not to be kept."""
    if not metrics["pupil_found"]:
        raise Rejected("no pupil", "no dark pupil region")
    if not metrics["iris_found"]:
        raise Rejected("no limbus", f"no iris boundary around the pupil at ({metrics['pupil_cx']:.1f}, "
                                    f"{metrics['pupil_cy']:.1f}), r {metrics['pupil_r']:.1f}")
    if not passes_rules(metrics, circularity, IRIS_PLACE_METRICS):
        raise Rejected("no limbus", f"implausible iris boundary: centre {metrics['concentricity']:.2f} iris radii "
                                    f"from the pupil's, pupil/iris ratio {metrics['pupil_iris_ratio']:.2f}")
    outside = disk_outside_fraction(metrics["iris_cx"], metrics["iris_cy"], metrics["iris_r"], width, height)
    if outside > cfg.max_iris_outside:
        raise Rejected("iris cut by frame", f"{100 * outside:.1f}% of the iris disk is outside the frame "
                                            f"(max {100 * cfg.max_iris_outside:g}%)")
    usable = float(metrics.get("usable_iris_area", math.nan))
    if usable < cfg.min_usable_iris_area:  # NaN (not measured) compares False: kept
        raise Rejected("occluded", f"usable iris area {usable:.3f} < {cfg.min_usable_iris_area:g}")
    return outside


def prepare_frame(img: np.ndarray, cfg: PrepareConfig, circularity: CircularityConfig) -> tuple[np.ndarray, dict]:
    """One decoded frame (HW/HWC uint8/uint16) → its crop ((C, size, size), the frame's dtype) and
    label (without file and source); `Rejected` when it is not to be kept."""
    height, width = img.shape[:2]
    if min(height, width) < cfg.min_frame_side:
        raise Rejected("too small", f"{width}x{height}: the shorter side is below {cfg.min_frame_side} px")
    metrics, _ = analyze_with_geometry(img, circularity)
    outside = _judge(metrics, width, height, cfg, circularity)
    pupil = tuple(float(metrics[f"pupil_{k}"]) for k in ("cx", "cy", "r"))
    iris = tuple(float(metrics[f"iris_{k}"]) for k in ("cx", "cy", "r"))
    box = crop_box(*iris, cfg.margin)
    label = {
        "frame_size": [width, height], "bits": 16 if img.dtype == np.uint16 else 8,
        "pupil": to_crop(pupil, box, cfg.size), "iris": to_crop(iris, box, cfg.size),
        "crop_box": [box.left, box.top, box.left + box.side, box.top + box.side],
        "scale": cfg.size / box.side, "padding": box.padding(width, height),
        "padded_fraction": box.padded_fraction(width, height), "iris_outside": outside,
    }
    label.update({k: float(metrics[k]) for k in QUALITY if math.isfinite(metrics.get(k, math.nan))})
    return training_crop(img, box, cfg.size, cfg.channels), label


def _work(task: tuple[Path, str], cfg: PrepareConfig, circularity: CircularityConfig) -> dict:
    """One file (path, name relative to the source): {file, image, label}, or {file, reason, detail}."""
    path, rel = task
    try:
        img = decode_image(path)
    except UserError as exc:
        return {"file": rel, "reason": "unreadable", "detail": str(exc)}
    try:
        image, label = prepare_frame(img, cfg, circularity)
    except Rejected as exc:
        return {"file": rel, "reason": exc.reason, "detail": exc.detail}
    return {"file": rel, "image": image, "label": label}


def _write_rejects(path: Path, rejects: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "reason", "detail"])
        writer.writeheader()
        writer.writerows(rejects)


def _write_dataset(tmp: Path, images: list[np.ndarray], labels: list[dict], cfg: PrepareConfig) -> None:
    """labels.json and dataset.npz (uint16 when any crop is, 8-bit ones scaled by 257: exact)."""
    (tmp / "labels.json").write_text(json.dumps(labels, indent=1))
    wide = any(img.dtype == np.uint16 for img in images)
    stack = np.stack([img.astype(np.uint16) * np.uint16(257) if wide and img.dtype == np.uint8 else img
                      for img in images])
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}  # no effect on the output
    write_cache(tmp / CACHE_NAME, stack, labels, settings)


def prepare_folder(src: Path, tmp: Path, cfg: PrepareConfig, circularity: CircularityConfig,
                   exclude: tuple[Path, ...] = ()) -> dict:
    """Prepare every image under `src` into the (empty, existing) folder `tmp`; return the summary
    (also written as summary.json). UserError when `src` is missing, not a folder or has no images.

    With more than one worker the processes come from a fork server, which imports the caller's main
    module: scripts calling this need the usual `if __name__ == "__main__":` guard."""
    check_settings(cfg)
    workers = resolve_workers(cfg.workers)
    start = time.perf_counter()
    files = find_images(src, exclude)
    tasks = [(p, p.relative_to(src).as_posix()) for p in files]
    log.info("preparing %d frames from %s (%d worker%s)", len(tasks), src, workers, "s" * (workers > 1))
    images: list[np.ndarray] = []
    labels: list[dict] = []
    rejects: list[dict] = []
    work = functools.partial(_work, cfg=cfg, circularity=circularity)
    with tqdm(total=len(tasks), unit="frame", desc=f"preparing {src.name or src}", disable=None, leave=False) as bar:
        for results in chunked_map(work, tasks, workers, preload=("pipeline.prepare",)):
            for r in results:
                if "image" not in r:
                    rejects.append(r)
                    continue
                name = f"images/{len(images):06d}.png"
                if not images:
                    (tmp / "images").mkdir()
                write_image_uint(tmp / name, np.transpose(r["image"], (1, 2, 0)))
                images.append(r["image"])
                labels.append({"file": name, "source": r["file"], **r["label"]})
            bar.update(len(results))
    _write_rejects(tmp / "rejects.csv", rejects)
    if images:
        _write_dataset(tmp, images, labels, cfg)
    seconds = time.perf_counter() - start
    summary = {
        "source": str(src), "frames": len(tasks), "kept": len(images), "rejected": len(rejects),
        "rejects": {reason: sum(r["reason"] == reason for r in rejects) for reason in REASONS},
        "bits": None if not images else max(label["bits"] for label in labels),
        "seconds": seconds, "frames_per_second": len(tasks) / seconds if seconds > 0 else None,
        "workers": workers, "config": dataclasses.asdict(cfg),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_line(summary: dict) -> str:
    """'kept N of M frames; rejected: no pupil 3, occluded 2; 12.3 s (41 frames/s)'."""
    counts = ", ".join(f"{reason} {n}" for reason, n in summary["rejects"].items() if n) or "none"
    rate = summary["frames_per_second"]
    speed = f" ({rate:.0f} frames/s)" if rate else ""
    return f"kept {summary['kept']} of {summary['frames']} frames; rejected: {counts}; {summary['seconds']:.1f} s{speed}"
