"""Measuring a folder of images: finding and decoding the files, and the worker pool that runs
`analyze_with_geometry` on them (writing each image's overlay when asked).

Images are found recursively (png, jpg, bmp, tif; hidden files and folders skipped) and measured
at their own size; 8/16-bit, grey/RGB/RGBA all work. Unreadable files are listed and skipped.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from pipeline.check import POOL_PRELOAD
from pipeline.check.analyze import Geometry, analyze_with_geometry, to_grey_uint8, to_grey_unit
from pipeline.check.rules import METRICS
from pipeline.common.config import CircularityConfig
from pipeline.common.errors import UserError
from pipeline.common.images import FORMAT_SUFFIXES, IMAGE_EXTENSIONS, write_image_uint
from pipeline.common.pool import chunked_map

log = logging.getLogger(__name__)

GENERATED_NAME = re.compile(r"\d{6}(" + "|".join(map(re.escape, FORMAT_SUFFIXES.values())) + ")")  # generate's images


def find_images(folder: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Image files under `folder` (recursive, sorted; hidden entries and `exclude` folders skipped)."""
    if not folder.exists():
        raise UserError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    if (folder / "metadata.json").is_file():  # a `generate` output: its samples, not grid.png or priors/
        found = sorted(p for p in folder.iterdir() if GENERATED_NAME.fullmatch(p.name))
        if found:
            return found
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(root, d).resolve() not in exclude)
        found += [Path(root, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    if not found:
        raise UserError(f"no images in {folder} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def read_image(path: Path) -> np.ndarray:
    """HW or HWC (RGB order) pixels exactly as stored (uint8/uint16/float); ValueError if unreadable."""
    buf = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None or img.size == 0:
        raise ValueError("cannot decode (corrupt, truncated or unsupported)")
    if img.ndim == 3 and img.shape[2] >= 3:
        img = img[:, :, 2::-1]  # BGR(A) → RGB, alpha dropped
    return np.ascontiguousarray(img)


def draw_overlay(img: np.ndarray, metrics: dict, geometry: Geometry) -> np.ndarray:
    """RGB uint8 picture of the image (enlarged to ≥ 256 px) with the traced pupil boundary and
    the fitted iris circle: green when the image passes, red when it fails."""
    grey = to_grey_uint8(img)
    f = max(1, int(math.ceil(256 / max(grey.shape))))
    rgb = cv2.cvtColor(cv2.resize(grey, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2RGB)
    colour = (40, 200, 40) if metrics["pass"] else (230, 40, 40)
    shift, unit = 4, 16 * f

    def pts(xy: np.ndarray | tuple[float, float]) -> np.ndarray:  # pixel centres → enlarged sub-pixel coordinates
        return np.round((np.asarray(xy, np.float64) + 0.5) * unit - 8).astype(np.int32)

    if len(geometry.pupil_contour):
        cv2.polylines(rgb, [pts(geometry.pupil_contour)], True, colour, 1, cv2.LINE_AA, shift)
    for cx, cy, _ in (geometry.pupil, geometry.iris):
        if math.isfinite(cx):
            cv2.drawMarker(rgb, tuple(int(v) >> shift for v in pts((cx, cy))), colour, cv2.MARKER_CROSS, 2 * f + 4, 1)
    if math.isfinite(geometry.iris[0]):
        centre = tuple(int(v) for v in pts(geometry.iris[:2]))
        cv2.circle(rgb, centre, int(round(geometry.iris[2] * unit)), colour, 1, cv2.LINE_AA, shift)
    if not metrics["pass"]:
        cv2.putText(rgb, metrics["reason"], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1, cv2.LINE_AA)
    return rgb


def _work(task: tuple[Path, str], cfg: CircularityConfig, overlay_dir: Path | None, want_features: bool,
          want_outline: bool) -> dict:
    """Measure one file (path, name in the results): its CSV row (or an `error`), writing its
    overlay when asked; with `want_outline` its boundaries (no usable-iris mask) under "_geometry"."""
    path, rel = task
    try:
        img = read_image(path)
        metrics, geometry = analyze_with_geometry(img, cfg)
    except (ValueError, OSError) as exc:
        return {"file": rel, "error": str(exc)}
    row = {"file": rel, "width": int(img.shape[1]), "height": int(img.shape[0]),
           "pass": metrics["pass"], "reason": metrics["reason"], **{k: metrics[k] for k in METRICS}}
    if overlay_dir is not None:
        out = Path(overlay_dir, rel).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_image_uint(out, draw_overlay(img, metrics, geometry))
    if want_outline:
        row["_geometry"] = Geometry(geometry.pupil_contour, geometry.pupil, geometry.iris)
    if want_features:
        from pipeline.check.metrics import proxy_features

        row["_features"] = proxy_features(to_grey_unit(img)[None, None] * 2.0 - 1.0)[0]
    return row


def analyze_folder(folder: Path, cfg: CircularityConfig, workers: int, overlay_dir: Path | None = None,
                   want_features: bool = False, exclude: tuple[Path, ...] = (),
                   worst: tuple[int, Callable[[dict], float]] | None = None) -> tuple[list[dict], list[dict]]:
    """Rows for every readable image under `folder`, and {file, error} for the unreadable ones.

    With `worst` = (k, badness) the k rows of highest badness keep their boundaries under "_geometry"
    (a `Geometry` without the usable-iris mask), so that a sheet of them needs no second
    measurement; the other rows drop theirs as they arrive (memory stays bounded).

    With workers > 1 the processes come from a fork server, which imports the caller's main module:
    scripts calling this need the usual `if __name__ == "__main__":` guard."""
    from tqdm import tqdm  # here: the workers, which import this module, need no progress bars

    files = find_images(folder, exclude)
    tasks = [(p, p.relative_to(folder).as_posix()) for p in files]
    work = functools.partial(_work, cfg=cfg, overlay_dir=overlay_dir, want_features=want_features,
                             want_outline=worst is not None)
    results: list[dict] = []
    kept: list[tuple[float, int]] = []  # a min-heap of (badness, −index): the worst so far, earlier first on ties
    k, badness = worst or (0, None)
    with tqdm(total=len(tasks), unit="img", desc=folder.name or str(folder), disable=None, leave=False) as bar:
        for rows in chunked_map(work, tasks, workers, preload=POOL_PRELOAD):
            for row in rows:
                results.append(row)
                if badness is not None and "error" not in row:
                    heapq.heappush(kept, (badness(row), 1 - len(results)))
                    if len(kept) > k:
                        del results[-heapq.heappop(kept)[1]]["_geometry"]
            bar.update(len(rows))
    rows = [r for r in results if "error" not in r]
    bad = [r for r in results if "error" in r]
    for r in bad:
        log.warning("skipped unreadable image %s: %s", r["file"], r["error"])
    return rows, bad
