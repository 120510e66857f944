"""`generate`: VAE priors (or the user's images, or pure noise) → partial noising → diffusion denoising.

The Python API is `generate(...)`, returning arrays and metadata, and `write_generation`; the
console script is `pipeline.cli.generate`.
Priors are made first (Keras, on whichever backend it runs), handed over as NumPy arrays, then denoised with PyTorch,
so the two frameworks meet only at NumPy. Priors of another size or channel count than the diffusion
model (a 64 px VAE seeding a 128 px model) are fitted to it by `pipeline.common.resize.fit_priors`,
and what was done is recorded in the metadata under prior.resized. Where the priors come from:
`pipeline.prior_sources`; a geometry VAE's closed loop: `pipeline.geometry_feedback`.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.common.config import Config, GenerateConfig, config_to_dict
from pipeline.common.devices import pick_torch_device
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir, replace_dir, temp_dir_for
from pipeline.common.images import FORMAT_SUFFIXES, SIXTEEN_BIT_SUFFIXES, make_grid, write_image
from pipeline.common.resize import describe_fit, fit_priors
from pipeline.common.seeding import describe, stream_seed
from pipeline.geometry_feedback import check_feedback, run_feedback
from pipeline.geometry_targets import GeometryRequest, control_error, measure
from pipeline.prior_sources import image_files, image_priors, load_geometry_vae, vae_priors

log = logging.getLogger(__name__)

SOURCES = ("vae", "images", "noise")


@dataclass
class Generation:
    """What one `generate` call produced: results, the priors they started from, and metadata."""

    images: np.ndarray  # (N, C, H, W) float32 in [-1, 1]
    priors: np.ndarray | None  # same shape, or None for --from-noise
    metadata: dict
    indices: list[int]  # the run's image index of each row (all of range(n) unless --index)


def validate(gen: GenerateConfig, num_timesteps: int) -> None:
    """Reject sampling settings that cannot work, before anything is computed or written."""
    if gen.n <= 0:
        raise UserError(f"--n must be positive, got {gen.n}")
    if not 1 <= gen.steps <= num_timesteps:
        raise UserError(f"--steps must be in [1, {num_timesteps}] (the model's T), got {gen.steps}")
    if gen.batch_size < 0:
        raise UserError(f"--batch-size must be positive (or 0 = auto), got {gen.batch_size}")
    if gen.seed < 0:
        raise UserError(f"--seed must be >= 0, got {gen.seed}")
    if gen.eta < 0:
        raise UserError(f"--eta must be >= 0, got {gen.eta}")
    if gen.temperature <= 0:
        raise UserError(f"temperature must be positive, got {gen.temperature}")


def image_suffix(fmt: str, bits: int) -> str:
    """The suffix of the images written in format `fmt` at `bits` per sample; UserError for a
    format or depth that cannot be written (BMP has no 16-bit grey)."""
    if fmt not in FORMAT_SUFFIXES:
        raise UserError(f"--format must be one of {', '.join(FORMAT_SUFFIXES)}, got {fmt!r}")
    if bits not in (8, 16):
        raise UserError(f"--bits must be 8 or 16, got {bits}")
    suffix = FORMAT_SUFFIXES[fmt]
    if bits == 16 and suffix not in SIXTEEN_BIT_SUFFIXES:
        raise UserError(f"--bits 16 needs --format png or tiff: {fmt.upper()} has no 16-bit grey")
    return suffix


def _measure_geometry(prior_info: dict, priors: np.ndarray, images: np.ndarray, cfg: Config,
                      measured_result: list[dict] | None = None) -> None:
    """Add circularity-check's measured geometry of the priors and the results (`measured_result` when
    already measured), and how far the pupil ratio and iris radius are from their targets, to a
    geometry VAE's prior_info["geometry"]."""
    geometry = prior_info.get("geometry")
    if geometry is None:
        return
    targets = np.asarray(geometry["targets"])
    for name, batch, known in (("prior", priors, None), ("result", images, measured_result)):
        measured = known if known is not None else measure(batch, cfg.circularity)
        geometry[f"measured_{name}"] = measured
        geometry[f"control_{name}"] = {key: control_error(targets, measured, key) for key in ("pupil_ratio", "iris_radius")}


def _check_indices(indices: Sequence[int] | None, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    bad = [i for i in indices if not 0 <= i < n]
    if bad or not indices:
        raise UserError(f"--index must be image numbers in [0, {n - 1}] of the run, got {list(indices)}")
    return sorted(set(indices))


def _start_noise(seed: int, keys: list[int], shape: tuple[int, ...]):
    """Starting noise (x_T, or the SDEdit noise) of each key's image, drawn on the CPU (same on every device)."""
    import torch

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(stream_seed(seed, k, "start")))
                        for k in keys])


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
    indices: Sequence[int] | None = None,
    geometry: GeometryRequest | None = None,
) -> Generation:
    """Generate `cfg.generate.n` images with the diffusion checkpoint in `diffusion_dir`.

    `source` is "vae" (priors sampled from the VAE at `vae_path`), "images" (priors read from
    `images_dir`, files of one size) or "noise" (the vanilla pure-noise path). Priors of another
    size or channel count than the model are fitted to it first (`fit_priors`: area when
    shrinking, cubic when enlarging; recorded as metadata["prior"]["resized"]). They are noised to
    the kept step nearest `strength · T` (T the model's training steps) and denoised from there
    with t_start + 1 network evaluations; strength 0 returns the fitted priors unchanged and
    strength 1 starts from pure noise (identical to `source="noise"` with the same seed). Image
    i's randomness comes only from its own (seed, i, purpose) streams
    (pipeline/common/seeding.py), so `indices` re-makes some images of the run alone (up to the
    float rounding of a different batch size). With `interpolate` every frame shares image 0's
    diffusion noise, so neighbouring frames differ only through their priors.
    `geometry` (pipeline.geometry_targets) sets the targets of a geometry VAE (a UserError for a
    plain one, before the diffusion model is loaded); the targets and circularity-check's
    measurement of priors and results go into metadata["prior"]["geometry"]. With targets,
    `generate.geometry_feedback` > 0 rounds re-make the images that miss them by more than
    `generate.geometry_tolerance` under a corrected condition (pipeline.geometry_feedback; the same ε
    and noise streams); 0 is the open loop.
    """
    import torch

    from guided_diffusion.samplers import sample, step_for, strength_to_t_start, with_autocast
    from guided_diffusion.training.checkpoint import load_for_inference
    from guided_diffusion.training.factory import create_diffusion
    from guided_diffusion.training.step import autocast_for, resolve_precision

    if source not in SOURCES:
        raise UserError(f"unknown source '{source}'; valid: {', '.join(SOURCES)}")
    gen = cfg.generate
    check_feedback(gen.geometry_feedback, gen.geometry_tolerance)
    if geometry is not None:
        if source != "vae":
            raise UserError("geometry options need --from-vae with a geometry VAE")
        if vae_path is None:
            raise UserError("--from-vae needs a VAE file")
        load_geometry_vae(vae_path, geometry)  # fail before the diffusion model is loaded
    t0 = time.perf_counter()
    torch_device = pick_torch_device(device)
    ema_rate = None if gen.use_ema < 0 else gen.use_ema
    model, train_cfg, ckpt_info = load_for_inference(diffusion_dir, ema_rate=ema_rate, device=torch_device)
    validate(gen, train_cfg.diffusion.steps)
    step_for(gen.sampler)
    precision = resolve_precision(gen.precision, torch_device, "generate.precision")
    if interpolate and gen.n < 2:
        raise UserError(f"--interpolate needs --n >= 2, got {gen.n}")
    diffusion = create_diffusion(train_cfg, respacing=str(gen.steps))
    t_index = strength_to_t_start(diffusion, gen.strength)  # the one strength → t_start conversion (validates)
    pure_noise = source == "noise" or gen.strength == 1.0  # strength 1 is the from-noise path
    strength = 1.0 if pure_noise else gen.strength
    if pure_noise:
        t_index = diffusion.num_timesteps - 1
    t_start = int(diffusion.timestep_map[t_index]) if t_index >= 0 else 0
    shape = (train_cfg.data.channels, train_cfg.data.image_size, train_cfg.data.image_size)

    priors, prior_info = None, {}
    t_prior = time.perf_counter()
    if source == "vae":
        if vae_path is None:
            raise UserError("--from-vae needs a VAE file")
        n = gen.n
        indices = _check_indices(indices, n)
        priors, prior_info, decoder = vae_priors(str(vae_path), gen, indices, interpolate, vae_device, geometry)
    elif source == "images":
        if images_dir is None:
            raise UserError("--from-images needs a folder")
        files = image_files(str(images_dir), gen.n)
        n = len(files)
        indices = _check_indices(indices, n)
        priors, prior_info = image_priors(str(images_dir), files, indices, shape[0])
    else:
        n = gen.n
        indices = _check_indices(indices, n)
    if priors is not None:
        priors, prior_info["resized"] = fit_priors(priors, shape)
        if prior_info["resized"]["from"] != prior_info["resized"]["to"]:
            log.info("priors %s", describe_fit(prior_info["resized"]))
    prior_seconds = time.perf_counter() - t_prior
    batch_size = gen.batch_size or (64 if torch_device.type == "cuda" else 16)
    net = model if precision == "fp32" else with_autocast(model, autocast_for(precision, torch_device))
    keys = [0 if interpolate else i for i in indices]  # whose noise streams each image uses

    def denoise(x0: np.ndarray | None, rows: Sequence[int]) -> np.ndarray:
        """Results of the images at `rows` of `indices` from their priors `x0` (None: pure noise), each
        with its own noise streams (so a retry under another condition differs only by its prior)."""
        results = []
        for lo in range(0, len(rows), batch_size):
            batch_keys = [keys[r] for r in rows[lo : lo + batch_size]]
            noise = _start_noise(gen.seed, batch_keys, shape).to(torch_device)
            step_gens = [torch.Generator(device=torch_device).manual_seed(stream_seed(gen.seed, k, "step"))
                         for k in batch_keys]
            x_start = None if x0 is None else torch.from_numpy(x0[lo : lo + batch_size]).to(torch_device)
            out = sample(
                net, diffusion, (len(batch_keys), *shape), sampler=gen.sampler, eta=gen.eta, x_start=x_start,
                t_start=None if pure_noise else t_index, noise=noise, generator=step_gens,
                clip_denoised=gen.clip_denoised, progress=progress, device=torch_device,
            )
            results.append(out.float().cpu().numpy())
        return np.clip(np.concatenate(results), -1.0, 1.0).astype(np.float32)

    t_sample = time.perf_counter()
    images = denoise(None if pure_noise else priors, range(len(indices)))
    sample_seconds = time.perf_counter() - t_sample
    measured_result, t_feedback = None, time.perf_counter()
    if geometry is not None and gen.geometry_feedback > 0 and pure_noise:
        log.info("geometry feedback skipped: at strength 1 the prior does not reach the result")
    elif geometry is not None and gen.geometry_feedback > 0:

        def render(conditions: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            fitted = fit_priors(decoder(conditions, rows), shape)[0]
            return fitted, denoise(fitted, rows)

        loop = run_feedback(prior_info["geometry"], geometry, decoder.bank(), priors, images, render,
                            partial(measure, cfg=cfg.circularity), gen.geometry_feedback, gen.geometry_tolerance)
        priors, images, measured_result = loop.priors, loop.images, loop.measured
    feedback_seconds = time.perf_counter() - t_feedback
    if priors is not None:
        _measure_geometry(prior_info, priors, images, cfg, measured_result)

    metadata = {
        "source": source,
        "n": int(n),
        "indices": indices,
        "seeds": {**describe(gen.seed),
                  "noise_streams_of": "image 0 for every frame (--interpolate)" if interpolate else "each image",
                  "remake": "the same arguments with --index I re-make image I alone"},
        "strength": strength,
        "t_start": t_start,
        "t_start_index": t_index,
        "sampler": gen.sampler,
        "eta": gen.eta,
        "steps": gen.steps,
        "nfe_per_image": t_index + 1,
        "batch_size": batch_size,
        "precision": precision,
        "clip_denoised": gen.clip_denoised,
        "diffusion_checkpoint": ckpt_info,
        "prior": prior_info,
        "device": str(torch_device),
        "timings_s": {"total": time.perf_counter() - t0, "priors": prior_seconds, "sampling": sample_seconds,
                      "sampling_per_image": sample_seconds / max(len(indices), 1), "geometry_feedback": feedback_seconds},
        "versions": library_versions(),
        "config": config_to_dict(cfg),
        "train_config": config_to_dict(train_cfg),
    }
    return Generation(images=images, priors=priors, metadata=metadata, indices=indices)


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


def write_generation(result: Generation, out: Path, overwrite: bool, fmt: str = "png", bits: int = 8) -> Path:
    """Write images `{i:06d}.<fmt>` (png, bmp or tif, `bits` per sample; priors/ alike), grid.png and
    metadata.json (recording the format and bits) into `out`, atomically."""
    suffix = image_suffix(fmt, bits)
    out = prepare_out_dir(out, overwrite)
    tmp = temp_dir_for(out)
    for i, img in zip(result.indices, result.images, strict=True):
        write_image(tmp / f"{i:06d}{suffix}", img, bits=bits)
    if result.priors is not None:
        (tmp / "priors").mkdir()
        for i, img in zip(result.indices, result.priors, strict=True):
            write_image(tmp / "priors" / f"{i:06d}{suffix}", img, bits=bits)
        pairs = np.stack([result.priors, result.images], axis=1).reshape(-1, *result.images.shape[1:])
        write_image(tmp / "grid.png", make_grid(pairs, ncol=2 * min(4, len(result.images))))
    else:
        write_image(tmp / "grid.png", make_grid(result.images))
    meta = dict(result.metadata, format=fmt, bits=bits)
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    replace_dir(tmp, out)
    return out
