"""`synthetic-irises OUT --n 1000 --size 128 [--defects 0.2]`: write the built-in synthetic eyes as
PNGs with their ground truth in labels.json.

`synthetic-irises OUT --frame 640x480 --n 200 [--occluded 0.2 --cut 0.1] [--format bmp]` writes camera
frames instead (the eye anywhere, of any size; pipeline.data.synthetic_frames): something to try
`prepare-data` and `circularity-check` on before your own frames, with the truth beside them.

`synthetic-irises OUT --identities 50 --captures 4 [--size 128]` writes 4 captures of each of 50 eyes
(pipeline.data.synthetic_identities: one iris texture per eye; pupil, rotation, lids and noise per
capture), labelled with identity and capture: genuine and impostor pairs with a known answer."""

from __future__ import annotations

import argparse

from pipeline.cli.entry import cli_entry
from pipeline.common.errors import UserError
from pipeline.data.synthetic import write_dataset
from pipeline.data.synthetic_frames import write_frames
from pipeline.data.synthetic_identities import write_identities


def _write_identities(args: argparse.Namespace) -> None:
    """The --identities mode: its own options only, both counts >= 1."""
    others = [flag for flag, value in (("--frame", args.frame), ("--defects", args.defects), ("--n", args.n),
                                       ("--channels", args.channels)) if value is not None]
    if others:
        raise UserError(f"--identities cannot be combined with {', '.join(others)}")
    if args.identities is None or args.captures is None:
        raise UserError("--identities N and --captures K go together")
    if min(args.identities, args.captures) < 1:
        raise UserError(f"--identities and --captures must be >= 1, got {args.identities} and {args.captures}")
    final = write_identities(args.out, args.identities, args.captures, args.size, args.seed, args.overwrite)
    print(f"wrote {args.captures} captures of each of {args.identities} eyes and labels.json to {final}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Console script `synthetic-irises`."""
    parser = argparse.ArgumentParser(prog="synthetic-irises", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--n", type=int, help="number of images (default 1000)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 = grey (default), 3 = RGB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defects", type=float, help="fraction of images with a defect (default 0)")
    parser.add_argument("--frame", metavar="WxH", help="write camera frames of this size (e.g. 640x480) instead")
    parser.add_argument("--occluded", type=float, default=0.0, help="with --frame: share of heavily occluded eyes")
    parser.add_argument("--cut", type=float, default=0.0, help="with --frame: share of eyes cut by the frame's edge")
    parser.add_argument("--format", default="bmp", choices=("bmp", "png", "tif"), help="with --frame: file format (default bmp)")
    parser.add_argument("--identities", type=int, metavar="N", help="write --captures K captures of each of N eyes instead")
    parser.add_argument("--captures", type=int, metavar="K", help="with --identities: captures per eye")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if args.identities is not None or args.captures is not None:
        _write_identities(args)
        return 0
    n = 1000 if args.n is None else args.n
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if args.frame:
        width, _, height = args.frame.lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise UserError(f"--frame must be WIDTHxHEIGHT, e.g. 640x480, got {args.frame!r}")
        final = write_frames(args.out, n, int(height), int(width), args.seed, (args.occluded, args.cut),
                             args.format, args.overwrite)
        print(f"wrote {n} {width}x{height} frames and labels.json to {final}")
        return 0
    final = write_dataset(args.out, n, args.size, args.seed, args.channels or 1, args.defects or 0.0, args.overwrite)
    print(f"wrote {n} images and labels.json to {final}")
    return 0


if __name__ == "__main__":
    main()
