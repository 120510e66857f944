"""`generate`: iris images from VAE priors (or your own prior images, or pure noise) by partial
noising and diffusion denoising; writes the images, grid.png and metadata.json (`pipeline.generate`).

    generate --from-vae runs/vae/vae.keras --diffusion runs/diffusion --n 64 --strength 0.5
    generate --from-noise --diffusion runs/diffusion --n 64 --sampler dpm++2m --steps 15
    generate … --index 17          re-make image 17 of the run the other arguments describe
    generate … --format bmp        000000.bmp … (--format tiff --bits 16: 16-bit 000000.tif …)
    generate --from-vae runs/vae-geometry/vae.keras … --pupil-ratio 0.25:0.65 --n 9
                                   a dilation sweep (a geometry VAE: train-vae --set vae.condition=geometry)
    generate … --pupil-ratio 0.45 --geometry-feedback 3 --geometry-tolerance 0.02
                                   re-make images that miss their target (up to 3 rounds; 0 = open loop)
"""

from __future__ import annotations

import argparse
import dataclasses

from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.config import GenerateConfig
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir
from pipeline.generate import generate, image_suffix, write_generation
from pipeline.geometry_feedback import check_feedback
from pipeline.geometry_targets import request_from_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate",
        description="Generate iris images: VAE priors → partial noising → diffusion denoising "
        "(or from your own prior images, or from pure noise for comparison).",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-vae", metavar="VAE.keras", help="sample priors from this trained VAE")
    src.add_argument("--from-images", metavar="DIR", help="use the images in DIR as priors")
    src.add_argument("--from-noise", action="store_true", help="vanilla diffusion from pure noise")
    parser.add_argument("--diffusion", required=True, metavar="RUN_DIR", help="train-diffusion run or checkpoint dir")
    parser.add_argument("--out", default="runs/generate", help="output folder (default: runs/generate)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_config_args(parser, example="generate.steps=25")
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    for name, kind, text in (
        ("n", int, "number of images"),
        ("strength", float, "noise level the priors are raised to: 0 = priors unchanged, 1 = pure noise"),
        ("sampler", str, "ddim | ddpm | dpm++2m"),
        ("steps", int, "respaced sampling steps over the full schedule"),
        ("eta", float, "DDIM stochasticity (0 = deterministic)"),
        ("seed", int, "random seed"),
        ("batch_size", int, "images per network batch; 0 = 64 on CUDA, 16 elsewhere"),
        ("temperature", float, "VAE latent temperature"),
        ("precision", str, "network precision: auto | fp32 | bf16 | fp16 (auto: bf16 on capable GPUs, fp32 on CPU)"),
        ("format", str, "file type of the images: png | bmp | tiff (many iris matchers read BMP); grid.png stays PNG"),
        ("bits", int, "bits per pixel sample: 8 | 16 (png and tiff only)"),
    ):
        default = fields[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"{text} (default: {default})")
    parser.add_argument("--use-ema", type=float, default=None, metavar="RATE",
                        help="EMA rate of the weights to use; 0 = raw weights (default: the slowest EMA saved)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps")
    parser.add_argument("--vae-device", default="auto", choices=["auto", "cpu"],
                        help="run the VAE decoder on the CPU to leave the GPU to PyTorch")
    parser.add_argument("--clip-denoised", dest="clip_denoised", action=argparse.BooleanOptionalAction, default=None,
                        help="clip predicted x0 to [-1, 1] at each step (default: on)")
    parser.add_argument("--save-priors", action="store_true", help="save each prior and a prior | result grid")
    parser.add_argument("--interpolate", action="store_true",
                        help="with --from-vae: n frames slerping from the latent of image 0 of --seed to that of image 1")
    parser.add_argument("--png16", dest="bits", action="store_const", const=16, help="deprecated: the same as --bits 16")
    parser.add_argument("--index", type=int, nargs="+", default=None, metavar="I",
                        help="re-make only image(s) I of the run given by the other arguments")
    geo = parser.add_argument_group("geometry (with --from-vae and a VAE trained with vae.condition=geometry)")
    geo.add_argument("--pupil-ratio", metavar="V|A:B", help="pupil/iris radius ratio in (0, 1): a value, "
                     "or a sweep A:B spread over the --n images")
    geo.add_argument("--iris-radius", metavar="V|A:B", help="iris radius / image side in (0, 1): a value or a sweep A:B")
    geo.add_argument("--offset", metavar="DX,DY", help="pupil-centre offset from the iris centre, in iris radii")
    geo.add_argument("--geometry-csv", metavar="FILE", help="per-image targets: columns pupil_ratio (or "
                     "pupil_iris_ratio) and/or iris_radius (or iris_r with width), e.g. circularity-check's "
                     "results.csv; image i takes row i (cycling)")
    geo.add_argument("--geometry-feedback", type=int, metavar="K", help="rounds of closed-loop correction: an image "
                     "whose measured pupil ratio (iris radius, when set) misses its target by more than the tolerance is "
                     "made again under condition + (target − measured), same seed; 0 = open loop "
                     f"(default: {fields['geometry_feedback'].default})")
    geo.add_argument("--geometry-tolerance", type=float, metavar="T", help="the miss, in (0, 1), under which an image is "
                     f"kept as it is (default: {fields['geometry_tolerance'].default})")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Console script `generate`."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    for name in ("n", "strength", "sampler", "steps", "eta", "seed", "batch_size", "temperature", "precision",
                 "format", "bits", "clip_denoised", "use_ema", "geometry_feedback", "geometry_tolerance"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg.generate, name, value)
    if args.interpolate and not args.from_vae:
        raise UserError("--interpolate needs --from-vae")
    image_suffix(cfg.generate.format, cfg.generate.bits)  # a bad --format/--bits fails before any work
    geometry = request_from_options(args.pupil_ratio, args.iris_radius, args.offset, args.geometry_csv)
    if geometry is not None and not args.from_vae:
        raise UserError("--pupil-ratio, --iris-radius, --offset and --geometry-csv need --from-vae with a geometry VAE")
    if geometry is None and (args.geometry_feedback is not None or args.geometry_tolerance is not None):
        raise UserError("--geometry-feedback and --geometry-tolerance need geometry targets "
                        "(--pupil-ratio, --iris-radius, --offset or --geometry-csv)")
    check_feedback(cfg.generate.geometry_feedback, cfg.generate.geometry_tolerance)
    out = prepare_out_dir(args.out, args.overwrite)
    source = "vae" if args.from_vae else "images" if args.from_images else "noise"
    result = generate(
        cfg, args.diffusion, source=source, vae_path=args.from_vae, images_dir=args.from_images,
        device=args.device, interpolate=args.interpolate, vae_device=args.vae_device, indices=args.index,
        geometry=geometry,
    )
    if not args.save_priors:
        result.priors = None
    write_generation(result, out, args.overwrite, fmt=cfg.generate.format, bits=cfg.generate.bits)
    meta = result.metadata
    print(f"wrote {len(result.indices)} images ({meta['source']}, strength {meta['strength']}, t_start {meta['t_start']}, "
          f"{meta['nfe_per_image']} network evaluations each) to {out}")
    geometry_info = meta["prior"].get("geometry", {})
    control = geometry_info.get("control_result", {}).get("pupil_ratio")
    if geometry is not None and control:
        print(f"pupil/iris ratio vs target: mean absolute error {control['mae']:.3f}, correlation {control['corr']:.3f} "
              f"({control['measured']} of {control['n']} measured; per image in metadata.json)")
    loop, first = geometry_info.get("feedback"), geometry_info.get("control_open_loop", {}).get("pupil_ratio")
    if loop and first:
        print(f"geometry feedback: {loop['images_regenerated']} images re-made, {loop['extra_diffusion_passes']} extra "
              f"diffusion passes; open loop the error was {first['mae']:.3f}, correlation {first['corr']:.3f}")
    return 0


if __name__ == "__main__":
    main()
