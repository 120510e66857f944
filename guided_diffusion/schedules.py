"""Noise schedules: β_t for the discrete process (DDPM linear, Improved-DDPM cosine) and the
continuous offset-cosine rates of the Keras DDIM example. All float64 NumPy."""

from __future__ import annotations

import math

import numpy as np

from guided_diffusion.errors import DiffusionSettingError


def linear_betas(T: int) -> np.ndarray:
    """DDPM's linear β from 1e-4 to 0.02 at T=1000, both ends scaled by 1000/T (Improved DDPM)."""
    _check_steps(T)
    if T <= 20:
        raise DiffusionSettingError(f"the linear schedule needs more than 20 steps (β_T = 20/T < 1), got {T}")
    scale = 1000.0 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def cosine_alpha_bar(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    """ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s) · π/2) for t ∈ [0, 1] (Improved DDPM eq. 17)."""

    def f(u):
        return np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2

    return f(np.asarray(t, dtype=np.float64)) / f(0.0)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """β_t = min(1 − ᾱ(t/T)/ᾱ((t−1)/T), max_beta) for t = 1..T (clipped to avoid a singular end)."""
    _check_steps(T)
    grid = np.arange(T + 1, dtype=np.float64) / T
    abar = cosine_alpha_bar(grid, s)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def get_betas(name: str, T: int) -> np.ndarray:
    """β_1..β_T of the named schedule ("linear" | "cosine")."""
    if name not in SCHEDULES:
        raise DiffusionSettingError(f"unknown noise schedule '{name}'; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](T)


def _check_steps(T: int) -> None:
    if not isinstance(T, (int, np.integer)) or T < 1:
        raise DiffusionSettingError(f"diffusion steps must be a positive integer, got {T!r}")
