"""Small building blocks of the U-Net: normalisation, upsampling, zero-initialised layers,
timestep embedding."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups: gcd(32, channels), so tiny models (16, 48 channels…) work."""
    return math.gcd(max_groups, channels)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a half-precision input in half precision, even under autocast.

    Autocast runs group_norm in float32 on CUDA (its fp32 op list), so the norm and everything
    after it up to the next convolution would save float32 activations for backward. Here a
    float16/bfloat16 input is normalised with autocast off, by the half kernel (it accumulates the
    mean and variance in float32), with γ, β cast to the input's dtype (CUDA's kernel reads them as
    the input type; the cast is differentiable, so the float32 parameters still get gradients), and
    the output has the input's dtype, as openai's GroupNorm32 returns x.dtype. Any other input
    (float32, without autocast) takes nn.GroupNorm's path unchanged, bit for bit. Same parameters
    and state_dict keys (`weight`, `bias`) as nn.GroupNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in HALF_DTYPES:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def modulated_group_norm(norm: GroupNorm, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """norm(x)·(1 + scale) + shift, with a per-sample scale and shift of shape (B, C, 1, 1), in one
    GroupNorm kernel: the batch is folded into the channels, (B, C, H, W) as (1, B·C, H, W) in B·groups
    groups (the same groups, the same statistics), so the per-sample affine γ·(1 + scale),
    β·(1 + scale) + shift becomes that kernel's own weight and bias. Forward and backward each skip
    two passes over the activations (the product and the sum), and the normalised tensor is not kept
    for backward (the product needed it). Half-precision inputs stay half as in GroupNorm.forward, the
    affine computed in float32 and rounded once. A channels_last input (no NCHW view) and a norm that
    is not this module's GroupNorm (torch's own, as bench_memory's baseline swaps in) take the
    unfolded path."""
    if not (isinstance(norm, GroupNorm) and x.is_contiguous()):
        return norm(x) * (1 + scale) + shift
    B, C = x.shape[:2]
    gain = 1 + scale.reshape(B, C).to(torch.promote_types(scale.dtype, torch.float32))
    weight = norm.weight * gain
    bias = norm.bias * gain + shift.reshape(B, C)
    with torch.autocast(x.device.type, enabled=False) if x.dtype in HALF_DTYPES else nullcontext():
        out = F.group_norm(x.reshape(1, B * C, *x.shape[2:]), B * norm.num_groups, weight.reshape(-1).to(x.dtype),
                           bias.reshape(-1).to(x.dtype), norm.eps)
    return out.view(x.shape)


def group_norm(channels: int) -> GroupNorm:
    """GroupNorm with up to 32 groups (ADM's normalisation), half precision in and out under autocast."""
    return GroupNorm(norm_groups(channels), channels, eps=1e-5)


class NearestUpsample(nn.Module):
    """Nearest-neighbour ×2 in the input's dtype, even under autocast.

    CUDA's autocast runs upsample_nearest in float32 (the CPU's does not): a half input came back
    float32, and so did the residual sum after it, the skip concatenation and the next block's
    norm, all saved for backward. Nearest only copies values, so running it in half precision
    loses nothing. A float32 input gives what nn.Upsample(scale_factor=2) gives, bit for bit.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in HALF_DTYPES:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        with torch.autocast(x.device.type, enabled=False):
            return F.interpolate(x, scale_factor=2, mode="nearest")


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
        emb = F.pad(emb, (0, 1))
    return emb
