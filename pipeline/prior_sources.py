"""Where `generate`'s priors come from: a VAE's samples (a geometry VAE decoding each image under its
geometry target, see pipeline.geometry_targets) or a folder of the user's images.

Image i of a VAE run decodes temperature · ε_i, ε_i from its own (seed, i, "vae") stream
(pipeline/common/seeding.py); `PriorDecoder` keeps the ε so that geometry feedback
(pipeline.geometry_feedback) can decode the same images again under corrected conditions.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common.config import GenerateConfig
from pipeline.common.errors import UserError
from pipeline.common.files import sha256_file
from pipeline.common.seeding import numpy_stream
from pipeline.data.geometry import GEOMETRY_KEYS
from pipeline.geometry_targets import GeometryRequest

log = logging.getLogger(__name__)


def load_geometry_vae(vae_path: str | Path, geometry: GeometryRequest | None):
    """The VAE at `vae_path`; UserError when geometry targets are asked of an unconditional one."""
    from vae.priors import is_conditional, load_vae

    vae = load_vae(vae_path)
    if geometry is not None and not is_conditional(vae):
        raise UserError(f"geometry options ({geometry.source}) need a geometry VAE: the VAE at {vae_path} is "
                        "unconditional (train it with vae.condition=geometry)")
    return vae


def geometry_targets_of(vae, gen: GenerateConfig, geometry: GeometryRequest | None) -> tuple[np.ndarray | None, dict]:
    """A CVAE's raw conditions of images 0…n−1 (what was asked for, else its training geometry) and
    their description for metadata.json; (None, {}) for a plain VAE."""
    from vae.priors import condition_bank, is_conditional

    if not is_conditional(vae):
        return None, {}
    request = geometry or GeometryRequest(source="none: every target from the VAE's condition bank (training geometry)")
    targets = request.targets(gen.n, condition_bank(vae), gen.seed)
    return targets, {"request": request.source, "keys": list(GEOMETRY_KEYS),
                     "bank_draws": "image i: bank row numpy.random.default_rng(SeedSequence(seed, spawn_key=(i, 3)))"
                                   ".integers(bank size), for what the request leaves open"}


@dataclass
class PriorDecoder:
    """Decodes the priors of a run's images (rows of `draws`, their latents) under given conditions, on the
    VAE device asked for: the first tries, and the retries of geometry feedback (same ε, new condition)."""

    vae: object
    draws: np.ndarray
    vae_device: str

    def __call__(self, conditions: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        import keras

        from vae.priors import decode_draws

        place = contextlib.nullcontext()
        if self.vae_device == "cpu" and keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            place = tf.device("/CPU:0")
        with place:
            return decode_draws(self.vae, self.draws[rows], conditions=conditions)

    def bank(self) -> np.ndarray:
        """A geometry VAE's training geometry (its condition bank)."""
        from vae.priors import condition_bank

        return condition_bank(self.vae)


def vae_priors(vae_path: str, gen: GenerateConfig, indices: list[int], interpolate: bool, vae_device: str,
                geometry: GeometryRequest | None = None) -> tuple[np.ndarray, dict, PriorDecoder]:
    """Priors of images `indices`: image i decodes temperature · ε_i, ε_i from its own (seed, i, "vae")
    stream; with `interpolate`, frame k decodes the slerp from ε_0 to ε_1 at k / (n − 1). A geometry
    VAE decodes image i under target i (`geometry`, or its training geometry; see pipeline.geometry_targets).
    Also returns the decoder, to decode them again under other conditions."""
    from vae.priors import slerp

    vae = load_geometry_vae(vae_path, geometry)
    targets, geometry_info = geometry_targets_of(vae, gen, geometry)
    conditions = None if targets is None else targets[indices]

    def eps(i: int) -> np.ndarray:
        return numpy_stream(gen.seed, i, "vae").standard_normal(vae.latent_dim) * gen.temperature

    if interpolate:
        ends = eps(0), eps(1)
        draws = np.stack([slerp(*ends, k / (gen.n - 1)) for k in indices])
    else:
        draws = np.stack([eps(i) for i in indices])
    decoder = PriorDecoder(vae, draws, vae_device)
    priors = decoder(conditions, np.arange(len(indices)))
    info = {"path": str(vae_path), "sha256": sha256_file(vae_path), "interpolate": interpolate,
            "temperature": gen.temperature, "device": vae_device}
    if conditions is not None:
        info["geometry"] = {**geometry_info, "targets": conditions.tolist()}
    return priors, info, decoder


def image_files(folder: str, n: int) -> list[Path]:
    from pipeline.data.folders import list_image_files

    files = list_image_files(folder)[:n]
    if len(files) < n:
        log.warning("only %d prior images in %s; generating %d images", len(files), folder, len(files))
    return files


def image_priors(folder: str, files: list[Path], indices: list[int], channels: int) -> tuple[np.ndarray, dict]:
    """Files `indices` at their own size with `channels` channels; UserError unless they share one size."""
    from pipeline.data.folders import read_image_native

    priors = [read_image_native(files[i], channels) for i in indices]
    odd = next((k for k, img in enumerate(priors) if img.shape != priors[0].shape), None)
    if odd is not None:
        raise UserError("prior images must all have one size: "
                        f"{_sized(files[indices[0]], folder, priors[0])}, {_sized(files[indices[odd]], folder, priors[odd])}")
    return np.stack(priors), {"folder": folder, "files": [str(f) for f in files]}


def _sized(path: Path, folder: str, img: np.ndarray) -> str:
    """'a.png is 64x64' (width x height; the path relative to the prior folder)."""
    name = path.relative_to(folder) if path.is_relative_to(folder) else path
    return f"{name} is {img.shape[2]}x{img.shape[1]}"
