"""Report figures: metric histograms (matplotlib, Agg backend), overlaid for several groups, and
contact sheets of captioned images (OpenCV). Generic: no knowledge of where the numbers come from."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.common.images import write_image_uint  # noqa: E402

_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, np.float64).ravel()
    return a[np.isfinite(a)]


def plot_histograms(groups: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                    metrics: Sequence[str] | None = None,
                    thresholds: Mapping[str, Sequence[float]] | None = None,
                    title: str | None = None, ncols: int = 4, bins: int = 30,
                    panel_size: tuple[float, float] = (3.2, 2.5)) -> Path:
    """One panel per metric; each group (e.g. "samples", "reference") drawn as its own histogram,
    overlaid and normalised to density when there are several. Dashed lines mark `thresholds`.

    `groups` maps a group label to {metric: values}; NaNs are ignored. `panel_size` is each
    panel's (width, height) in inches. Writes a PNG to `path`."""
    path = Path(path)
    labels = list(groups)
    names = list(metrics) if metrics is not None else list(dict.fromkeys(k for g in groups.values() for k in g))
    ncols = max(1, min(ncols, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        data = [_finite(groups[g].get(name, ())) for g in labels]
        pooled = np.concatenate(data) if data else np.zeros(0)
        if pooled.size:
            lo, hi = float(pooled.min()), float(pooled.max())
            edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, bins + 1)
            for i, (label, values) in enumerate(zip(labels, data, strict=True)):
                if values.size:
                    counts, _ = np.histogram(values, bins=edges, density=len(labels) > 1)
                    ax.stairs(counts, edges, fill=True, alpha=0.55 if len(labels) > 1 else 0.9,
                              color=_COLOURS[i % len(_COLOURS)], label=f"{label} (n={values.size})")
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="grey")
        for t in (thresholds or {}).get(name, ()):
            ax.axvline(t, color="black", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="x", nbins=5)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    if len(labels) > 1:
        axes.ravel()[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.06, top=0.9 if title else 0.95, wspace=0.3, hspace=0.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], path: str | Path,
                  ncols: int = 6, tile: int = 200, title: str | None = None) -> Path:
    """A grid of images (H, W) grey or (H, W, 3) RGB uint8, each scaled to `tile` pixels and
    captioned above (one or two short lines), written as a PNG."""
    path = Path(path)
    n = len(images)
    ncols = max(1, min(ncols, n or 1))
    nrows = max(1, math.ceil(n / ncols))
    cap_h, head = 30, 28 if title else 0
    sheet = np.full((head + nrows * (tile + cap_h), ncols * tile, 3), 255, np.uint8)
    if title:
        cv2.putText(sheet, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
        rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img
        scale = tile / max(rgb.shape[:2])
        rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
        r, c = divmod(i, ncols)
        y, x = head + r * (tile + cap_h), c * tile
        for k, line in enumerate(caption.splitlines()[:2]):
            cv2.putText(sheet, line[:40], (x + 3, y + 12 + 13 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
        sheet[y + cap_h : y + cap_h + rgb.shape[0], x : x + rgb.shape[1]] = rgb
    write_image_uint(path, sheet)
    return path
