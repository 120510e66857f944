"""`export RUN_DIR --out hf/`: a trained diffusion run as a diffusers folder with a model card
(`pipeline.export`).

    export runs/hp2 --out hf/                       the slowest EMA the run saved
    export runs/hp2 --out hf/ --ema 0               the raw weights
    export runs/hp2 --out hf/ --eval runs/samples   pass rate and KID from circularity-check on the card

Writes hf/unet/ (config.json, diffusion_pytorch_model.safetensors), hf/scheduler/scheduler_config.json,
hf/model_index.json (a DDPMPipeline) and hf/README.md. The model and schedule come from the
checkpoint; `--config`/`--set` give the sampling settings the scheduler takes over
(generate.clip_denoised → clip_sample, generate.use_ema when --ema is not given). Needs the
`export` extra (diffusers).
"""

from __future__ import annotations

import argparse

from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.export import export_run, require_diffusers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export",
        description="Write a train-diffusion run as a diffusers folder (DDPMPipeline: UNet2DModel + "
        "DDPMScheduler) with a model card.",
    )
    parser.add_argument("run", metavar="RUN_DIR", help="train-diffusion run or checkpoint folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (e.g. hf/)")
    parser.add_argument("--ema", type=float, default=None, metavar="RATE",
                        help="EMA rate of the weights to export; 0 = raw weights (default: the slowest EMA saved)")
    parser.add_argument("--eval", metavar="DIR", dest="eval_dir",
                        help="a generate output folder checked by circularity-check (or the check's folder): "
                        "its pass rate and KID go on the model card (else: not measured)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_config_args(parser, example="generate.clip_denoised=false")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Console script `export`."""
    args = build_parser().parse_args(argv)
    require_diffusers()
    gen = config_from_args(args).generate
    ema = gen.use_ema if args.ema is None else args.ema
    done = export_run(args.run, args.out, ema_rate=None if ema < 0 else ema, clip_sample=gen.clip_denoised,
                      eval_dir=args.eval_dir, overwrite=args.overwrite)
    info = done.info
    weights = f"EMA {info['ema_rate']}" if info["ema_rate"] else "raw weights"
    measured = (f"pass rate {100 * done.evaluation['pass_rate']:.1f}%" if done.evaluation
                else "pass rate and KID not measured")
    print(f"wrote {done.out}/ (unet/, scheduler/, model_index.json, README.md) from {info['checkpoint']} "
          f"(step {info['step']}, {weights}; max |diffusers - ours| {done.max_abs_difference:.2g}; {measured})")
    return 0


if __name__ == "__main__":
    main()
