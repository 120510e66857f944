"""`synthetic-irises OUT --n 1000 --size 128 [--defects 0.2]`: write the built-in synthetic eyes as
PNGs with their ground truth in labels.json."""

from __future__ import annotations

import argparse

from pipeline.cli.entry import cli_entry
from pipeline.common.errors import UserError
from pipeline.data.synthetic import write_dataset


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Console script `synthetic-irises`."""
    parser = argparse.ArgumentParser(prog="synthetic-irises", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 = grey, 3 = RGB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defects", type=float, default=0.0, help="fraction of images with a defect")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    final = write_dataset(args.out, args.n, args.size, args.seed, args.channels, args.defects, args.overwrite)
    print(f"wrote {args.n} images and labels.json to {final}")
    return 0


if __name__ == "__main__":
    main()
