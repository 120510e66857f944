"""`train-vae`: train the stage-1 Keras VAE, or (`--sample N --from VAE.keras`) write priors as PNGs.

    train-vae --config configs/vae.yaml [--set vae.epochs=20] [--out runs/vae]
    train-vae --resume runs/vae [--set vae.epochs=40]
    train-vae --sample 16 --from runs/vae/vae.keras --out runs/priors
    train-vae --config configs/vae.yaml --set vae.condition=geometry --out runs/vae-geometry

With vae.condition=geometry the VAE is conditional (a CVAE) on each image's geometry
(`pipeline.data.geometry`: pupil/iris ratio, iris radius, pupil offset), read from the labels of the
data: the synthetic generator's records, a prepare-data cache's or a folder's labels.json.

Loads the images and runs `vae.train`; the run folder's contents are described there. The first
SIGINT (Ctrl-C) or SIGTERM lets the current step finish, saves `last.keras` there and exits with
130 or 143; `--resume RUN_DIR` then goes on as if never stopped (with the run's own config.yaml
unless --config is given). A second signal aborts at once (the last complete `last.keras` stays).

`--resume` takes the run folder, as `train-diffusion --resume RUN_DIR` does. The older spelling
`--out RUN_DIR --resume` (a bare flag) still works in this release, with a deprecation warning.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.config import load_config
from pipeline.common.errors import UserError
from pipeline.common.interrupts import GracefulStop, TrainingInterrupted
from pipeline.data.folders import load_image_array
from pipeline.data.geometry import load_geometry, mirror
from vae.train import ConditionSource, train, write_priors

log = logging.getLogger(__name__)

DEFAULT_OUT = "runs/vae"
RESUME_OUT = object()  # `--resume` without a folder: the deprecated `--out DIR --resume`


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train-vae", description="Train the stage-1 Keras VAE on iris images, or sample priors from one.")
    add_config_args(parser, example="vae.epochs=40")
    parser.add_argument("--out", metavar="DIR", help=f"run folder (default: {DEFAULT_OUT}); with --sample, "
                        "the folder for the prior PNGs")
    parser.add_argument("--resume", nargs="?", const=RESUME_OUT, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last.keras (a bare --resume, continuing "
                        "--out, is deprecated)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--sample", type=int, metavar="N", help="instead of training, write N priors as PNGs")
    parser.add_argument("--from", dest="from_path", metavar="VAE.keras", help="the VAE to sample (with --sample)")
    parser.add_argument("--seed", type=int, help="latent seed for --sample (default: generate.seed)")
    parser.add_argument("--temperature", type=float, help="latent temperature for --sample "
                        "(default: generate.temperature)")
    return parser


def _sample(args: argparse.Namespace) -> int:
    """`--sample N --from VAE.keras --out DIR`."""
    if args.resume is not None:
        raise UserError("--sample and --resume cannot be combined")
    if not args.from_path or not args.out:
        raise UserError("--sample needs --from VAE.keras and --out DIR")
    cfg = config_from_args(args)
    seed = cfg.generate.seed if args.seed is None else args.seed
    temperature = cfg.generate.temperature if args.temperature is None else args.temperature
    explicit = cfg if args.config or args.overrides else None
    out = write_priors(args.from_path, args.out, args.sample, seed, temperature, args.overwrite, explicit)
    print(f"wrote {args.sample} priors and grid.png to {out}")
    return 0


def run_folder(args: argparse.Namespace) -> tuple[Path, bool]:
    """The run folder and whether to resume it: `--resume RUN_DIR`, the deprecated `--out DIR --resume`
    (warned), or a new run in --out."""
    if args.resume is None:
        return Path(args.out or DEFAULT_OUT), False
    if args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if args.resume is RESUME_OUT:
        out = Path(args.out or DEFAULT_OUT)
        log.warning("warning: 'train-vae --out DIR --resume' is deprecated and goes in the next release; "
                    "use 'train-vae --resume %s'", out)
        return out, True
    out = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != out.resolve():
        raise UserError("--resume continues in the run folder itself; drop --out (or give the same path)")
    return out, True


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `train-vae`."""
    args = _parser().parse_args(argv)
    if args.sample is not None:
        return _sample(args)
    if args.from_path or args.seed is not None or args.temperature is not None:
        raise UserError("--from, --seed and --temperature only apply with --sample")
    out, resume = run_folder(args)
    if resume and not args.config:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise UserError(f"nothing to resume: {saved} not found")
        cfg = load_config(saved, args.overrides)
    else:
        cfg = config_from_args(args)
    conditions = ConditionSource(partial(load_geometry, cfg.data), mirror) if cfg.vae.condition == "geometry" else None
    with GracefulStop() as stop:
        try:
            train(cfg, partial(load_image_array, cfg.data), out, resume=resume, overwrite=args.overwrite,
                  stop=stop, conditions=conditions)
        except TrainingInterrupted as exc:
            print(f"{exc}; continue with: train-vae --resume {out}", file=sys.stderr)
            return exc.exit_code
    print(f"wrote {out / 'vae.keras'} (best), {out / 'last.keras'}, log.csv, loss.png and samples/ in {out}")
    return 0


if __name__ == "__main__":
    main()
