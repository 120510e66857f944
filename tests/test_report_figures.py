"""circularity-check's figures: OpenCV histograms checked against NumPy's counts, round axis ticks,
the worst-cases rows kept while measuring, and a pool whose server started early."""

import functools
import math
import os

import cv2
import numpy as np
import pytest

from pipeline.check.analyze import analyze_with_geometry
from pipeline.check.folder import analyze_folder, read_image
from pipeline.check.plots import COLOURS, MARGINS, histogram_panel, nice_ticks, plot_histograms
from pipeline.check.rules import rules_from_config
from pipeline.check.summary import WORST_COUNT, _badness, worst_rows
from pipeline.common.config import CircularityConfig
from pipeline.common.images import write_image
from pipeline.common.pool import (
    WORKER_THREAD_ENV,
    chunked_map,
    start_pool_server,
    worker_environment,
)
from pipeline.data.synthetic import generate_irises

COUNTS = [3, 7, 1, 9, 4, 12, 6, 2, 8, 5]  # no empty bin, no two neighbours equal


def _values() -> np.ndarray:
    """Values whose 10-bin histogram over [0, 10] is COUNTS (bin i holds i + 0.5)."""
    return np.concatenate([np.full(c, i + 0.5) for i, c in enumerate(COUNTS)] + [[0.0, 10.0]])  # the ends: 1-wide bins


def _bar_runs(panel: np.ndarray, colour: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(first column, last column, height in px) of each run of columns with equal bar height."""
    y1 = panel.shape[0] - MARGINS[3]
    bar = np.all(np.abs(panel.astype(int) - colour) <= 40, axis=2)
    heights = [int(np.argmin(bar[y1 - 1 :: -1, x])) if bar[y1 - 1, x] else 0 for x in range(panel.shape[1])]
    runs, start = [], None
    for x in range(1, len(heights) + 1):
        if x == len(heights) or heights[x] != heights[x - 1]:
            if heights[x - 1] and start is not None:
                runs.append((start, x - 1, heights[x - 1]))
            start = x
    return runs


def test_histogram_bars_have_numpy_counts_as_heights():
    values = _values()
    expected, _ = np.histogram(values, bins=10, range=(0.0, 10.0))
    panel = histogram_panel([values], "metric", [], (420, 260), bins=10, density=False)
    runs = _bar_runs(panel, tuple(round(255 * 0.1 + 0.9 * c) for c in COLOURS[0]))
    assert len(runs) == 10
    height = panel.shape[0] - MARGINS[3] - MARGINS[2]
    scale = height / (1.05 * expected.max())
    for (first, last, h), count in zip(runs, expected, strict=True):
        assert h == pytest.approx(count * scale, abs=1.0)
        assert last - first + 1 == pytest.approx(runs[0][1] - runs[0][0] + 1, abs=1)  # equal widths


def test_threshold_is_a_dashed_line_at_its_value():
    values = _values()
    panel = histogram_panel([values], "metric", [4.0], (420, 260), bins=10, density=False)
    runs = _bar_runs(panel, tuple(round(255 * 0.1 + 0.9 * c) for c in COLOURS[0]))
    y0, y1 = MARGINS[2], panel.shape[0] - MARGINS[3]
    black = np.all(panel[y0:y1] < 60, axis=2)
    columns = np.flatnonzero(black.sum(axis=0) > 0.3 * (y1 - y0))
    assert len(columns) == 1
    x = int(columns[0])
    assert runs[3][1] <= x <= runs[4][0]  # between bins 3 and 4, where 4.0 lies
    dashes = black[:, x]
    assert 0.3 < dashes.mean() < 0.9  # dashed, not solid


def test_two_groups_blend_and_empty_panels_say_so(tmp_path):
    rng = np.random.default_rng(0)
    path = plot_histograms({"a": {"m": rng.normal(0, 1, 500), "empty": [math.nan]},
                            "b": {"m": rng.normal(1, 1, 300), "empty": []}}, tmp_path / "h.png",
                           thresholds={"m": [0.5]}, title="t")
    rgb = cv2.imread(str(path))[:, :, ::-1].astype(int)
    assert rgb.shape[0] > 250 and rgb.shape[1] == 2 * 320
    blue = np.all(np.abs(rgb - [round(0.45 * 255 + 0.55 * c) for c in COLOURS[0]]) <= 3, axis=2)
    assert blue.sum() > 500  # group a alone, blended over white
    right = rgb[:, 320:]
    assert (np.ptp(right, axis=2) > 30).sum() == 0  # the empty panel: nothing in colour, no bars
    assert (right.max(axis=2) < 100).sum() > 50  # but its title and "no values" in black


@pytest.mark.parametrize(("lo", "hi"), [(-3.5, 5.0), (0.9, 1.0), (0.0, 103.0), (0.95, 1.0000001), (2e5, 4.9e5),
                                        (-1e-3, 2e-3)])
def test_nice_ticks_are_round_steps_inside_the_range(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 6
    assert ticks.min() >= lo - 1e-12 and ticks.max() <= hi + 1e-12
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6


@pytest.fixture(scope="module")
def eyes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worst") / "eyes"
    folder.mkdir()
    images, _ = generate_irises(40, 96, seed=5, defects=0.5)
    for i, img in enumerate(images):
        write_image(folder / f"{i:03d}.png", img)
    return folder


@pytest.mark.parametrize("workers", [1, 2])
def test_the_worst_rows_keep_their_boundaries(eyes, workers):
    cfg = CircularityConfig()
    rows, _ = analyze_folder(eyes, cfg, workers, worst=(5, functools.partial(_badness, rules=rules_from_config(cfg))))
    kept = [r for r in rows if "_geometry" in r]
    ranked = sorted(rows, key=lambda r: -_badness(r, rules_from_config(cfg)))  # stable: earlier files first on ties
    assert [r["file"] for r in kept] == sorted(r["file"] for r in ranked[:5])
    for r in kept:
        _, geometry = analyze_with_geometry(read_image(eyes / r["file"]), cfg)
        np.testing.assert_array_equal(r["_geometry"].pupil_contour, geometry.pupil_contour)
        assert r["_geometry"].iris == geometry.iris and r["_geometry"].visible is None
    assert worst_rows(cfg)[0] == WORST_COUNT


def _square(x: int) -> int:
    return x * x


def test_a_pool_server_started_early_gives_the_inline_results():
    start_pool_server(("tests.test_report_figures",))
    items = list(range(50))
    pooled = [v for chunk in chunked_map(_square, items, 2, preload=("tests.test_report_figures",)) for v in chunk]
    assert pooled == [_square(i) for i in items]


def _thread_settings(_: int) -> dict:
    return {k: os.environ.get(k) for k in WORKER_THREAD_ENV}


def test_pool_workers_run_one_blas_thread_and_the_caller_keeps_its_environment(monkeypatch):
    before = {k: os.environ.get(k) for k in WORKER_THREAD_ENV}
    seen = [v for chunk in chunked_map(_thread_settings, list(range(8)), 2) for v in chunk]
    assert all(s == {k: before[k] or "1" for k in WORKER_THREAD_ENV} for s in seen)
    assert {k: os.environ.get(k) for k in WORKER_THREAD_ENV} == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with worker_environment():
        assert os.environ["OMP_NUM_THREADS"] == "3" and os.environ["MKL_NUM_THREADS"] == "1"
    assert "MKL_NUM_THREADS" not in os.environ and os.environ["OMP_NUM_THREADS"] == "3"
