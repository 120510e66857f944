"""Small building blocks of the U-Net: normalisation, zero-initialised layers, timestep embedding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups: gcd(32, channels), so tiny models (16, 48 channels…) work."""
    return math.gcd(max_groups, channels)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (ADM's normalisation)."""
    return nn.GroupNorm(norm_groups(channels), channels, eps=1e-5)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter, so a residual branch starts as the identity and the output as 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Transformer / DDPM): [cos(t·ω_k), sin(t·ω_k)] with
    ω_k = max_period^(−k/half), k = 0..half−1. Float32, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
