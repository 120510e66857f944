"""Report figures drawn with OpenCV, no Matplotlib (whose import and text layout were most of a
circularity-check call's time outside the measurement): metric histograms, overlaid for several
groups, and contact sheets of captioned images. Generic: no knowledge of where the numbers come from."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.images import write_image_uint

# Matplotlib's tab10 blue, orange, green, red, purple (RGB).
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
FONT, INK, GRID = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (150, 150, 150)
# A panel's plot area inside its (width, height): left (y labels), right, top (title), bottom (x labels).
MARGINS = (44, 10, 22, 22)


def nice_ticks(lo: float, hi: float, most: int = 5) -> np.ndarray:
    """At most `most` round values (1, 2 or 5 × 10^k apart) inside [lo, hi]."""
    span = hi - lo
    if not span > 0:
        return np.array([lo])
    raw = span / most
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    ticks = np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step
    return np.round(ticks, 12)


def tick_label(v: float) -> str:
    """A short axis label: up to 3 significant digits, no trailing zeros."""
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-")


def _text(img: np.ndarray, s: str, x: int, y: int, size: float = 0.36, align: str = "left") -> None:
    """`s` with its baseline at y, starting (left), centred (centre) or ending (right) at x."""
    (w, _), _ = cv2.getTextSize(s, FONT, size, 1)
    x = {"left": x, "centre": x - w // 2, "right": x - w}[align]
    cv2.putText(img, s, (x, y), FONT, size, INK, 1, cv2.LINE_AA)


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, np.float64).ravel()
    return a[np.isfinite(a)]


def histogram_panel(data: Sequence[np.ndarray], name: str, thresholds: Sequence[float], size: tuple[int, int],
                    bins: int, density: bool) -> np.ndarray:
    """One panel (H, W, 3 uint8): each array of `data` as a filled histogram over the pooled range
    (and the thresholds, dashed), in `COLOURS` order, blended where groups overlap."""
    w, h = size
    left, right, top, bottom = MARGINS
    x0, x1, y0, y1 = left, w - right, top, h - bottom  # the plot area, y downwards
    panel = np.full((h, w, 3), 255, np.uint8)
    _text(panel, name, w // 2, 14, 0.42, "centre")
    pooled = np.concatenate(list(data)) if len(data) else np.zeros(0)
    if not pooled.size:
        _text(panel, "no values", (x0 + x1) // 2, (y0 + y1) // 2, 0.4, "centre")
        return panel
    lo, hi = float(pooled.min()), float(pooled.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, bins + 1)
    counts = [np.histogram(d, bins=edges, density=density)[0] if d.size else np.zeros(bins) for d in data]
    xlo, xhi = min([lo, *thresholds]), max([float(edges[-1]), *thresholds])
    pad = 0.03 * (xhi - xlo)
    xlo, xhi = xlo - pad, xhi + pad
    ymax = 1.05 * max(float(c.max()) for c in counts) or 1.0

    def px(v: float | np.ndarray) -> np.ndarray:
        return np.rint(x0 + (np.asarray(v) - xlo) / (xhi - xlo) * (x1 - x0)).astype(int)

    def py(v: float | np.ndarray) -> np.ndarray:
        return np.rint(y1 - np.asarray(v) / ymax * (y1 - y0)).astype(int)

    alpha = 0.55 if len(data) > 1 else 0.9
    for k, c in enumerate(counts):
        colour = COLOURS[k % len(COLOURS)]
        layer = np.zeros((h, w), np.uint8)
        for a, b, top_y in zip(px(edges[:-1]), px(edges[1:]), py(c), strict=True):
            if top_y < y1:
                cv2.rectangle(layer, (int(a), int(top_y)), (max(int(a), int(b) - 1), y1 - 1), 1, cv2.FILLED)
        sel = layer > 0
        panel[sel] = np.rint((1 - alpha) * panel[sel] + alpha * np.array(colour)).astype(np.uint8)
    for t in thresholds:
        x = int(px(t))
        for ya in range(y0, y1, 6):
            cv2.line(panel, (x, ya), (x, min(ya + 3, y1)), INK, 1)
    cv2.rectangle(panel, (x0, y0), (x1, y1), GRID, 1)
    for v in nice_ticks(xlo, xhi, max(3, w // 80)):
        x = int(px(v))
        cv2.line(panel, (x, y1), (x, y1 + 3), GRID, 1)
        _text(panel, tick_label(v), x, y1 + 15, 0.33, "centre")
    for v in nice_ticks(0.0, ymax, max(3, h // 70)):
        y = int(py(v))
        cv2.line(panel, (x0 - 3, y), (x0, y), GRID, 1)
        _text(panel, tick_label(v), x0 - 5, y + 4, 0.33, "right")
    return panel


def plot_histograms(groups: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                    metrics: Sequence[str] | None = None,
                    thresholds: Mapping[str, Sequence[float]] | None = None,
                    title: str | None = None, ncols: int = 4, bins: int = 30,
                    panel_size: tuple[int, int] = (320, 250)) -> Path:
    """One panel per metric; each group (e.g. "samples", "reference") drawn as its own histogram,
    overlaid and normalised to density when there are several, with a legend. Dashed lines mark
    `thresholds`.

    `groups` maps a group label to {metric: values}; NaNs are ignored. `panel_size` is each
    panel's (width, height) in pixels. Writes a PNG to `path`."""
    path = Path(path)
    labels = list(groups)
    names = list(metrics) if metrics is not None else list(dict.fromkeys(k for g in groups.values() for k in g))
    ncols = max(1, min(ncols, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    w, h = panel_size
    head = 30 if title else 4
    legend = 20 * len(labels) if len(labels) > 1 else 0
    sheet = np.full((head + legend + nrows * h, ncols * w, 3), 255, np.uint8)
    if title:
        _text(sheet, title, ncols * w // 2, 21, 0.55, "centre")
    for k, label in enumerate(labels if legend else ()):
        y = head + 20 * k + 4
        cv2.rectangle(sheet, (MARGINS[0], y), (MARGINS[0] + 22, y + 11), COLOURS[k % len(COLOURS)], cv2.FILLED)
        n = max((len(v) for v in groups[label].values()), default=0)
        _text(sheet, f"{label} (n={n})", MARGINS[0] + 30, y + 10, 0.4)
    for i, name in enumerate(names):
        data = [_finite(groups[g].get(name, ())) for g in labels]
        r, c = divmod(i, ncols)
        panel = histogram_panel(data, name, list((thresholds or {}).get(name, ())), (w, h), bins, len(labels) > 1)
        sheet[head + legend + r * h : head + legend + (r + 1) * h, c * w : (c + 1) * w] = panel
    write_image_uint(path, sheet)
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
