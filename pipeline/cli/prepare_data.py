"""`prepare-data SRC OUT`: real near-infrared iris frames → iris-centred training crops, labels and
a cache that `data.path` takes.

    prepare-data SRC OUT [--size 128] [--margin 1.2] [--workers N] [--overwrite]
                 [--config FILE] [--set prepare.KEY=VALUE]

Frames are found recursively under SRC (png, jpg, jpeg, bmp, tif, tiff in any letter case; hidden
files and folders skipped) and measured at their own size: 8/16-bit, grey or RGB, 320x240, 640x480
or any other size of 64 px or more, the eye anywhere in the frame. Each kept frame becomes a square
of side 2 · margin · iris radius centred on the iris (reflect-padded where it leaves the frame),
resized to --size and converted to `prepare.channels` (1 grey, 3 RGB). A frame is rejected, with
its reason in rejects.csv, when it is unreadable, too small, has no pupil or no limbus, has more
than `prepare.max_iris_outside` (10 %) of its iris outside the frame ("iris cut by frame"), or less
than `prepare.min_usable_iris_area` (0.5) of its iris annulus unoccluded ("occluded").
Output (built in a temp folder beside OUT, renamed when complete):
  images/000000.png …  the crops (16-bit where the frame was)
  labels.json          per crop: source, pupil and iris circles in the crop's pixels, crop box,
                       scale and padding in the frame's, quality figures
  rejects.csv          file, reason, detail
  dataset.npz          the crops, labels and settings in one file: train with --set data.path=OUT
                       (or OUT/dataset.npz)
  summary.json         counts, rejects by reason, seconds, frames/s, settings
When no frame is kept, OUT holds only rejects.csv and summary.json and the exit code is 2.
Exit codes: 0 done; 2 usage error (bad folder, no images, OUT exists, bad setting, nothing kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.errors import UserError
from pipeline.common.files import building, prepare_out_dir
from pipeline.prepare import prepare_folder, summary_line

WRITTEN = "images/, labels.json, rejects.csv, dataset.npz, summary.json"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare-data",
        description="Crop real iris frames to iris-centred training images, with labels, a reject list "
                    "and a one-read cache for data.path. Exit code 2 on usage errors or when no frame is kept.",
    )
    parser.add_argument("src", metavar="SRC", help="folder of frames (searched recursively)")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--size", type=int, help="side of the crops in pixels (default: prepare.size, 128)")
    parser.add_argument("--margin", type=float,
                        help="crop side / iris diameter (default: prepare.margin, 1.2)")
    parser.add_argument("--workers", type=int, help="processes measuring frames (default: prepare.workers; "
                        "0 → min(4, CPUs)); 1 runs inline")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    add_config_args(parser, example="prepare.margin=1.3")
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `prepare-data`."""
    args = _parse(argv)
    flags = [f"prepare.{k}={v}" for k in ("size", "margin", "workers") if (v := getattr(args, k)) is not None]
    args.overrides = [*args.overrides, *flags]
    cfg = config_from_args(args)
    src = Path(args.src)
    if not src.is_dir():
        raise UserError(f"folder not found: {src}" if not src.exists() else f"not a folder: {src}")
    out = prepare_out_dir(args.out, args.overwrite)
    with building(out.resolve()) as tmp:
        summary = prepare_folder(src, tmp, cfg.prepare, cfg.circularity, exclude=(out.resolve(), tmp))
    print(summary_line(summary))
    if not summary["kept"]:
        raise UserError(f"no frame kept of {summary['frames']}; see {out / 'rejects.csv'}")
    print(f"wrote {out}/ ({WRITTEN})")
    return 0


if __name__ == "__main__":
    main()
