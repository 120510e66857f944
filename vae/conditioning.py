"""The conditional VAE's (CVAE's) condition: a raw vector c (e.g. the eye's geometry) → the
network's condition input, and the layer that hands it to every decoder level.

`ConditionInput` normalises c with the training set's mean and standard deviation (part of the
layer's config, so a saved model normalises at generation exactly as in training) and appends a
"present" flag: the network sees ((c − mean) / std · keep, keep). In training each row's keep is 0
with probability `dropout` (classifier-free-style condition dropout), which teaches the network
the null condition (keep = 0) that `null_condition` gives for unconditional sampling. With dropout
0 the flag is always 1 and unconditional sampling draws c from the training set instead
(`IrisVAE.condition_bank`).

`AddCondition` appends the condition input as constant channels to a feature map (like
`model.AddCoords` appends the pixel coordinates), so every decoder level sees the target geometry.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers, ops

from pipeline.common.config import VAE_CONDITIONS as CONDITIONS
from pipeline.common.errors import UserError

CONDITION_BANK = 1024  # training conditions a CVAE keeps for unconditional sampling


def check_condition_setting(condition: str, dropout: float) -> None:
    """UserError for a vae.condition / vae.condition_dropout that cannot be trained (cheap: no Keras)."""
    if condition not in CONDITIONS:
        raise UserError(f"vae.condition must be one of {', '.join(CONDITIONS)}, got '{condition}'")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"vae.condition_dropout must be in [0, 1), got {dropout}")


def check_condition_params(condition: str, mean: Sequence[float], std: Sequence[float], dropout: float) -> None:
    """UserError for a condition setting that cannot be built."""
    check_condition_setting(condition, dropout)
    if condition != "none" and (len(mean) != len(std) or not mean or any(s <= 0 for s in std)):
        raise UserError(f"condition mean and std must be equal-length lists with std > 0, got {list(mean)}, {list(std)}")


def condition_settings(condition: str, dropout: float, conditions: np.ndarray | None,
                       seed: int) -> tuple[dict, np.ndarray | None]:
    """The IrisVAE keyword arguments of a condition setting, and its condition bank: for
    `condition` "none" ({}, None); else the mean and standard deviation (floored at 1e-3) of the
    raw training `conditions` (N, K) and up to CONDITION_BANK of them in a seeded random order."""
    check_condition_setting(condition, dropout)
    if condition == "none":
        return {}, None
    if conditions is None or len(conditions) == 0:
        raise UserError(f"vae.condition={condition} needs the training images' conditions")
    c = np.asarray(conditions, np.float64)
    bank = c[np.random.default_rng([seed, 2]).permutation(len(c))[:CONDITION_BANK]].astype(np.float32)
    return dict(condition=condition, condition_mean=c.mean(axis=0).tolist(),
                condition_std=np.maximum(c.std(axis=0), 1e-3).tolist(), condition_dropout=float(dropout),
                condition_bank_size=len(bank)), bank


@keras.saving.register_keras_serializable(package="iris_vae")
class ConditionInput(layers.Layer):
    """Raw condition (B, K) → ((c − mean) / std · keep, keep) (B, K + 1); keep ~ Bernoulli(1 − dropout)
    in training, 1 otherwise. Rows whose raw c is all NaN are the null condition (keep = 0)."""

    def __init__(self, mean: Sequence[float] = (), std: Sequence[float] = (), dropout: float = 0.0,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.dropout, self.seed = float(dropout), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, c, training: bool = False):
        c = ops.cast(c, "float32")
        present = ops.logical_not(ops.all(ops.isnan(c), axis=-1, keepdims=True))
        keep = ops.cast(present, "float32")
        if training and self.dropout > 0:
            draw = keras.random.uniform(ops.shape(keep), seed=self.seed_generator)
            keep = keep * ops.cast(draw >= self.dropout, "float32")
        normed = (ops.where(ops.isnan(c), 0.0, c) - ops.convert_to_tensor(self.mean)) / ops.convert_to_tensor(self.std)
        return ops.concatenate([normed * keep, keep], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 1)

    def get_config(self) -> dict:
        return {**super().get_config(), "mean": self.mean, "std": self.std, "dropout": self.dropout, "seed": self.seed}


@keras.saving.register_keras_serializable(package="iris_vae")
class AddCondition(layers.Layer):
    """[feature map, condition (B, K)] → the map with K constant channels appended after its own.

    Channels-first input is viewed as NHWC for the concatenation, as in `model.AddCoords` (on torch
    the view is free and keeps the channels_last memory format the convolutions run fastest in).
    """

    def __init__(self, data_format: str = "channels_last", **kwargs):
        super().__init__(**kwargs)
        self.data_format = data_format

    def call(self, h, c):
        if self.data_format == "channels_first":
            return ops.transpose(self._append_nhwc(ops.transpose(h, (0, 2, 3, 1)), c), (0, 3, 1, 2))
        return self._append_nhwc(h, c)

    @staticmethod
    def _append_nhwc(h, c):
        shape = ops.shape(h)
        k = ops.shape(c)[-1]
        planes = ops.broadcast_to(ops.reshape(ops.cast(c, h.dtype), (shape[0], 1, 1, k)), (shape[0], shape[1], shape[2], k))
        return ops.concatenate([h, planes], axis=-1)

    def compute_output_shape(self, h_shape, c_shape):
        k = c_shape[-1]
        if self.data_format == "channels_first":
            return (h_shape[0], h_shape[1] + k, *h_shape[2:])
        return (*h_shape[:-1], h_shape[-1] + k)

    def get_config(self) -> dict:
        return {**super().get_config(), "data_format": self.data_format}
