"""What `identity-check` writes and prints from its compared pairs (`Scores`): codes.csv,
pairs.csv, nearest.csv, summary.json, the Hamming-distance histograms, the sheet of the closest
pairs and the console table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.check.analyze import to_grey_uint8
from pipeline.check.summary import fmt_value, text_table
from pipeline.common.files import numpy_json_default

CLOSEST_COUNT = 12  # pairs on closest.png
CODE_COLUMNS = ("set", "file", "width", "height", "usable", "reason", "usable_bits")


@dataclass
class Scores:
    """Compared pairs (a[k], b[k]) of code indices: raw HD (NaN when no bit is in common), bits
    compared, and the reported HD (rescaled or raw: `report_hd`)."""

    a: np.ndarray
    b: np.ndarray
    raw: np.ndarray
    bits: np.ndarray
    hd: np.ndarray | None = None

    def order(self) -> np.ndarray:
        """Indices of the pairs by reported HD, least first, those with no bit in common last."""
        return np.argsort(np.where(np.isnan(self.hd), np.inf, self.hd), kind="stable")


def _hd(value: float) -> str:
    """A distance for the CSVs: 6 significant digits, empty when NaN (no bit in common)."""
    return f"{value:.6g}" if math.isfinite(value) else ""


def write_codes_csv(path: Path, sets: Sequence[tuple[str, list[dict]]]) -> None:
    """codes.csv: one row per image of each (set label, rows)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CODE_COLUMNS)
        writer.writeheader()
        for label, rows in sets:
            writer.writerows({"set": label, **r} for r in rows)


def write_pairs_csv(path: Path, sets: Sequence[tuple[str, list[str], Scores]]) -> None:
    """pairs.csv: the impostor pairs compared of each (set label, code files, scores): the reported
    HD (rescaled or raw, as summary.json's `hd` says), the raw HD and the bits compared."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["set", "a", "b", "hd", "raw_hd", "bits"])
        for label, files, s in sets:
            writer.writerows([label, files[a], files[b], _hd(h), _hd(r), int(n)]
                             for a, b, h, r, n in zip(s.a, s.b, s.hd, s.raw, s.bits, strict=True))


def write_nearest_csv(path: Path, files: list[str], train_files: list[str], s: Scores, threshold: float) -> None:
    """nearest.csv: each generated image's nearest training image, nearest first; near_copy when the
    reported HD is below `threshold` (no training file when no training code shares a bit with it)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "train_file", "hd", "raw_hd", "bits", "near_copy"])
        writer.writerows([files[s.a[k]], train_files[s.b[k]] if s.b[k] >= 0 else "", _hd(s.hd[k]), _hd(s.raw[k]),
                          int(s.bits[k]), bool(s.hd[k] < threshold)] for k in s.order())


def write_summary(path: Path, summary: dict) -> None:
    """summary.json (NumPy scalars as plain numbers)."""
    path.write_text(json.dumps(summary, indent=2, default=numpy_json_default, allow_nan=False))


def plot_hd_histograms(path: Path, groups: dict[str, np.ndarray], threshold: float, kind: str) -> None:
    """One panel: the HD distribution of each group (impostor pairs of each set, nearest training
    HDs), overlaid as densities, with the near-copy threshold dashed."""
    from pipeline.check.plots import plot_histograms

    name = f"{kind} Hamming distance"
    plot_histograms({label: {name: hd} for label, hd in groups.items()}, path, [name], {name: [threshold]},
                    title=f"identity check: dashed = near-copy threshold {threshold:g}", ncols=1, bins=50,
                    panel_size=(800, 450))


def write_closest_sheet(path: Path, pairs: Sequence[tuple[tuple[np.ndarray, str], tuple[np.ndarray, str], float]],
                        threshold: float, title: str) -> None:
    """closest.png: each pair ((image, caption), (image, caption), HD) side by side, two pairs a row."""
    from pipeline.check.plots import contact_sheet

    tiles, captions = [], []
    for (left, left_caption), (right, right_caption), hd in pairs:
        tiles += [to_grey_uint8(left), to_grey_uint8(right)]
        verdict = "  NEAR COPY" if hd < threshold else ""
        captions += [f"{left_caption[-36:]}\nHD {hd:.3f}{verdict}", f"{right_caption[-36:]}\n"]
    contact_sheet(tiles, captions, path, ncols=4, title=title)


def console_table(summary: dict) -> str:
    """A few lines: images, impostor statistics of each set, nearest training, notes."""
    sets = [(label, summary[label]) for label in ("generated", "reference") if summary.get(label)]
    impostor = [s["impostor"] or {} for _, s in sets]
    rows = [("usable images (unusable)", [f"{s['n_usable']} ({s['n_images'] - s['n_usable']})" for _, s in sets]),
            ("impostor pairs", [str(i.get("n_pairs", 0)) for i in impostor])]
    rows += [(f"{name} HD", [fmt_value(i.get(name)) for i in impostor]) for name in ("mean", "std", "min")]
    rows += [("degrees of freedom", [fmt_value(i.get("dof")) for i in impostor]),
             (f"pairs below {summary['near_copy_hd']:g}", [str(i.get("n_below_near_copy_hd", "-")) for i in impostor])]
    lines = [f"Hamming distances: {summary['hd']}" + (f" (typical {summary['typical_bits']:.0f} bits)"
                                                      if summary["typical_bits"] else ""),
             text_table([label for label, _ in sets], rows)]
    near = summary.get("nearest_training")
    if near:
        closest = near["closest"][0] if near["closest"] else None
        where = f" ({closest['file']} ↔ {closest['train_file']})" if closest else ""
        lines.append(f"nearest training image of {near['n_generated']} generated (vs {near['n_training']} training): "
                     f"min HD {fmt_value(near['min_hd'])}{where}, median {fmt_value(near['median_hd'])}; "
                     f"near-copies (HD < {summary['near_copy_hd']:g}): {near['n_near_copies']} "
                     f"({100 * near['near_copy_share']:.1f}%)")
    lines += [f"note: {note}" for note in summary["notes"]]
    return "\n".join(lines)
