"""`circularity-check DIR`: are the pupils and irises in a folder of iris images round, concentric
and separated? One row per image, a summary, plots, and an exit code usable in CI.

    circularity-check samples/ [--config configs/circularity.yaml] [--set circularity.KEY=VALUE]
                      [--out DIR] [--workers N] [--overlays] [--fail-under RATE]
                      [--reference DIR [--metrics proxy|inception] [--inception-weights FILE]]
                      [--overwrite]

Images are found recursively (png, jpg, bmp, tif; hidden files and folders skipped) and measured
at their own size; 8/16-bit, grey/RGB/RGBA all work. Unreadable files are listed and skipped.
Output (default `<DIR>_circularity` beside DIR; built in a temp folder, renamed when complete):
  results.csv     one row per image: file, size, pass, reason, every metric
  summary.json    counts, pass rate, mean/median/p5/p95 per metric, failure reasons, thresholds
  histograms.png  metric histograms with the thresholds
  worst.png       contact sheet of the worst images with their fitted boundaries
  overlays/       (--overlays) every image with its boundaries: green pass, red fail
  comparison.json, comparison.png  (--reference) the two folders side by side, plus distribution
                  distances: proxy FD/KID always (not Inception!); real FID/KID on clean-fid's
                  Inception-v3 with --metrics inception (the extra `metrics`; weights from
                  --inception-weights FILE or clean-fid's cache, never downloaded)
Exit codes: 0 done; 1 pass rate below --fail-under; 2 usage error (bad folder, config, option).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.check import POOL_PRELOAD
from pipeline.cli.entry import (
    add_config_args,
    add_metrics_args,
    cli_entry,
    config_from_args,
    exit_without_teardown,
)
from pipeline.common.config import CircularityConfig
from pipeline.common.errors import UserError
from pipeline.common.files import building, numpy_json_default, prepare_out_dir
from pipeline.common.pool import start_pool_server

if TYPE_CHECKING:
    from pipeline.check.inception import InceptionFeatures


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="circularity-check",
        description="Check whether the pupils and irises in a folder of iris images are round, concentric "
                    "and separated. Exit code 1 when the pass rate is below --fail-under, 2 on usage errors.",
    )
    parser.add_argument("folder", metavar="DIR", help="folder of images (searched recursively)")
    add_config_args(parser, example="circularity.max_concentricity=0.1")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <DIR>_circularity beside DIR)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes measuring images (default: min(4, CPUs)); 1 runs inline")
    parser.add_argument("--overlays", action="store_true", help="also write every image with its boundaries")
    parser.add_argument("--fail-under", type=float, metavar="RATE",
                        help="exit with code 1 when the pass rate (0..1) is below RATE")
    parser.add_argument("--reference", metavar="DIR", help="a second folder to compare with, side by side")
    add_metrics_args(parser, "distances with --reference (proxy FD/KID always; inception adds real FID/KID)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.fail_under is not None and not 0.0 <= args.fail_under <= 1.0:
        raise UserError(f"--fail-under is a pass rate between 0 and 1, got {args.fail_under}")
    if args.metrics == "inception" and not args.reference:
        raise UserError("--metrics inception needs --reference (FID compares two folders)")
    if args.inception_weights and args.metrics != "inception":
        raise UserError("--inception-weights goes with --metrics inception")
    return args


def _inputs(args: argparse.Namespace) -> tuple[CircularityConfig, Path, Path | None, Path,
                                               InceptionFeatures | None]:
    """Config, folder, reference folder, output folder and (--metrics inception) the Inception
    features; UserError for anything unusable."""
    cfg = config_from_args(args).circularity
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}" if not folder.exists() else f"not a folder: {folder}")
    reference = Path(args.reference) if args.reference else None
    if reference is not None and not reference.is_dir():
        raise UserError(f"reference folder not found: {reference}")
    inception = None
    if args.metrics == "inception":
        from pipeline.check.inception import InceptionFeatures
        from pipeline.common.devices import pick_torch_device

        inception = InceptionFeatures(args.inception_weights, device=pick_torch_device("auto"))
    resolved = folder.resolve()
    out = Path(args.out) if args.out else resolved.parent / f"{resolved.name}_circularity"
    return cfg, folder, reference, prepare_out_dir(out, args.overwrite), inception


def _report(args: argparse.Namespace, cfg: CircularityConfig, folder: Path, reference: Path | None,
            inception: InceptionFeatures | None, tmp: Path,
            exclude: tuple[Path, ...]) -> tuple[dict, list[tuple[str, dict]], dict | None]:
    """Measure the folder(s) and write every output into `tmp`: (summary, table columns, comparison)."""
    from pipeline.check.folder import analyze_folder
    from pipeline.check.summary import (
        distances,
        plot_groups,
        summarize,
        worst_rows,
        write_csv,
        write_worst_sheet,
    )

    start = time.perf_counter()
    rows, bad = analyze_folder(folder, cfg, args.workers, tmp / "overlays" if args.overlays else None,
                               reference is not None, exclude, worst_rows(cfg))
    if not rows:
        raise UserError(f"none of the {len(bad)} image file(s) in {folder} could be read")
    seconds = time.perf_counter() - start
    summary = summarize(folder, rows, bad, cfg)
    summary.update(seconds=seconds, images_per_second=len(rows) / seconds if seconds > 0 else None,
                   workers=args.workers, fail_under=args.fail_under, config=dataclasses.asdict(cfg))
    label = folder.name or "images"
    with ThreadPoolExecutor(1) as drawing:  # OpenCV draws and encodes without the GIL: the sheet beside the rest
        sheet = drawing.submit(write_worst_sheet, folder, rows, cfg, tmp / "worst.png")
        write_csv(rows, tmp / "results.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=numpy_json_default))
        plot_groups({label: rows}, tmp / "histograms.png", cfg,
                     f"{label}: pass rate {100 * summary['pass_rate']:.1f}% of {len(rows)}")
        sheet.result()
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
        "distances": distances(rows, ref_rows, folder, reference, inception),
    }
    (tmp / "comparison.json").write_text(json.dumps(comparison, indent=2, default=numpy_json_default))
    plot_groups({label: rows, ref_label: ref_rows}, tmp / "comparison.png", cfg, f"{label} vs {ref_label}")
    return summary, [(label, summary), (ref_label, ref_summary)], comparison


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `circularity-check`."""
    args = _parse(argv)
    if args.workers > 1:  # the workers' server starts first: its imports overlap ours (measurement, NumPy, OpenCV)
        start_pool_server(POOL_PRELOAD)
    from pipeline.check.summary import console_table

    cfg, folder, reference, out, inception = _inputs(args)
    with building(out.resolve()) as tmp:
        summary, tables, comparison = _report(args, cfg, folder, reference, inception, tmp, (out.resolve(), tmp))
    print(console_table(tables))
    if comparison is not None:
        dist = comparison["distances"]
        if "proxy_fd" in dist:
            print(f"proxy FD {dist['proxy_fd']:.4g}, proxy KID {dist['proxy_kid_mean']:.4g} ± "
                  f"{dist['proxy_kid_std']:.2g} (proxy features, not Inception)")
        if "fid" in dist:
            print(f"FID {dist['fid']:.4g}, KID {dist['kid_mean']:.4g} ± {dist['kid_std']:.2g} on {dist['features']} features")
    written = ["results.csv", "summary.json", "histograms.png", "worst.png"]
    written += ["overlays/"] * args.overlays + ["comparison.json", "comparison.png"] * (comparison is not None)
    print(f"wrote {out}/ ({', '.join(written)})")
    if args.fail_under is not None and summary["pass_rate"] < args.fail_under:
        print(f"pass rate {summary['pass_rate']:.3f} is below --fail-under {args.fail_under}", file=sys.stderr)
        return 1
    return 0


run = exit_without_teardown(main)  # the console script: a quick command, its exit kept quick

if __name__ == "__main__":
    run()
