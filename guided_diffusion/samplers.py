"""Reverse-process samplers: one step function per sampler, one shared loop.

A step maps x at respaced index i to x at index i−1 (x_0 after index 0). The loop can start at
any index with a given x (SDEdit, Meng et al. 2021: noise a prior to t_start, then denoise).
All noise comes from the caller's torch.Generator, drawn on the generator's device, so one seed
gives the same images on every run (and the same noise on CPU and GPU for a CPU generator).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from guided_diffusion.errors import DiffusionSettingError


def _randn(shape, generator: torch.Generator | None, device) -> Tensor:
    """Standard normal noise from `generator` (on its device), moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where).to(device)


def ddpm_step(model, diffusion, x: Tensor, t: Tensor, *, generator=None, clip_denoised=True, eta=0.0):
    """Ancestral step (DDPM Alg. 2): x_{t−1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I), no noise at t = 0."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised)
    z = _randn(x.shape, generator, x.device)
    nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * z, out["pred_xstart"]


def ddim_step(model, diffusion, x: Tensor, t: Tensor, *, generator=None, clip_denoised=True, eta=0.0):
    """DDIM step (Song et al. 2020, eq. 12):
    x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z,
    σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}); η = 0 is deterministic."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised)
    n = x.ndim
    abar = diffusion.table("alphas_cumprod", t, n)  # ᾱ_t
    abar_prev = diffusion.table("alphas_cumprod_prev", t, n)  # ᾱ_{t−1}
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    x_prev = torch.sqrt(abar_prev) * out["pred_xstart"] + torch.sqrt(1 - abar_prev - sigma**2) * out["eps"]
    if eta > 0:
        x_prev = x_prev + sigma * _randn(x.shape, generator, x.device)
    return x_prev, out["pred_xstart"]


STEPS: dict[str, Callable] = {"ddpm": ddpm_step, "ddim": ddim_step}


def strength_to_t_start(diffusion, strength: float) -> int:
    """Respaced index to start denoising from: −1 for strength 0 (nothing to do), the last index
    for strength 1, else the index whose original timestep is nearest strength·T_original."""
    if not 0.0 <= strength <= 1.0:
        raise DiffusionSettingError(f"strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return -1
    if strength == 1.0:
        return diffusion.num_timesteps - 1
    kept = torch.tensor(diffusion.timestep_map, dtype=torch.float64)
    target = strength * (diffusion.timestep_map[-1] + 1)
    return int(torch.argmin((kept - target).abs()))


def sampler_nfe(diffusion, strength: float) -> int:
    """Network evaluations `sample` makes for this strength (one per step from t_start to 0)."""
    return strength_to_t_start(diffusion, strength) + 1


def _check_sampler(sampler: str) -> Callable:
    if sampler not in STEPS:
        raise DiffusionSettingError(f"unknown sampler '{sampler}'; valid: {', '.join(STEPS)}")
    return STEPS[sampler]


def run_loop(step: Callable, model, diffusion, x: Tensor, t_start: int, *, generator=None,
             clip_denoised=True, eta=0.0, progress=False, return_intermediates=False):
    """Apply `step` from index t_start down to 0. Returns x_0, or (x_0, [x at each index, x_0])."""
    intermediates = [x] if return_intermediates else None
    indices = range(t_start, -1, -1)
    for i in tqdm(indices, disable=not progress, desc="sampling", leave=False):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        x, _ = step(model, diffusion, x, t, generator=generator, clip_denoised=clip_denoised, eta=eta)
        if return_intermediates:
            intermediates.append(x)
    return (x, intermediates) if return_intermediates else x


@torch.no_grad()
def sample(model, diffusion, shape, *, sampler: str = "ddim", eta: float = 0.0, x_start: Tensor | None = None,
           strength: float = 1.0, noise: Tensor | None = None, generator: torch.Generator | None = None,
           clip_denoised: bool = True, progress: bool = False, return_intermediates: bool = False,
           device=None) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Draw samples of `shape` (B, C, H, W).

    From noise (x_start None or strength 1): x = noise (drawn from `generator` if not given),
    then the loop from the last index. From a prior x_start with 0 < strength < 1:
    x = q_sample(x_start, t_start, noise), then the loop from t_start (SDEdit). Strength 0
    returns x_start unchanged. With return_intermediates, also the list of x after each step
    (starting with the initial x).
    """
    step = _check_sampler(sampler)
    if x_start is not None and tuple(x_start.shape) != tuple(shape):
        raise DiffusionSettingError(f"x_start has shape {tuple(x_start.shape)}, expected {tuple(shape)}")
    if device is None:
        device = next((v.device for v in (x_start, noise) if v is not None), None)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
    from_noise = x_start is None or strength == 1.0
    t_start = diffusion.num_timesteps - 1 if from_noise else strength_to_t_start(diffusion, strength)
    if t_start < 0:
        return (x_start, [x_start]) if return_intermediates else x_start
    noise = _randn(shape, generator, device) if noise is None else noise.to(device)
    if from_noise:
        x = noise.float()
    else:
        t = torch.full((shape[0],), t_start, dtype=torch.long, device=device)
        x = diffusion.q_sample(x_start.to(device).float(), t, noise.float())
    return run_loop(step, model, diffusion, x, t_start, generator=generator, clip_denoised=clip_denoised,
                    eta=eta, progress=progress, return_intermediates=return_intermediates)


@torch.no_grad()
def ddim_reverse(model, diffusion, x0: Tensor, *, clip_denoised: bool = False, progress: bool = False) -> Tensor:
    """Deterministic DDIM inversion x_0 → x at the last index (where `sample` starts from noise).

    The inverse of the η = 0 step from index i to i−1: x̂_0 = (x − √(1−ᾱ_{i−1}) ε̂)/√ᾱ_{i−1},
    x_i = √ᾱ_i x̂_0 + √(1−ᾱ_i) ε̂, with ε̂ evaluated at (x_{i−1}, t_i) since x_i is not known yet.
    """
    x = x0.float()
    n = x.ndim
    for i in tqdm(range(diffusion.num_timesteps), disable=not progress, desc="ddim inversion", leave=False):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps = diffusion.p_mean_variance(model, x, t, clip_denoised)["eps"]
        abar = diffusion.table("alphas_cumprod", t, n)  # ᾱ_i
        abar_prev = diffusion.table("alphas_cumprod_prev", t, n)  # ᾱ_{i−1}
        pred_xstart = (x - torch.sqrt(1 - abar_prev) * eps) / torch.sqrt(abar_prev)
        x = torch.sqrt(abar) * pred_xstart + torch.sqrt(1 - abar) * eps
    return x
