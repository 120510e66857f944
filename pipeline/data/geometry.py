"""The geometry vector c of an eye, from a label record or from circularity-check's measurement,
and the vectors of a whole training set (the condition of the geometry VAE, `vae.condition`).

    c = (pupil_ratio, iris_radius, dx, dy)
      pupil_ratio  pupil radius / iris radius                      (dilation; in (0, 1))
      iris_radius  iris radius / image side                        (how big the eye is in the image)
      dx, dy       (pupil centre − iris centre) / iris radius      (the pupil's offset, x = column, y = row)

One definition for all three sources: the synthetic generator's records (pupil_cx, pupil_cy,
pupil_r, iris_cx, iris_cy, iris_r), prepare-data's labels (pupil, iris: [cx, cy, r] in the crop's
pixels) and circularity-check's metrics (the same keys as the synthetic records). Ratios of lengths
do not change when an image is resized, so a record in the pixels of a 128 px crop gives the
vector of the 64 px image made from it. A horizontal mirror negates dx (`mirror`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.common.config import DataConfig
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

GEOMETRY_KEYS = ("pupil_ratio", "iris_radius", "dx", "dy")
GEOMETRY_DIM = len(GEOMETRY_KEYS)
DX = GEOMETRY_KEYS.index("dx")


def _circles(record: Mapping) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """((pupil cx, cy, r), (iris cx, cy, r)) of a synthetic record, prepare-data label or metrics dict."""
    if "pupil" in record and "iris" in record:  # prepare-data: [cx, cy, r]
        return tuple(map(float, record["pupil"])), tuple(map(float, record["iris"]))  # type: ignore[return-value]
    try:
        return ((float(record["pupil_cx"]), float(record["pupil_cy"]), float(record["pupil_r"])),
                (float(record["iris_cx"]), float(record["iris_cy"]), float(record["iris_r"])))
    except (KeyError, TypeError, ValueError):
        raise UserError("a geometry label needs pupil_cx, pupil_cy, pupil_r, iris_cx, iris_cy, iris_r "
                        f"(or pupil and iris as [cx, cy, r]); got keys {', '.join(sorted(map(str, record)))}") from None


def geometry_vector(record: Mapping, image_size: float) -> np.ndarray:
    """c = (pupil_r / iris_r, iris_r / image_size, (pupil_c − iris_c) / iris_r) of one eye, float64 (4,).

    `image_size` is the side of the image the record's pixels belong to. NaN entries where a circle
    was not found (a metrics dict of a failed measurement).
    """
    (px, py, pr), (ix, iy, ir) = _circles(record)
    if not ir > 0:
        return np.full(GEOMETRY_DIM, math.nan)
    return np.array([pr / ir, ir / float(image_size), (px - ix) / ir, (py - iy) / ir])


def measured_geometry(metrics: Mapping, image_size: float) -> dict[str, float]:
    """circularity-check's metrics of one image (`analyze_batch`) → {pupil_ratio, iris_radius, dx, dy}
    (NaN where the pupil or iris was not found)."""
    if not (metrics.get("pupil_found") and metrics.get("iris_found")):
        return dict.fromkeys(GEOMETRY_KEYS, math.nan)
    return dict(zip(GEOMETRY_KEYS, map(float, geometry_vector(metrics, image_size)), strict=True))


def mirror(c: np.ndarray) -> np.ndarray:
    """The geometry of the horizontally mirrored eyes (rows of `c`): dx negated."""
    c = np.array(c, np.float32, copy=True)
    c[..., DX] = -c[..., DX]
    return c


def _folder_labels(folder: Path, data: DataConfig) -> np.ndarray:
    """Geometry of a folder's images from its labels.json (records with a `file` key), in the sorted
    file order `load_image_array` reads them in; each record's pixels are those of its file."""
    from pipeline.data.folders import decode_image, list_image_files

    labels_path = folder / "labels.json"
    if not labels_path.is_file():
        raise UserError(f"vae.condition=geometry needs labels: {labels_path} not found (write the data with "
                        "prepare-data or the synthetic generator, or use data.path=synthetic)")
    try:
        records = json.loads(labels_path.read_text())
        by_file = {(folder / r["file"]).resolve(): r for r in records}
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{labels_path} is not a list of labels with a 'file' key ({exc})") from None
    out = []
    for path in list_image_files(folder, report_skipped=False):
        record = by_file.get(path.resolve())
        if record is None:
            raise UserError(f"{labels_path} has no label for {path.relative_to(folder)}")
        h, w = decode_image(path).shape[:2]
        if h != w:
            raise UserError(f"geometry labels need square images; {path} is {w}x{h}")
        out.append(geometry_vector(record, w))
    return np.array(out, np.float32)


def load_geometry(data: DataConfig) -> np.ndarray:
    """The geometry vectors (N, 4) float32 of the images `load_image_array(data)` returns, in its order:
    the synthetic set's records, a prepare-data cache's labels, or a folder's labels.json."""
    from pipeline.data.prepared import cache_file, read_cache

    if data.path == "synthetic":
        from pipeline.data.synthetic import iter_irises

        records = (rec for _, rec in iter_irises(data.synthetic_count, data.image_size, data.seed, data.channels,
                                                 data.synthetic_defects))
        c = np.array([geometry_vector(r, data.image_size) for r in records], np.float32)
    elif (prepared := cache_file(data.path)) is not None:
        cache = read_cache(prepared)
        side = cache.images.shape[-1]
        c = np.array([geometry_vector(r, side) for r in cache.labels], np.float32)
    else:
        c = _folder_labels(Path(data.path), data)
    if not np.isfinite(c).all():
        raise UserError(f"{data.path}: {int((~np.isfinite(c).all(axis=1)).sum())} labels have no usable "
                        "pupil/iris circles")
    log.info("geometry of %d images: pupil ratio %.2f–%.2f, iris radius %.2f–%.2f", len(c),
             c[:, 0].min(), c[:, 0].max(), c[:, 1].min(), c[:, 1].max())
    return c
