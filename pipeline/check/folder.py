"""`circularity-check DIR`: are the pupils and irises in a folder of iris images round, concentric
and separated? One row per image, a summary, plots, and an exit code usable in CI.

    circularity-check samples/ [--config configs/circularity.yaml] [--set circularity.KEY=VALUE]
                      [--out DIR] [--workers N] [--overlays] [--fail-under RATE]
                      [--reference DIR] [--inception-weights FILE] [--overwrite]

Images are found recursively (png, jpg, bmp, tif; hidden files and folders skipped) and measured
at their own size; 8/16-bit, grey/RGB/RGBA all work. Unreadable files are listed and skipped.
Output (default `<DIR>_circularity` beside DIR; built in a temp folder, renamed when complete):
  results.csv     one row per image: file, size, pass, reason, every metric
  summary.json    counts, pass rate, mean/median/p5/p95 per metric, failure reasons, thresholds
  histograms.png  metric histograms with the thresholds
  worst.png       contact sheet of the worst images with their fitted boundaries
  overlays/       (--overlays) every image with its boundaries: green pass, red fail
  comparison.json, comparison.png  (--reference) the two folders side by side, plus distribution
                  distances: proxy FD/KID always (not Inception!), FID/KID with --inception-weights
Exit codes: 0 done; 1 pass rate below --fail-under; 2 usage error (bad folder, config, option).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.check.analyze import Geometry, analyze_with_geometry, to_grey_unit
from pipeline.check.rules import METRICS, NO_IRIS, NO_PUPIL, rules_from_config
from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.config import CircularityConfig
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir, replace_dir, temp_dir_for
from pipeline.common.images import IMAGE_EXTENSIONS, write_png_uint

log = logging.getLogger(__name__)

PLOT_METRICS = (
    "pupil_circularity", "pupil_axis_ratio", "pupil_radial_dev", "bleed_fraction", "concentricity",
    "iris_circularity", "pupil_iris_ratio", "pupil_r", "iris_r", "iris_pupil_contrast",
    "iris_sclera_contrast", "grey_utilisation", "sharpness",
)
TABLE_METRICS = ("pupil_circularity", "pupil_axis_ratio", "pupil_radial_dev", "bleed_fraction",
                 "concentricity", "iris_circularity", "pupil_iris_ratio")
WORST_COUNT = 24


# --------------------------------------------------------------------------------------------
# Files


GENERATED_NAME = re.compile(r"\d{6}\.png")


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


# --------------------------------------------------------------------------------------------
# Per image (runs in worker processes)


def draw_overlay(img: np.ndarray, metrics: dict, geometry: Geometry) -> np.ndarray:
    """RGB uint8 picture of the image (enlarged to ≥ 256 px) with the traced pupil boundary and
    the fitted iris circle: green when the image passes, red when it fails."""
    grey = np.round(to_grey_unit(img) * 255).astype(np.uint8)
    f = max(1, int(math.ceil(256 / max(grey.shape))))
    rgb = cv2.cvtColor(cv2.resize(grey, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2RGB)
    colour = (40, 200, 40) if metrics["pass"] else (230, 40, 40)
    shift, unit = 4, 16 * f

    def pt(x: float, y: float) -> tuple[int, int]:  # pixel centres → enlarged sub-pixel coordinates
        return int(round((x + 0.5) * unit - 8)), int(round((y + 0.5) * unit - 8))

    if len(geometry.pupil_contour):
        poly = np.array([pt(x, y) for x, y in geometry.pupil_contour], np.int32)
        cv2.polylines(rgb, [poly], True, colour, 1, cv2.LINE_AA, shift)
    for cx, cy, _ in (geometry.pupil, geometry.iris):
        if math.isfinite(cx):
            cv2.drawMarker(rgb, tuple(v >> shift for v in pt(cx, cy)), colour, cv2.MARKER_CROSS, 2 * f + 4, 1)
    if math.isfinite(geometry.iris[0]):
        cv2.circle(rgb, pt(geometry.iris[0], geometry.iris[1]), int(round(geometry.iris[2] * unit)), colour, 1, cv2.LINE_AA, shift)
    if not metrics["pass"]:
        cv2.putText(rgb, metrics["reason"], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1, cv2.LINE_AA)
    return rgb


def _work(task: tuple[Path, str], cfg: CircularityConfig, overlay_dir: Path | None, want_features: bool) -> dict:
    """Measure one file (path, name in the results): its CSV row (or an `error`), writing its
    overlay when asked."""
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
        write_png_uint(out, draw_overlay(img, metrics, geometry))
    if want_features:
        from pipeline.check.metrics import proxy_features

        row["_features"] = proxy_features(to_grey_unit(img)[None, None] * 2.0 - 1.0)[0]
    return row


def _work_chunk(tasks: list[tuple[Path, str]], cfg: CircularityConfig, overlay_dir: Path | None,
                want_features: bool) -> list[dict]:
    """`_work` on each task of a chunk: one message to and from the pool per chunk."""
    return [_work(t, cfg, overlay_dir, want_features) for t in tasks]


def _guided_chunks(items: list, workers: int, largest: int = 64, smallest: int = 4) -> list[list]:
    """`items` in chunks that shrink towards the end (guided scheduling): each chunk costs the pool
    a few milliseconds of the parent's time (64 images: ~1%), and small last chunks let the
    workers finish together."""
    chunks, i = [], 0
    while i < len(items):
        size = max(smallest, min(largest, (len(items) - i) // (2 * workers)))
        chunks.append(items[i : i + size])
        i += size
    return chunks


def _pool_context():
    """Workers start from a clean fork server (or spawn): forking this process directly is unsafe
    once it holds threads (progress bars, BLAS) and can deadlock. The server imports the main module
    and this one once, so that its workers start with them loaded."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", "pipeline.check.folder"])
        return ctx
    return multiprocessing.get_context("spawn")


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process: no nested threading


def analyze_folder(folder: Path, cfg: CircularityConfig, workers: int, overlay_dir: Path | None = None,
                   want_features: bool = False, exclude: tuple[Path, ...] = ()) -> tuple[list[dict], list[dict]]:
    """Rows for every readable image under `folder`, and {file, error} for the unreadable ones.

    With workers > 1 the processes come from a fork server, which imports the caller's main module:
    scripts calling this need the usual `if __name__ == "__main__":` guard."""
    files = find_images(folder, exclude)
    tasks = [(p, p.relative_to(folder).as_posix()) for p in files]
    bar = tqdm(total=len(tasks), unit="img", desc=folder.name or str(folder), disable=None, leave=False)
    results = []
    with bar:
        if workers <= 1 or len(tasks) < 2:
            for t in tasks:
                results.append(_work(t, cfg, overlay_dir, want_features))
                bar.update()
        else:
            work = functools.partial(_work_chunk, cfg=cfg, overlay_dir=overlay_dir, want_features=want_features)
            with _pool_context().Pool(min(workers, len(tasks)), initializer=_init_worker) as pool:
                for rows in pool.imap(work, _guided_chunks(tasks, workers)):
                    results.extend(rows)
                    bar.update(len(rows))
    rows = [r for r in results if "error" not in r]
    bad = [r for r in results if "error" in r]
    for r in bad:
        log.warning("skipped unreadable image %s: %s", r["file"], r["error"])
    return rows, bad


# --------------------------------------------------------------------------------------------
# Summaries and outputs


def failure_key(reason: str) -> str:
    """What a failure is counted under: the rule's metric, or the detection failure."""
    return reason if reason in (NO_PUPIL, NO_IRIS) else reason.split(" ")[0]


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    a = a[np.isfinite(a)]
    if not a.size:
        return {"n": 0, "mean": None, "median": None, "p5": None, "p95": None}
    p5, med, p95 = np.percentile(a, [5, 50, 95])
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(med), "p5": float(p5), "p95": float(p95)}


def summarize(folder: Path, rows: list[dict], unreadable: list[dict], cfg: CircularityConfig) -> dict:
    """Counts, pass rate, per-metric statistics and failure reasons (the summary.json content)."""
    n = len(rows)
    passed = sum(bool(r["pass"]) for r in rows)
    reasons: dict[str, int] = {}
    for r in rows:
        if not r["pass"]:
            key = failure_key(r["reason"])
            reasons[key] = reasons.get(key, 0) + 1
    numeric = [m for m in METRICS if m not in ("pupil_found", "iris_found")]
    return {
        "folder": str(folder),
        "n_files": n + len(unreadable),
        "n_analysed": n,
        "n_unreadable": len(unreadable),
        "unreadable": unreadable,
        "n_pass": passed,
        "n_fail": n - passed,
        "pass_rate": passed / n if n else 0.0,
        "pupil_found_rate": sum(bool(r["pupil_found"]) for r in rows) / n if n else 0.0,
        "iris_found_rate": sum(bool(r["iris_found"]) for r in rows) / n if n else 0.0,
        "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "metrics": {m: _stats([r[m] for r in rows]) for m in numeric},
        "rules": [{"metric": r.metric, "kind": r.kind, "threshold": r.threshold} for r in rules_from_config(cfg)],
    }


def write_csv(rows: list[dict], path: Path) -> None:
    """results.csv: file, width, height, pass, reason, then every metric (NaN → empty)."""
    columns = ["file", "width", "height", "pass", "reason", *METRICS]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if isinstance(r[c], float) and not math.isfinite(r[c])
                             else f"{r[c]:.6g}" if isinstance(r[c], float) else r[c] for c in columns])


def _badness(row: dict, cfg: CircularityConfig) -> float:
    """How far an image is from passing (largest relative rule violation; detection failures worst)."""
    if not row["pupil_found"]:
        return math.inf
    if not row["iris_found"]:
        return 1e9
    worst = -math.inf
    for rule in rules_from_config(cfg):
        v = row[rule.metric]
        if not math.isfinite(v):
            return 1e8
        excess = (rule.threshold - v) if rule.kind == "min" else (v - rule.threshold)
        worst = max(worst, excess / max(abs(rule.threshold), 1e-6))
    return worst


def write_worst_sheet(folder: Path, rows: list[dict], cfg: CircularityConfig, path: Path) -> None:
    """Contact sheet of the images furthest from passing, with their boundaries drawn."""
    from pipeline.check.plots import contact_sheet

    worst = sorted(rows, key=lambda r: -_badness(r, cfg))[:WORST_COUNT]
    tiles, captions = [], []
    for r in worst:
        img = read_image(folder / r["file"])
        metrics, geometry = analyze_with_geometry(img, cfg)
        tiles.append(draw_overlay(img, metrics, geometry))
        captions.append(f"{r['file'][-28:]}\n{r['reason'] or 'pass'}")
    contact_sheet(tiles, captions, path, title=f"{folder.name}: {len(worst)} worst of {len(rows)}")


def _plot_groups(groups: dict[str, list[dict]], path: Path, cfg: CircularityConfig, title: str) -> None:
    from pipeline.check.plots import plot_histograms

    thresholds: dict[str, list[float]] = {}
    for rule in rules_from_config(cfg):
        thresholds.setdefault(rule.metric, []).append(rule.threshold)
    data = {label: {m: [r[m] for r in rows] for m in PLOT_METRICS} for label, rows in groups.items()}
    plot_histograms(data, path, PLOT_METRICS, thresholds, title=title)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def console_table(summaries: list[tuple[str, dict]]) -> str:
    """A few lines: counts, pass rate, key medians, top failure reasons, one column per folder."""
    width = max(12, *(len(label) for label, _ in summaries))
    head = f"{'':24s}" + "".join(f"{label[:width]:>{width + 2}s}" for label, _ in summaries)
    lines = [head]

    def row(name: str, values: list[str]) -> None:
        lines.append(f"{name:24s}" + "".join(f"{v:>{width + 2}s}" for v in values))

    row("images (unreadable)", [f"{s['n_analysed']} ({s['n_unreadable']})" for _, s in summaries])
    row("pass rate", [f"{100 * s['pass_rate']:.1f}%" for _, s in summaries])
    row("pupil / iris found", [f"{100 * s['pupil_found_rate']:.0f}% / {100 * s['iris_found_rate']:.0f}%" for _, s in summaries])
    for m in TABLE_METRICS:
        row(f"median {m}", [_fmt(s["metrics"][m]["median"]) for _, s in summaries])
    for label, s in summaries:
        top = ", ".join(f"{k} {v}" for k, v in list(s["failure_reasons"].items())[:4]) or "none"
        lines.append(f"failures ({label}): {top}")
    return "\n".join(lines)


def _distances(rows_a: list[dict], rows_b: list[dict], folder_a: Path, folder_b: Path,
               inception: str | None) -> dict:
    """Proxy FD/KID always; FID/KID on Inception features when a local weights file is given."""
    from pipeline.check.metrics import PROXY_NOTE, fid_from_features, kid, load_inception_features

    out: dict = {}
    fa = np.array([r["_features"] for r in rows_a])
    fb = np.array([r["_features"] for r in rows_b])
    if min(len(fa), len(fb)) >= 2:
        mean, std = kid(fa, fb, subsets=100, subset_size=1000)
        out.update(proxy_fd=fid_from_features(fa, fb), proxy_kid_mean=mean, proxy_kid_std=std, proxy_note=PROXY_NOTE)
    if inception:
        extract = load_inception_features(inception)

        def feats(folder: Path, rows: list[dict]) -> np.ndarray:
            batch = [cv2.resize(to_grey_unit(read_image(folder / r["file"])), (299, 299), interpolation=cv2.INTER_AREA)
                     for r in rows]
            return extract(np.stack(batch)[:, None] * 2.0 - 1.0)

        ia, ib = feats(folder_a, rows_a), feats(folder_b, rows_b)
        mean, std = kid(ia, ib, subsets=100, subset_size=1000)
        out.update(fid=fid_from_features(ia, ib), kid_mean=mean, kid_std=std, inception_weights=str(inception))
    return out


# --------------------------------------------------------------------------------------------
# Command line


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="circularity-check",
        description="Check whether the pupils and irises in a folder of iris images are round, concentric "
                    "and separated. Exit code 1 when the pass rate is below --fail-under, 2 on usage errors.",
    )
    parser.add_argument("folder", metavar="DIR", help="folder of images (searched recursively)")
    add_config_args(parser)
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <DIR>_circularity beside DIR)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes measuring images (default: min(4, CPUs)); 1 runs inline")
    parser.add_argument("--overlays", action="store_true", help="also write every image with its boundaries")
    parser.add_argument("--fail-under", type=float, metavar="RATE",
                        help="exit with code 1 when the pass rate (0..1) is below RATE")
    parser.add_argument("--reference", metavar="DIR", help="a second folder to compare with, side by side")
    parser.add_argument("--inception-weights", metavar="FILE",
                        help="local TorchScript Inception-v3 feature file for FID/KID with --reference")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.fail_under is not None and not 0.0 <= args.fail_under <= 1.0:
        raise UserError(f"--fail-under is a pass rate between 0 and 1, got {args.fail_under}")
    if args.inception_weights and not args.reference:
        raise UserError("--inception-weights needs --reference (FID compares two folders)")
    return args


def _inputs(args: argparse.Namespace) -> tuple[CircularityConfig, Path, Path | None, Path]:
    """Config, folder, reference folder and output folder; UserError for anything unusable."""
    cfg = config_from_args(args).circularity
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}" if not folder.exists() else f"not a folder: {folder}")
    reference = Path(args.reference) if args.reference else None
    if reference is not None and not reference.is_dir():
        raise UserError(f"reference folder not found: {reference}")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        from pipeline.check.metrics import INCEPTION_HELP

        raise UserError(f"Inception weights not found: {args.inception_weights} ({INCEPTION_HELP})")
    resolved = folder.resolve()
    out = Path(args.out) if args.out else resolved.parent / f"{resolved.name}_circularity"
    return cfg, folder, reference, prepare_out_dir(out, args.overwrite)


def _report(args: argparse.Namespace, cfg: CircularityConfig, folder: Path, reference: Path | None,
            tmp: Path, exclude: tuple[Path, ...]) -> tuple[dict, list[tuple[str, dict]], dict | None]:
    """Measure the folder(s) and write every output into `tmp`: (summary, table columns, comparison)."""
    start = time.perf_counter()
    rows, bad = analyze_folder(folder, cfg, args.workers, tmp / "overlays" if args.overlays else None,
                               reference is not None, exclude)
    if not rows:
        raise UserError(f"none of the {len(bad)} image file(s) in {folder} could be read")
    seconds = time.perf_counter() - start
    summary = summarize(folder, rows, bad, cfg)
    summary.update(seconds=seconds, images_per_second=len(rows) / seconds if seconds > 0 else None,
                   workers=args.workers, fail_under=args.fail_under, config=dataclasses.asdict(cfg))
    write_csv(rows, tmp / "results.csv")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    label = folder.name or "images"
    _plot_groups({label: rows}, tmp / "histograms.png", cfg,
                 f"{label}: pass rate {100 * summary['pass_rate']:.1f}% of {len(rows)}")
    write_worst_sheet(folder, rows, cfg, tmp / "worst.png")
    if reference is None:
        return summary, [(label, summary)], None
    ref_rows, ref_bad = analyze_folder(reference, cfg, args.workers, None, True, exclude)
    if not ref_rows:
        raise UserError(f"none of the {len(ref_bad)} image file(s) in {reference} could be read")
    ref_summary = summarize(reference, ref_rows, ref_bad, cfg)
    ref_label = reference.name or "reference"
    if ref_label == label:
        label, ref_label = f"{label} (DIR)", f"{ref_label} (reference)"
    comparison = {
        "folder": {k: v for k, v in summary.items() if k != "unreadable"},
        "reference": {k: v for k, v in ref_summary.items() if k != "unreadable"},
        "distances": _distances(rows, ref_rows, folder, reference, args.inception_weights),
    }
    (tmp / "comparison.json").write_text(json.dumps(comparison, indent=2, default=_json_default))
    _plot_groups({label: rows, ref_label: ref_rows}, tmp / "comparison.png", cfg, f"{label} vs {ref_label}")
    return summary, [(label, summary), (ref_label, ref_summary)], comparison


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `circularity-check`."""
    args = _parse(argv)
    cfg, folder, reference, out = _inputs(args)
    tmp = temp_dir_for(out.resolve())
    try:
        summary, tables, comparison = _report(args, cfg, folder, reference, tmp, (out.resolve(), tmp))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(console_table(tables))
    if comparison is not None:
        dist = comparison["distances"]
        if "proxy_fd" in dist:
            print(f"proxy FD {dist['proxy_fd']:.4g}, proxy KID {dist['proxy_kid_mean']:.4g} ± "
                  f"{dist['proxy_kid_std']:.2g} (proxy features, not Inception)")
        if "fid" in dist:
            print(f"FID {dist['fid']:.4g}, KID {dist['kid_mean']:.4g} ± {dist['kid_std']:.2g} (Inception-v3)")
    written = ["results.csv", "summary.json", "histograms.png", "worst.png"]
    written += ["overlays/"] * args.overlays + ["comparison.json", "comparison.png"] * (comparison is not None)
    print(f"wrote {out}/ ({', '.join(written)})")
    if args.fail_under is not None and summary["pass_rate"] < args.fail_under:
        print(f"pass rate {summary['pass_rate']:.3f} is below --fail-under {args.fail_under}", file=sys.stderr)
        return 1
    return 0


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
