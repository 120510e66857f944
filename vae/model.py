"""The stage-1 VAE: convolutional encoder → (mean, log-variance) → sampled latent → decoder → tanh image.

Built only from Keras layers and `keras.ops`, so it runs on the TensorFlow (default) and torch
backends. Images are NHWC float32 in [-1, 1]. The encoder halves the image once per entry of
`channel_mult` (two 3x3 convolutions per level, the first strided); the decoder mirrors it with
nearest-neighbour upsampling. Training uses `model.fit`: `compute_loss` adds the reconstruction
term and the KL term weighted by the non-trainable `kl_weight` (driven by a warm-up callback).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers, ops

from pipeline.common.config import Config
from pipeline.common.errors import UserError
from vae.losses import RECON_LOSSES, kl_per_dim, kl_with_free_bits, reconstruction_loss

NORMS = ("group", "batch")
# Validation draws its latent noise from this fixed seed (not the training stream), so every epoch's
# val_ figures use the same noise, are comparable, and leave a resumed run's training noise alone.
VALIDATION_NOISE_SEED = 1234


def _norm(kind: str, channels: int, name: str) -> layers.Layer:
    if kind == "batch":
        return layers.BatchNormalization(name=name)
    return layers.GroupNormalization(groups=math.gcd(8, channels), name=name)


def _conv_block(h, channels: int, stride: int, norm: str, name: str):
    """3x3 convolution → normalisation → SiLU."""
    h = layers.Conv2D(channels, 3, strides=stride, padding="same", name=f"{name}_conv")(h)
    h = _norm(norm, channels, f"{name}_norm")(h)
    return layers.Activation("silu", name=f"{name}_act")(h)


def build_encoder(image_size: int, channels: int, latent_dim: int, base_channels: int,
                  channel_mult: Sequence[int], norm: str) -> keras.Model:
    """Image (H, W, C) → [mean (D,), log-variance (D,)]."""
    x = keras.Input((image_size, image_size, channels), name="image")
    h = _conv_block(x, base_channels, 1, norm, "enc_in")
    for level, mult in enumerate(channel_mult):
        h = _conv_block(h, base_channels * mult, 2, norm, f"enc{level}_down")
        h = _conv_block(h, base_channels * mult, 1, norm, f"enc{level}_mix")
    h = layers.Flatten(name="enc_flat")(h)
    mean = layers.Dense(latent_dim, name="z_mean")(h)
    logvar = layers.Dense(latent_dim, name="z_logvar")(h)
    return keras.Model(x, [mean, logvar], name="encoder")


def build_decoder(image_size: int, channels: int, latent_dim: int, base_channels: int,
                  channel_mult: Sequence[int], norm: str) -> keras.Model:
    """Latent (D,) → image (H, W, C) in [-1, 1]; every level sees the pixel coordinates (CoordConv)."""
    side = image_size // 2 ** len(channel_mult)
    width = base_channels * channel_mult[-1]
    z = keras.Input((latent_dim,), name="latent")
    h = layers.Dense(side * side * width, name="dec_in")(z)
    h = layers.Reshape((side, side, width), name="dec_reshape")(h)
    h = _norm(norm, width, "dec_in_norm")(h)
    h = layers.Activation("silu", name="dec_in_act")(h)
    for level, mult in reversed(list(enumerate(channel_mult))):
        h = layers.UpSampling2D(2, interpolation="nearest", name=f"dec{level}_up")(h)
        h = AddCoords(name=f"dec{level}_coords")(h)
        h = _conv_block(h, base_channels * mult, 1, norm, f"dec{level}_conv1")
        h = _conv_block(h, base_channels * mult, 1, norm, f"dec{level}_conv2")
    out = layers.Conv2D(channels, 3, padding="same", activation="tanh", name="dec_out")(h)
    return keras.Model(z, out, name="decoder")


@keras.saving.register_keras_serializable(package="iris_vae")
class AddCoords(layers.Layer):
    """Append two channels holding the pixel's x and y in [-1, 1] (CoordConv).

    Lets the convolutions place a disc at a position given by the latent code: a round pupil
    is a simple function of (x - cx)² + (y - cy)² once x and y are inputs.
    """

    def call(self, h):
        shape = ops.shape(h)
        batch, height, width = shape[0], shape[1], shape[2]
        ys = ops.linspace(-1.0, 1.0, height)
        xs = ops.linspace(-1.0, 1.0, width)
        grid_y = ops.broadcast_to(ops.reshape(ys, (1, height, 1, 1)), (batch, height, width, 1))
        grid_x = ops.broadcast_to(ops.reshape(xs, (1, 1, width, 1)), (batch, height, width, 1))
        return ops.concatenate([h, ops.cast(grid_x, h.dtype), ops.cast(grid_y, h.dtype)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 2)


@keras.saving.register_keras_serializable(package="iris_vae")
class Sampling(layers.Layer):
    """Reparameterisation z = mean + exp(logvar / 2) · ε, ε ~ N(0, I) from a seeded generator."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, mean, logvar):
        eps = keras.random.normal(ops.shape(mean), seed=self.seed_generator)
        return mean + ops.exp(0.5 * logvar) * eps

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}


def check_vae_params(image_size: int, channels: int, latent_dim: int, base_channels: int,
                     channel_mult: Sequence[int], norm: str, recon_loss: str, beta: float,
                     free_bits: float) -> None:
    """Raise UserError for a VAE configuration that cannot be built."""
    if channels not in (1, 3):
        raise UserError(f"image channels must be 1 or 3, got {channels}")
    if latent_dim < 1 or base_channels < 1:
        raise UserError(f"vae.latent_dim and vae.base_channels must be >= 1, got {latent_dim} and {base_channels}")
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise UserError(f"vae.channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
    factor = 2 ** len(channel_mult)
    if image_size % factor or image_size < factor:
        raise UserError(f"image size {image_size} is not divisible by 2^len(vae.channel_mult) = {factor}; "
                        "use a size such as 32, 64 or 128 or a shorter channel_mult")
    if norm not in NORMS:
        raise UserError(f"vae.norm must be one of {', '.join(NORMS)}, got '{norm}'")
    if recon_loss not in RECON_LOSSES:
        raise UserError(f"vae.recon_loss must be one of {', '.join(RECON_LOSSES)}, got '{recon_loss}'")
    if beta < 0 or free_bits < 0:
        raise UserError(f"vae.beta and vae.free_bits must be >= 0, got {beta} and {free_bits}")


@keras.saving.register_keras_serializable(package="iris_vae")
class IrisVAE(keras.Model):
    """Encoder + reparameterised latent + decoder, trained with reconstruction + β·KL.

    `call(x, training)` returns (reconstruction, mean, logvar); the latent is sampled when
    training and equals the mean otherwise (deterministic reconstructions). The loss (and so the
    logged elbo, val_elbo, recon, val_recon) always uses a sampled latent: validation decodes
    mean + σ·ε with ε from the fixed VALIDATION_NOISE_SEED, an unbiased one-sample ELBO estimate.
    """

    def __init__(self, image_size: int = 64, channels: int = 1, latent_dim: int = 64,
                 base_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 4, 4),
                 norm: str = "group", recon_loss: str = "mse", beta: float = 1.0,
                 free_bits: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        channel_mult = [int(m) for m in channel_mult]
        check_vae_params(image_size, channels, latent_dim, base_channels, channel_mult, norm,
                         recon_loss, beta, free_bits)
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        self.base_channels, self.channel_mult, self.norm = base_channels, channel_mult, norm
        self.recon_loss, self.beta, self.free_bits, self.seed = recon_loss, float(beta), float(free_bits), seed
        arch = (image_size, channels, latent_dim, base_channels, channel_mult, norm)
        self.encoder = build_encoder(*arch)
        self.decoder = build_decoder(*arch)
        self.sampling = Sampling(seed, name="sampling")
        # KL weight of the loss (β after warm-up) and the number of finished epochs (for --resume).
        self.kl_weight = self.add_weight(shape=(), initializer="ones", trainable=False, name="kl_weight")
        # The latent prior z = prior_mean + prior_scale @ ε, ε ~ N(0, I): N(0, I) until `fit_prior`
        # replaces it with a Gaussian fitted to the encoded training images (vae.priors).
        self.prior_mean = self.add_weight(shape=(latent_dim,), initializer="zeros", trainable=False,
                                          name="prior_mean")
        self.prior_scale = self.add_weight(shape=(latent_dim, latent_dim), initializer="identity",
                                           trainable=False, name="prior_scale")
        self.trained_epochs = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                              dtype="int64", name="trained_epochs")
        self.recon_tracker = keras.metrics.Mean(name="recon")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.elbo_tracker = keras.metrics.Mean(name="elbo")  # recon + β·KL at full β, no free bits
        self.build((None, image_size, image_size, channels))

    def build(self, input_shape) -> None:
        self.built = True  # every weight is created in __init__

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this VAE reads and writes."""
        return (self.channels, self.image_size, self.image_size)

    def call(self, x, training: bool = False):
        mean, logvar = self.encoder(x, training=training)
        z = self.sampling(mean, logvar) if training else mean
        return self.decoder(z, training=training), mean, logvar

    def decode(self, z, training: bool = False):
        """Latents (B, D) → images (B, H, W, C) in [-1, 1]."""
        return self.decoder(z, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        recon, mean, logvar = y_pred
        if not training:  # validation: the same ELBO estimate as training, z sampled (from fixed noise)
            eps = keras.random.normal(ops.shape(mean), seed=VALIDATION_NOISE_SEED)
            recon = self.decoder(mean + ops.exp(0.5 * logvar) * eps, training=False)
        rec = ops.mean(reconstruction_loss(x, recon, self.recon_loss))
        kl_dims = kl_per_dim(mean, logvar)
        kl = ops.mean(ops.sum(kl_dims, axis=-1))
        total = rec + ops.cast(self.kl_weight, rec.dtype) * kl_with_free_bits(kl_dims, self.free_bits)
        batch = ops.cast(ops.shape(x)[0], rec.dtype)  # weight like Keras' own loss tracker
        self.recon_tracker.update_state(rec, sample_weight=batch)
        self.kl_tracker.update_state(kl, sample_weight=batch)
        self.elbo_tracker.update_state(rec + self.beta * kl, sample_weight=batch)
        return total

    def get_config(self) -> dict:
        return {**super().get_config(), "image_size": self.image_size, "channels": self.channels,
                "latent_dim": self.latent_dim, "base_channels": self.base_channels,
                "channel_mult": list(self.channel_mult), "norm": self.norm, "recon_loss": self.recon_loss,
                "beta": self.beta, "free_bits": self.free_bits, "seed": self.seed}


def build_vae(cfg: Config) -> IrisVAE:
    """An untrained VAE for the image size/channels of `cfg.data` and the settings of `cfg.vae`."""
    v = cfg.vae
    return IrisVAE(image_size=cfg.data.image_size, channels=cfg.data.channels, latent_dim=v.latent_dim,
                   base_channels=v.base_channels, channel_mult=v.channel_mult, norm=v.norm,
                   recon_loss=v.recon_loss, beta=v.beta, free_bits=v.free_bits, seed=v.seed, name="iris_vae")


def check_vae_matches(vae: IrisVAE, cfg: Config, what: str = "VAE") -> None:
    """UserError when a loaded VAE does not fit the image size, channels or latent size of `cfg`."""
    want = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if vae.image_shape != want:
        raise UserError(f"{what} makes images of shape {vae.image_shape} (C, H, W) but the config asks for "
                        f"{want} (data.channels, data.image_size)")
    if vae.latent_dim != cfg.vae.latent_dim:
        raise UserError(f"{what} has latent_dim {vae.latent_dim} but the config asks for vae.latent_dim "
                        f"{cfg.vae.latent_dim}")
