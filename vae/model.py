"""The stage-1 VAE: convolutional encoder → (mean, log-variance) → sampled latent → decoder → tanh image.

Built from Keras layers and `keras.ops` (and one fused torch kernel, below), so it runs on the
torch (default) and TensorFlow backends. Images are NHWC float32 in [-1, 1]. The encoder halves the image once per entry of
`channel_mult` (two 3x3 convolutions per level, the first strided); the decoder mirrors it with
nearest-neighbour upsampling. Training uses `model.fit`: `compute_loss` adds the reconstruction
term and the KL term weighted by the non-trainable `kl_weight` (driven by a warm-up callback).

Layout: the interface is NHWC on every backend, but the convolution stacks run in the backend's
own layout (`network_data_format`, chosen when the model is built). On torch that is channels-first:
Keras would otherwise copy every activation to NCHW and back around each convolution. Those tensors
keep NHWC memory (torch's channels_last memory format: the transposes at the edges are free views,
and its CPU convolutions are fastest in it), and group normalisation is one fused torch kernel. On
TensorFlow it is channels-last, the only layout its CPU convolutions support. `Layout` layers move the
channels at the edges of each stack, so that whatever the weights mean stays in NHWC order (the Dense
layers around Flatten/Reshape) and a `.keras` file written under one backend loads under the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers, ops

from pipeline.common.config import Config
from pipeline.common.errors import UserError
from vae import conditioning
from vae.losses import RECON_LOSSES, kl_per_dim, kl_with_free_bits, reconstruction_loss

NORMS = ("group", "batch")
# Validation draws its latent noise from this fixed seed (not the training stream), so every epoch's
# val_ figures use the same noise, are comparable, and leave a resumed run's training noise alone.
VALIDATION_NOISE_SEED = 1234


def network_data_format() -> str:
    """The layout the convolution stacks run in on the current Keras backend (chosen at build time)."""
    return "channels_first" if keras.backend.backend() == "torch" else "channels_last"


def _channel_axis(data_format: str) -> int:
    return 1 if data_format == "channels_first" else -1


def _norm(kind: str, channels: int, name: str, data_format: str) -> layers.Layer:
    axis = _channel_axis(data_format)
    if kind == "batch":
        return layers.BatchNormalization(axis=axis, name=name)
    return GroupNormalization(groups=math.gcd(8, channels), axis=axis, name=name)


def _conv_block(h, channels: int, stride: int, norm: str, name: str, data_format: str):
    """3x3 convolution → normalisation → SiLU."""
    h = layers.Conv2D(channels, 3, strides=stride, padding="same", data_format=data_format, name=f"{name}_conv")(h)
    h = _norm(norm, channels, f"{name}_norm", data_format)(h)
    return layers.Activation("silu", name=f"{name}_act")(h)


def build_encoder(image_size: int, channels: int, latent_dim: int, base_channels: int,
                  channel_mult: Sequence[int], norm: str, data_format: str = "channels_last",
                  condition_dim: int = 0) -> keras.Model:
    """Image (H, W, C) → [mean (D,), log-variance (D,)]; the convolutions run in `data_format`.

    With `condition_dim` > 0 (a CVAE) the inputs are [image, condition (condition_dim,)], the
    condition joining the flattened features before the mean and log-variance layers.
    """
    x = keras.Input((image_size, image_size, channels), name="image")
    cond = keras.Input((condition_dim,), name="condition") if condition_dim else None
    h = Layout(data_format, to_network=True, name="enc_layout")(x)
    h = _conv_block(h, base_channels, 1, norm, "enc_in", data_format)
    for level, mult in enumerate(channel_mult):
        h = _conv_block(h, base_channels * mult, 2, norm, f"enc{level}_down", data_format)
        h = _conv_block(h, base_channels * mult, 1, norm, f"enc{level}_mix", data_format)
    h = Layout(data_format, to_network=False, name="enc_nhwc")(h)  # flatten in NHWC order on every backend
    h = layers.Flatten(name="enc_flat")(h)
    if cond is not None:
        h = layers.Concatenate(name="enc_condition")([h, cond])
    mean = layers.Dense(latent_dim, name="z_mean")(h)
    logvar = layers.Dense(latent_dim, name="z_logvar")(h)
    return keras.Model(x if cond is None else [x, cond], [mean, logvar], name="encoder")


def build_decoder(image_size: int, channels: int, latent_dim: int, base_channels: int,
                  channel_mult: Sequence[int], norm: str, data_format: str = "channels_last",
                  condition_dim: int = 0) -> keras.Model:
    """Latent (D,) → image (H, W, C) in [-1, 1]; every level sees the pixel coordinates (CoordConv).

    With `condition_dim` > 0 (a CVAE) the inputs are [latent, condition (condition_dim,)]: the
    condition joins the latent, and every level sees it as constant channels beside the coordinates.
    """
    side = image_size // 2 ** len(channel_mult)
    width = base_channels * channel_mult[-1]
    z = keras.Input((latent_dim,), name="latent")
    cond = keras.Input((condition_dim,), name="condition") if condition_dim else None
    h = z if cond is None else layers.Concatenate(name="dec_condition")([z, cond])
    h = layers.Dense(side * side * width, name="dec_in")(h)
    h = layers.Reshape((side, side, width), name="dec_reshape")(h)  # NHWC order on every backend
    h = Layout(data_format, to_network=True, name="dec_layout")(h)
    h = _norm(norm, width, "dec_in_norm", data_format)(h)
    h = layers.Activation("silu", name="dec_in_act")(h)
    for level, mult in reversed(list(enumerate(channel_mult))):
        h = layers.UpSampling2D(2, data_format=data_format, interpolation="nearest", name=f"dec{level}_up")(h)
        h = AddCoords(data_format, name=f"dec{level}_coords")(h)
        if cond is not None:
            h = conditioning.AddCondition(data_format, name=f"dec{level}_condition")(h, cond)
        h = _conv_block(h, base_channels * mult, 1, norm, f"dec{level}_conv1", data_format)
        h = _conv_block(h, base_channels * mult, 1, norm, f"dec{level}_conv2", data_format)
    h = layers.Conv2D(channels, 3, padding="same", activation="tanh", data_format=data_format, name="dec_out")(h)
    out = Layout(data_format, to_network=False, name="dec_nhwc")(h)
    return keras.Model(z if cond is None else [z, cond], out, name="decoder")


@keras.saving.register_keras_serializable(package="iris_vae")
class Layout(layers.Layer):
    """Move the channels between the NHWC interface and the network's `data_format`.

    `to_network=True` turns NHWC into `data_format`, `to_network=False` turns it back. The identity
    for channels_last, but present in both layouts, so that the models built on either backend have
    the same layers in the same order (a `.keras` file addresses weights by layer class and position).
    """

    def __init__(self, data_format: str = "channels_last", to_network: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.data_format, self.to_network = data_format, to_network

    def call(self, h):
        if self.data_format == "channels_last":
            return h
        return ops.transpose(h, (0, 3, 1, 2) if self.to_network else (0, 2, 3, 1))

    def compute_output_shape(self, input_shape):
        if self.data_format == "channels_last":
            return input_shape
        b, d1, d2, d3 = input_shape
        return (b, d3, d1, d2) if self.to_network else (b, d2, d3, d1)

    def get_config(self) -> dict:
        return {**super().get_config(), "data_format": self.data_format, "to_network": self.to_network}


@keras.saving.register_keras_serializable(package="iris_vae")
class GroupNormalization(layers.GroupNormalization):
    """Keras' GroupNormalization (same weights, config and result), one fused kernel on torch.

    On the torch backend with channels-first input (axis=1) `call` is a single
    `torch.nn.functional.group_norm` instead of Keras' chain of reshapes, moments and element-wise
    ops. Torch's CPU kernel is several times slower (backward most) on channels_last memory, the
    format the convolutions here run fastest in, so such input is normalised in NCHW memory and
    handed back in its own format. Named like Keras' layer on purpose: a `.keras` file addresses
    weights by class name ("group_normalization_3"), so files written with Keras' layer load into this.
    """

    def call(self, inputs):
        if keras.backend.backend() != "torch" or self.axis != 1:
            return super().call(inputs)
        import torch

        x = ops.cast(inputs, "float32")
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        gamma = self.gamma.value if self.scale else None
        beta = self.beta.value if self.center else None
        out = torch.nn.functional.group_norm(x.contiguous(), self.groups, gamma, beta, self.epsilon)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return ops.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package="iris_vae")
class AddCoords(layers.Layer):
    """Append two channels holding the pixel's x and y in [-1, 1] (CoordConv), after the image's own.

    Lets the convolutions place a disc at a position given by the latent code: a round pupil
    is a simple function of (x - cx)² + (y - cy)² once x and y are inputs. Channels-first input is
    viewed as NHWC for the concatenation: on torch that view is free (its channels-first tensors
    here keep NHWC memory, torch's channels_last format) and the result keeps that memory format,
    where concatenating along axis 1 would produce NCHW memory and slow every convolution after it.
    """

    def __init__(self, data_format: str = "channels_last", **kwargs):
        super().__init__(**kwargs)
        self.data_format = data_format

    def call(self, h):
        if self.data_format == "channels_first":
            return ops.transpose(self._append_nhwc(ops.transpose(h, (0, 2, 3, 1))), (0, 3, 1, 2))
        return self._append_nhwc(h)

    @staticmethod
    def _append_nhwc(h):
        shape = ops.shape(h)
        batch, height, width = shape[0], shape[1], shape[2]
        ys = ops.linspace(-1.0, 1.0, height)
        xs = ops.linspace(-1.0, 1.0, width)
        grid_y = ops.broadcast_to(ops.reshape(ys, (1, height, 1, 1)), (batch, height, width, 1))
        grid_x = ops.broadcast_to(ops.reshape(xs, (1, 1, width, 1)), (batch, height, width, 1))
        return ops.concatenate([h, ops.cast(grid_x, h.dtype), ops.cast(grid_y, h.dtype)], axis=-1)

    def compute_output_shape(self, input_shape):
        if self.data_format == "channels_first":
            return (input_shape[0], input_shape[1] + 2, *input_shape[2:])
        return (*input_shape[:-1], input_shape[-1] + 2)

    def get_config(self) -> dict:
        return {**super().get_config(), "data_format": self.data_format}


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

    With `condition` other than "none" it is a conditional VAE (CVAE): its input is (images, raw
    conditions (B, K)), both encoder and decoder see the condition (`vae.conditioning`), and its
    config holds the condition's normalisation, so a loaded model normalises as in training.
    """

    def __init__(self, image_size: int = 64, channels: int = 1, latent_dim: int = 64,
                 base_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 4, 4),
                 norm: str = "group", recon_loss: str = "mse", beta: float = 1.0,
                 free_bits: float = 0.0, seed: int = 0, condition: str = "none",
                 condition_mean: Sequence[float] = (), condition_std: Sequence[float] = (),
                 condition_dropout: float = 0.0, condition_bank_size: int = 0, **kwargs):
        super().__init__(**kwargs)
        channel_mult = [int(m) for m in channel_mult]
        check_vae_params(image_size, channels, latent_dim, base_channels, channel_mult, norm,
                         recon_loss, beta, free_bits)
        conditioning.check_condition_params(condition, condition_mean, condition_std, condition_dropout)
        self.condition = condition
        self.condition_mean, self.condition_std = [float(m) for m in condition_mean], [float(s) for s in condition_std]
        self.condition_dropout, self.condition_bank_size = float(condition_dropout), int(condition_bank_size)
        condition_dim = len(self.condition_mean) + 1 if self.conditional else 0  # + the "present" flag
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        self.base_channels, self.channel_mult, self.norm = base_channels, channel_mult, norm
        self.recon_loss, self.beta, self.free_bits, self.seed = recon_loss, float(beta), float(free_bits), seed
        # The layout is this backend's choice, not part of the model: it is not in get_config.
        arch = (image_size, channels, latent_dim, base_channels, channel_mult, norm, network_data_format())
        self.encoder = build_encoder(*arch, condition_dim=condition_dim)
        self.decoder = build_decoder(*arch, condition_dim=condition_dim)
        self.sampling = Sampling(seed, name="sampling")
        if self.conditional:
            self.condition_input = conditioning.ConditionInput(self.condition_mean, self.condition_std,
                                                               self.condition_dropout, seed, name="condition_input")
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
        if self.conditional:  # raw conditions of training images, drawn from for unconditional sampling
            self.condition_bank = self.add_weight(shape=(max(1, self.condition_bank_size), len(self.condition_mean)),
                                                  initializer="zeros", trainable=False, name="condition_bank")
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

    @property
    def conditional(self) -> bool:
        """Whether this is a CVAE: its inputs are (images, raw conditions (B, K)), not images alone."""
        return self.condition != "none"

    def _inputs(self, x, training: bool):
        """(images, network condition or None) of a model input: images, or (images, raw conditions)."""
        if not self.conditional:
            return x, None
        return ops.convert_to_tensor(x[0]), self.condition_input(x[1], training=training)

    def call(self, x, training: bool = False):
        images, cond = self._inputs(x, training)
        mean, logvar = self.encoder(images if cond is None else [images, cond], training=training)
        z = self.sampling(mean, logvar) if training else mean
        return self._decode(z, cond, training), mean, logvar

    def _decode(self, z, cond, training: bool):
        return self.decoder(z if cond is None else [ops.convert_to_tensor(z), cond], training=training)

    def decode(self, z, conditions=None, training: bool = False):
        """Latents (B, D) → images (B, H, W, C) in [-1, 1]. A CVAE decodes them under the raw
        `conditions` (B, K) (a row of NaN: the null condition), by default rows 0, 1, … of its
        condition bank (cyclically)."""
        if not self.conditional:
            return self.decoder(z, training=training)
        if conditions is None:
            bank = ops.convert_to_numpy(self.condition_bank)
            conditions = bank[[i % len(bank) for i in range(int(ops.shape(z)[0]))]]
        return self._decode(z, self.condition_input(conditions, training=training), training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        recon, mean, logvar = y_pred
        if not training:  # validation: the same ELBO estimate as training, z sampled (from fixed noise)
            eps = keras.random.normal(ops.shape(mean), seed=VALIDATION_NOISE_SEED)
            x, cond = self._inputs(x, training=False)
            recon = self._decode(mean + ops.exp(0.5 * logvar) * eps, cond, training=False)
        elif self.conditional:
            x = x[0]
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
                "beta": self.beta, "free_bits": self.free_bits, "seed": self.seed, **self._condition_config()}

    def _condition_config(self) -> dict:  # none for a plain VAE: its config is as it was before CVAEs
        return {} if not self.conditional else {
            "condition": self.condition, "condition_mean": self.condition_mean,
            "condition_std": self.condition_std, "condition_dropout": self.condition_dropout,
            "condition_bank_size": self.condition_bank_size}


def build_vae(cfg: Config, conditions=None) -> IrisVAE:
    """An untrained VAE for the image size/channels of `cfg.data` and the settings of `cfg.vae`.

    With vae.condition other than none it is a CVAE fitted to the raw training `conditions` (N, K)
    (`conditioning.condition_settings`).
    """
    v = cfg.vae
    extra, bank = conditioning.condition_settings(v.condition, v.condition_dropout, conditions, v.seed)
    vae = IrisVAE(image_size=cfg.data.image_size, channels=cfg.data.channels, latent_dim=v.latent_dim,
                  base_channels=v.base_channels, channel_mult=v.channel_mult, norm=v.norm,
                  recon_loss=v.recon_loss, beta=v.beta, free_bits=v.free_bits, seed=v.seed, name="iris_vae", **extra)
    if bank is not None:
        vae.condition_bank.assign(bank)
    return vae


def check_vae_matches(vae: IrisVAE, cfg: Config, what: str = "VAE") -> None:
    """UserError when a loaded VAE does not fit the image size, channels or latent size of `cfg`."""
    want = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if vae.image_shape != want:
        raise UserError(f"{what} makes images of shape {vae.image_shape} (C, H, W) but the config asks for "
                        f"{want} (data.channels, data.image_size)")
    if vae.latent_dim != cfg.vae.latent_dim:
        raise UserError(f"{what} has latent_dim {vae.latent_dim} but the config asks for vae.latent_dim "
                        f"{cfg.vae.latent_dim}")
