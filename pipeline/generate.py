"""`generate`: VAE priors (or the user's images, or pure noise) → partial noising → diffusion denoising.

The Python API is `generate(...)`, returning arrays and metadata; `main` is the console script.
Priors are made first (Keras/TensorFlow), handed over as NumPy arrays, then denoised with PyTorch,
so the two frameworks meet only at NumPy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.config import Config, GenerateConfig, config_to_dict
from pipeline.common.devices import pick_torch_device
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir, replace_dir, sha256_file, temp_dir_for
from pipeline.common.images import make_grid, write_png

log = logging.getLogger(__name__)

SOURCES = ("vae", "images", "noise")
SAMPLERS = ("ddim", "ddpm")


@dataclass
class Generation:
    """What one `generate` call produced: results, the priors they started from, and metadata."""

    images: np.ndarray  # (N, C, H, W) float32 in [-1, 1]
    priors: np.ndarray | None  # same shape, or None for --from-noise
    metadata: dict


def validate(gen: GenerateConfig, num_timesteps: int) -> None:
    """Reject sampling settings that cannot work, before anything is computed or written."""
    if gen.n <= 0:
        raise UserError(f"--n must be positive, got {gen.n}")
    if not 0.0 <= gen.strength <= 1.0:
        raise UserError(f"--strength must be in [0, 1], got {gen.strength}")
    if gen.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{gen.sampler}'; valid: {', '.join(SAMPLERS)}")
    if not 1 <= gen.steps <= num_timesteps:
        raise UserError(f"--steps must be in [1, {num_timesteps}] (the model's T), got {gen.steps}")
    if gen.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {gen.batch_size}")
    if gen.eta < 0:
        raise UserError(f"--eta must be >= 0, got {gen.eta}")
    if gen.temperature <= 0:
        raise UserError(f"temperature must be positive, got {gen.temperature}")


def _vae_priors(vae_path: str, gen: GenerateConfig, interpolate: bool, vae_device: str) -> tuple[np.ndarray, dict]:
    from vae.priors import interpolate as vae_interpolate
    from vae.priors import load_vae, sample_priors

    vae = load_vae(vae_path)

    def draw() -> np.ndarray:
        if interpolate:
            return vae_interpolate(vae, gen.seed, gen.seed + 1, gen.n)
        return sample_priors(vae, gen.n, gen.seed, temperature=gen.temperature)

    if vae_device == "cpu":
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.device("/CPU:0"):
                priors = draw()
        else:
            priors = draw()
    else:
        priors = draw()
    info = {"path": str(vae_path), "sha256": sha256_file(vae_path), "interpolate": interpolate,
            "temperature": gen.temperature, "device": vae_device}
    return priors, info


def _image_priors(folder: str, n: int, size: int, channels: int) -> tuple[np.ndarray, dict]:
    from pipeline.data.folders import list_image_files, read_image

    files = list_image_files(folder)[:n]
    priors = np.stack([read_image(f, size, channels) for f in files])
    if len(files) < n:
        log.warning("only %d prior images in %s; generating %d images", len(files), folder, len(files))
    return priors, {"folder": str(folder), "files": [str(f) for f in files]}


def generate(
    cfg: Config,
    diffusion_dir: str | Path,
    source: str = "vae",
    vae_path: str | Path | None = None,
    images_dir: str | Path | None = None,
    device: str = "auto",
    interpolate: bool = False,
    vae_device: str = "auto",
    progress: bool = True,
) -> Generation:
    """Generate `cfg.generate.n` images with the diffusion checkpoint in `diffusion_dir`.

    `source` is "vae" (priors sampled from the VAE at `vae_path`), "images" (priors read from
    `images_dir`) or "noise" (the vanilla pure-noise path). Priors are noised to the respaced step
    nearest `strength · T` and denoised from there; strength 0 returns the priors unchanged and
    strength 1 starts from pure noise (identical to `source="noise"` with the same seed).
    """
    import torch

    from guided_diffusion.samplers import sample, sampler_nfe, strength_to_t_start
    from guided_diffusion.training.checkpoint import load_for_inference
    from guided_diffusion.training.factory import create_diffusion

    if source not in SOURCES:
        raise UserError(f"unknown source '{source}'; valid: {', '.join(SOURCES)}")
    gen = cfg.generate
    t0 = time.perf_counter()
    torch_device = pick_torch_device(device)
    ema_rate = None if gen.use_ema < 0 else gen.use_ema
    model, train_cfg, ckpt_info = load_for_inference(diffusion_dir, ema_rate=ema_rate, device=torch_device)
    validate(gen, train_cfg.diffusion.steps)
    diffusion = create_diffusion(train_cfg, respacing=str(gen.steps))
    shape = (train_cfg.data.channels, train_cfg.data.image_size, train_cfg.data.image_size)

    priors, prior_info = None, {}
    t_prior = time.perf_counter()
    if source == "vae":
        if vae_path is None:
            raise UserError("--from-vae needs a VAE file")
        priors, prior_info = _vae_priors(str(vae_path), gen, interpolate, vae_device)
    elif source == "images":
        if images_dir is None:
            raise UserError("--from-images needs a folder")
        priors, prior_info = _image_priors(str(images_dir), gen.n, shape[1], shape[0])
    prior_seconds = time.perf_counter() - t_prior
    if priors is not None and tuple(priors.shape[1:]) != shape:
        raise UserError(
            f"prior images are {tuple(priors.shape[1:])} (C, H, W) but the diffusion model expects {shape}; "
            "train both stages at the same data.image_size and data.channels"
        )
    n = gen.n if priors is None else len(priors)
    strength = 1.0 if source == "noise" else gen.strength
    t_index = strength_to_t_start(diffusion, strength)
    t_start = int(diffusion.timestep_map[t_index]) if t_index >= 0 else 0

    results = []
    t_sample = time.perf_counter()
    for lo in range(0, n, gen.batch_size):
        hi = min(n, lo + gen.batch_size)
        # Each image's starting noise comes from its own seed, so it does not depend on batching.
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(gen.seed + i)) for i in range(lo, hi)
        ]).to(torch_device)
        step_gen = torch.Generator(device=torch_device).manual_seed(gen.seed + lo)
        x_start = None if priors is None else torch.from_numpy(priors[lo:hi]).to(torch_device)
        with torch.no_grad():
            out = sample(
                model, diffusion, (hi - lo, *shape), sampler=gen.sampler, eta=gen.eta, x_start=x_start,
                strength=strength, noise=noise, generator=step_gen, clip_denoised=gen.clip_denoised,
                progress=progress, device=torch_device,
            )
        results.append(out.float().cpu().numpy())
    sample_seconds = time.perf_counter() - t_sample
    images = np.clip(np.concatenate(results), -1.0, 1.0).astype(np.float32)

    metadata = {
        "source": source,
        "n": int(n),
        "seeds": {"noise": [gen.seed + i for i in range(n)],
                  "step_noise_per_batch": [gen.seed + lo for lo in range(0, n, gen.batch_size)],
                  "vae_latents": gen.seed if source == "vae" else None},
        "strength": strength,
        "t_start": t_start,
        "t_start_index": t_index,
        "sampler": gen.sampler,
        "eta": gen.eta,
        "steps": gen.steps,
        "nfe_per_image": sampler_nfe(diffusion, strength),
        "batch_size": gen.batch_size,
        "clip_denoised": gen.clip_denoised,
        "diffusion_checkpoint": ckpt_info,
        "prior": prior_info,
        "device": str(torch_device),
        "timings_s": {"total": time.perf_counter() - t0, "priors": prior_seconds, "sampling": sample_seconds,
                      "sampling_per_image": sample_seconds / max(n, 1)},
        "versions": library_versions(),
        "config": config_to_dict(cfg),
        "train_config": config_to_dict(train_cfg),
    }
    return Generation(images=images, priors=priors, metadata=metadata)


def library_versions() -> dict:
    """Versions of the libraries that decide the pixels."""
    import torch

    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    for name in ("keras", "tensorflow"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def write_generation(result: Generation, out: Path, overwrite: bool, png16: bool = False) -> Path:
    """Write images, grid.png, optional priors and metadata.json into `out`, atomically."""
    out = prepare_out_dir(out, overwrite)
    tmp = temp_dir_for(out)
    bits = 16 if png16 else 8
    for i, img in enumerate(result.images):
        write_png(tmp / f"{i:06d}.png", img, bits=bits)
    if result.priors is not None:
        (tmp / "priors").mkdir()
        for i, img in enumerate(result.priors):
            write_png(tmp / "priors" / f"{i:06d}.png", img, bits=bits)
        pairs = np.stack([result.priors, result.images], axis=1).reshape(-1, *result.images.shape[1:])
        write_png(tmp / "grid.png", make_grid(pairs, ncol=2 * min(4, len(result.images))))
    else:
        write_png(tmp / "grid.png", make_grid(result.images))
    meta = dict(result.metadata, png_bits=bits)
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    replace_dir(tmp, out)
    return out


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
    add_config_args(parser)
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    for name, kind, text in (
        ("n", int, "number of images"),
        ("strength", float, "noise level the priors are raised to: 0 = priors unchanged, 1 = pure noise"),
        ("sampler", str, "ddim | ddpm"),
        ("steps", int, "respaced sampling steps over the full schedule"),
        ("eta", float, "DDIM stochasticity (0 = deterministic)"),
        ("seed", int, "random seed"),
        ("batch_size", int, "images per network batch"),
        ("temperature", float, "VAE latent temperature"),
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
                        help="with --from-vae: slerp between the latents of seeds S and S+1, n frames")
    parser.add_argument("--png16", action="store_true", default=None, help="write 16-bit PNGs")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Console script `generate`."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    for name in ("n", "strength", "sampler", "steps", "eta", "seed", "batch_size", "temperature",
                 "clip_denoised", "png16", "use_ema"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg.generate, name, value)
    if args.interpolate and not args.from_vae:
        raise UserError("--interpolate needs --from-vae")
    out = prepare_out_dir(args.out, args.overwrite)
    source = "vae" if args.from_vae else "images" if args.from_images else "noise"
    result = generate(
        cfg, args.diffusion, source=source, vae_path=args.from_vae, images_dir=args.from_images,
        device=args.device, interpolate=args.interpolate, vae_device=args.vae_device,
    )
    if not args.save_priors:
        result.priors = None
    write_generation(result, out, args.overwrite, png16=cfg.generate.png16)
    meta = result.metadata
    print(f"wrote {meta['n']} images ({meta['source']}, strength {meta['strength']}, t_start {meta['t_start']}, "
          f"{meta['nfe_per_image']} network evaluations each) to {out}")
    return 0
