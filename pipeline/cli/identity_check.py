"""`identity-check GENERATED`: are generated irises distinct identities, and not copies of training
eyes? Daugman's iris codes and Hamming distances (HD).

    identity-check GENERATED [--train DIR_OR_CACHE] [--reference REAL_DIR] [--out DIR]
                   [--workers N] [--config FILE] [--set identity.KEY=VALUE] [--overwrite]

GENERATED, --train and --reference are folders of images (searched recursively) or prepare-data
caches (a dataset.npz, or the folder holding one). Every image becomes an iris code; one without a
usable code is listed with its reason (unreadable, no pupil, no iris boundary, too little iris
visible). Reported: the impostor HD distribution of the generated images (all pairs, or up to
`identity.max_pairs` sampled with `identity.seed`): mean, std, min and Daugman's degrees of freedom;
the same for the --reference set beside it; with --train, each generated image's nearest training
image, a near-copy below `identity.near_copy_hd` (0.32, Daugman's decision criterion).
Output (default `<GENERATED>_identity` beside it; built in a temp folder, renamed when complete):
  codes.csv       one row per image of every set: set, file, size, usable, reason, usable bits
  pairs.csv       the impostor pairs compared: set, a, b, hd, raw_hd, bits
  nearest.csv     (--train) file, nearest training file, hd, raw_hd, bits, near_copy; nearest first
  summary.json    counts, unusable reasons, sizes, impostor statistics, nearest-training figures, settings
  histograms.png  the HD distributions overlaid, with the near-copy threshold
  closest.png     the closest generated/training pairs side by side (without --train: the closest
                  generated pairs)
Exit codes: 0 done; 2 usage error (missing or empty folder, no usable iris, output exists, bad setting).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.errors import UserError
from pipeline.common.files import building, prepare_out_dir
from pipeline.identity import check_identity, check_settings
from pipeline.identity_report import console_table


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="identity-check",
        description="Iris codes of generated eyes: are they distinct identities (impostor Hamming distances), "
                    "and not copies of training eyes (nearest training HD)? Exit code 2 on usage errors.",
    )
    parser.add_argument("generated", metavar="GENERATED", help="folder of generated images, or a prepare-data cache")
    parser.add_argument("--train", metavar="DIR_OR_CACHE",
                        help="training images (folder, dataset.npz or a prepare-data output): find near-copies")
    parser.add_argument("--reference", metavar="REAL_DIR",
                        help="real images (folder or cache): their impostor statistics side by side")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <GENERATED>_identity beside it)")
    parser.add_argument("--workers", type=int, help="processes coding images (default: identity.workers; "
                        "0 → min(4, CPUs)); 1 runs inline")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_config_args(parser, example="identity.near_copy_hd=0.3")
    return parser.parse_args(argv)


def _existing(path: str | None, what: str) -> Path | None:
    """`path` as a Path, or UserError when nothing is there."""
    if path is None:
        return None
    if not Path(path).exists():
        raise UserError(f"{what} not found: {path}")
    return Path(path)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `identity-check`."""
    args = _parse(argv)
    if args.workers is not None:
        args.overrides = [*args.overrides, f"identity.workers={args.workers}"]
    cfg = config_from_args(args)
    check_settings(cfg.identity)
    generated = _existing(args.generated, "generated images")
    train, reference = _existing(args.train, "training images"), _existing(args.reference, "reference images")
    resolved = generated.resolve()
    stem = resolved.stem if resolved.is_file() else resolved.name
    out = prepare_out_dir(Path(args.out) if args.out else resolved.parent / f"{stem}_identity", args.overwrite)
    with building(out.resolve()) as tmp:
        summary = check_identity(generated, train, reference, tmp, cfg.identity, cfg.circularity,
                                 exclude=(out.resolve(), tmp))
    print(console_table(summary))
    written = ["codes.csv", "pairs.csv", *["nearest.csv"] * (train is not None), "summary.json", "histograms.png",
               *["closest.png"] * (train is not None or summary["generated"]["impostor"] is not None)]
    print(f"wrote {out}/ ({', '.join(written)})")
    return 0


if __name__ == "__main__":
    main()
