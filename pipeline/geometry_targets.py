"""Geometry targets of `generate --from-vae` with a geometry VAE (vae.condition=geometry), and the
measurement that checks them.

    --pupil-ratio 0.45            every image's pupil/iris radius ratio
    --pupil-ratio 0.25:0.65       a sweep: image i of n gets 0.25 + 0.4 · i / (n − 1) (linspace)
    --iris-radius 0.38 | A:B      iris radius / image side, the same way
    --offset DX,DY                pupil-centre offset from the iris centre, in iris radii
    --geometry-csv FILE           per-image targets: image i takes row i (cycling), e.g. the
                                  results.csv of circularity-check on a real database

What is not given comes from the VAE's condition bank (the training set's empirical geometry),
one bank row per image drawn from its own (seed, i, "geometry") stream. The vector's entries are
`pipeline.data.geometry.GEOMETRY_KEYS`; the measurement is circularity-check's (`analyze_batch`)
turned into the same vector (`measured_geometry`).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common.config import CircularityConfig
from pipeline.common.errors import UserError
from pipeline.common.seeding import numpy_stream
from pipeline.data.geometry import GEOMETRY_KEYS, measured_geometry

log = logging.getLogger(__name__)

# CSV columns read for each target, in order of preference; iris_r is divided by the row's width.
CSV_COLUMNS = {"pupil_ratio": ("pupil_ratio", "pupil_iris_ratio"), "iris_radius": ("iris_radius", "iris_r")}


@dataclass(frozen=True)
class GeometryRequest:
    """What the user asked for: (lo, hi) spans (lo == hi for a fixed value), an offset, CSV rows."""

    pupil_ratio: tuple[float, float] | None = None
    iris_radius: tuple[float, float] | None = None
    offset: tuple[float, float] | None = None
    rows: dict[str, np.ndarray] | None = None  # CSV targets by GEOMETRY_KEYS name, one entry per row
    source: str = ""  # the options, for metadata.json

    def targets(self, n: int, bank: np.ndarray, seed: int) -> np.ndarray:
        """The raw condition (n, 4) of each image of the run: what was asked for, the rest from `bank`."""
        c = np.stack([bank[numpy_stream(seed, i, "geometry").integers(len(bank))] for i in range(n)]).astype(np.float64)
        t = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
        for key, span in (("pupil_ratio", self.pupil_ratio), ("iris_radius", self.iris_radius)):
            if span is not None:
                c[:, GEOMETRY_KEYS.index(key)] = span[0] + (span[1] - span[0]) * t
        if self.offset is not None:
            c[:, 2:4] = self.offset
        for key, values in (self.rows or {}).items():
            c[:, GEOMETRY_KEYS.index(key)] = values[np.arange(n) % len(values)]
        return c.astype(np.float32)


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{what} must be finite, got {text!r}")
    return value


def parse_span(text: str, what: str) -> tuple[float, float]:
    """'0.45' → (0.45, 0.45); '0.25:0.65' → (0.25, 0.65); every value in (0, 1), else UserError."""
    parts = text.split(":")
    if len(parts) not in (1, 2):
        raise UserError(f"{what} must be a value V or a range A:B, got {text!r}")
    lo, hi = (_number(p.strip(), what) for p in (parts * 2)[:2])
    for value in (lo, hi):
        if not 0.0 < value < 1.0:
            raise UserError(f"{what} must be in (0, 1), got {value:g}")
    return lo, hi


def parse_offset(text: str) -> tuple[float, float]:
    """'DX,DY' (pupil-centre offset in iris radii) → (dx, dy); each in (−1, 1)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise UserError(f"--offset must be DX,DY (iris radii), got {text!r}")
    dx, dy = (_number(p.strip(), "--offset") for p in parts)
    if not (abs(dx) < 1 and abs(dy) < 1):
        raise UserError(f"--offset must be in (-1, 1) iris radii, got {text!r}")
    return dx, dy


def read_targets_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Per-image targets from a CSV: pupil_ratio (or pupil_iris_ratio) and/or iris_radius (or iris_r
    with width, as circularity-check's results.csv has them). Rows with an empty target are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"geometry CSV not found: {path}")
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read geometry CSV {path}: {exc}") from None
    found = {key: next((c for c in names if c in header), None) for key, names in CSV_COLUMNS.items()}
    if found["iris_radius"] == "iris_r" and "width" not in header:
        found["iris_radius"] = None
    found = {key: col for key, col in found.items() if col}
    if not found:
        raise UserError(f"geometry CSV {path} lacks the columns pupil_ratio (or pupil_iris_ratio) and iris_radius "
                        f"(or iris_r with width); it has: {', '.join(header) or 'none'}")
    values: dict[str, list[float]] = {key: [] for key in found}
    for i, row in enumerate(rows, start=2):
        if any(row.get(col, "") == "" for col in found.values()):
            continue  # e.g. an image where circularity-check found no iris
        for key, col in found.items():
            v = _number(row[col], f"{path} line {i}, column {col}")
            v = v / _number(row["width"], f"{path} line {i}, column width") if col == "iris_r" else v
            if not 0.0 < v < 1.0:
                raise UserError(f"{path} line {i}: {key} must be in (0, 1), got {v:g}")
            values[key].append(v)
    if not next(iter(values.values())):
        raise UserError(f"geometry CSV {path} has no row with all of {', '.join(found.values())}")
    skipped = len(rows) - len(next(iter(values.values())))
    if skipped:
        log.warning("skipped %d row(s) of %s with an empty target", skipped, path)
    return {key: np.array(v) for key, v in values.items()}


def request_from_options(pupil_ratio: str | None = None, iris_radius: str | None = None, offset: str | None = None,
                         csv_path: str | None = None) -> GeometryRequest | None:
    """The request the generate options describe, or None when none was given (checked, nothing read twice)."""
    if pupil_ratio is None and iris_radius is None and offset is None and csv_path is None:
        return None
    rows = read_targets_csv(csv_path) if csv_path else None
    clash = [k for k, v in (("pupil_ratio", pupil_ratio), ("iris_radius", iris_radius)) if v and rows and k in rows]
    if clash:
        raise UserError(f"--{clash[0].replace('_', '-')} and the --geometry-csv column {clash[0]} both give it; use one")
    given = [f"--pupil-ratio {pupil_ratio}" if pupil_ratio else "", f"--iris-radius {iris_radius}" if iris_radius else "",
             f"--offset {offset}" if offset else "", f"--geometry-csv {csv_path}" if csv_path else ""]
    return GeometryRequest(pupil_ratio=parse_span(pupil_ratio, "--pupil-ratio") if pupil_ratio else None,
                           iris_radius=parse_span(iris_radius, "--iris-radius") if iris_radius else None,
                           offset=parse_offset(offset) if offset else None, rows=rows,
                           source=" ".join(g for g in given if g))


def measure(images: np.ndarray, cfg: CircularityConfig) -> list[dict]:
    """circularity-check's geometry of (N, C, H, W) [-1, 1] images: {pupil_ratio, iris_radius, dx, dy,
    round_pupil (a pupil found, round, no bleed: `round_pupil_without_bleed`), pass} per image (NaN where nothing was found)."""
    from pipeline.check.analyze import analyze_batch
    from pipeline.check.rules import round_pupil_without_bleed

    return [{**measured_geometry(m, images.shape[-1]), "round_pupil": round_pupil_without_bleed(m, cfg),
             "pass": bool(m["pass"])} for m in analyze_batch(images, cfg)]


def control_error(targets: np.ndarray, measured: list[dict], key: str = "pupil_ratio") -> dict:
    """How well `key` was hit: mean absolute error and Pearson correlation over the images where it was
    measured, and how many were."""
    j = GEOMETRY_KEYS.index(key)
    want = np.asarray(targets, np.float64)[:, j]
    got = np.array([m[key] for m in measured], np.float64)
    ok = np.isfinite(got)
    mae = float(np.abs(got[ok] - want[ok]).mean()) if ok.any() else math.nan
    corr = float(np.corrcoef(want[ok], got[ok])[0, 1]) if ok.sum() > 2 and np.std(want[ok]) > 0 else math.nan
    return {"key": key, "mae": mae, "corr": corr, "measured": int(ok.sum()), "n": len(got)}
