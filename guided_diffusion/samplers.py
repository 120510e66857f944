"""Reverse-process samplers: one step function per sampler, one shared loop (k-diffusion style).

A step maps x at respaced index i to x at index i−1 (x_0 after index 0). The caller owns the
schedule: it picks the respacing and the index t_start to start from, and partial denoising
(SDEdit, Meng et al. 2021: noise a prior to t_start, then denoise) is just the tail of the
schedule; the network is evaluated t_start + 1 times. Steps may keep state between calls (a
multistep solver needs its previous x̂_0); the loop gives each run a fresh dict.
Noise comes from the caller's torch.Generator, or one generator per image (then image b's noise
depends only on its own generator, whatever the batch), so one seed gives the same images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from guided_diffusion.errors import DiffusionSettingError

Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn(shape, generator: Generators, device) -> Tensor:
    """Standard normal noise of `shape` on `device`: from `generator` (drawn on its device), or,
    for a sequence of generators, row b from generator b."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([_randn(shape[1:], g, device) for g in generator])
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where).to(device)


def ddpm_step(model, diffusion, x: Tensor, t: Tensor, *, generator: Generators = None, clip_denoised=True,
              eta=0.0, state=None):
    """Ancestral step (DDPM Alg. 2): x_{t−1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I), no noise at t = 0."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised)
    z = _randn(x.shape, generator, x.device)
    nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * z, out["pred_xstart"]


def ddim_step(model, diffusion, x: Tensor, t: Tensor, *, generator: Generators = None, clip_denoised=True,
              eta=0.0, state=None):
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


def _lambda(abar: Tensor) -> Tensor:
    """λ = log(α/σ) with α = √ᾱ, σ = √(1−ᾱ)."""
    return 0.5 * (torch.log(abar) - torch.log1p(-abar))


def dpmpp_2m_step(model, diffusion, x: Tensor, t: Tensor, *, generator: Generators = None, clip_denoised=True,
                  eta=0.0, state: dict | None = None):
    """DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2), data prediction, multistep, deterministic:
    x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x − α_{t_i}(e^{−h_i} − 1) D_i, h_i = λ_{t_i} − λ_{t_{i−1}},
    D_i = (1 + 1/(2r_i)) x̂_0(t_{i−1}) − 1/(2r_i) x̂_0(t_{i−2}), r_i = h_{i−1}/h_i;
    D_1 = x̂_0 (first order: the DDIM η = 0 step). The step into the last kept step (index 1 → 0)
    is first order too (as diffusers' lower_order_final): uniform-t spacings make its h several
    times the previous one, r ≪ 1, and the extrapolation weight 1/(2r) blows up. The step from
    index 0, to σ = 0, returns x̂_0."""
    x0 = diffusion.p_mean_variance(model, x, t, clip_denoised)["pred_xstart"]  # x_θ(x̃_{t_{i−1}}, t_{i−1})
    if int(t[0]) == 0:
        return x0, x0
    n = x.ndim
    abar = diffusion.table("alphas_cumprod", t, n)  # ᾱ at t_{i−1} (the current step)
    abar_next = diffusion.table("alphas_cumprod_prev", t, n)  # ᾱ at t_i (the next, less noisy step)
    h = _lambda(abar_next) - _lambda(abar)  # h_i
    d = x0
    if state is not None and "x0" in state and int(t[0]) > 1:
        r = state["h"] / h  # r_i = h_{i−1}/h_i
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * state["x0"]
    if state is not None:
        state.update(x0=x0, h=h)
    sigma_ratio = torch.sqrt((1 - abar_next) / (1 - abar))  # σ_{t_i}/σ_{t_{i−1}}
    return sigma_ratio * x - torch.sqrt(abar_next) * torch.expm1(-h) * d, x0


STEPS: dict[str, Callable] = {"ddim": ddim_step, "ddpm": ddpm_step, "dpm++2m": dpmpp_2m_step}


def step_for(sampler: str) -> Callable:
    """The step function of `sampler`; DiffusionSettingError if unknown."""
    if sampler not in STEPS:
        raise DiffusionSettingError(f"unknown sampler '{sampler}'; valid: {', '.join(STEPS)}")
    return STEPS[sampler]


def strength_to_t_start(diffusion, strength: float) -> int:
    """Respaced index to start denoising from, for a prior raised to noise level `strength`.

    −1 for strength 0 (nothing to do); else the kept step whose original timestep is nearest
    strength·T, T = the original number of steps (ties to the lower step), so strength 1 is the
    last index. `sample` then evaluates the network t_start + 1 times. (diffusers img2img instead
    runs int(strength·N) of its N steps; see README, "Strength".)
    """
    if not 0.0 <= strength <= 1.0:
        raise DiffusionSettingError(f"strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return -1
    kept = torch.tensor(diffusion.timestep_map, dtype=torch.float64)
    T = getattr(diffusion, "original_num_steps", diffusion.num_timesteps)
    target = round(strength * T, 9)  # 0.31·1000 is 310, not 310.00000000000006
    return int(torch.argmin((kept - target).abs()))


def run_loop(step: Callable, model, diffusion, x: Tensor, t_start: int, *, generator: Generators = None,
             clip_denoised=True, eta=0.0, progress=False, return_intermediates=False):
    """Apply `step` from index t_start down to 0. Returns x_0, or (x_0, [x at each index, x_0])."""
    intermediates = [x] if return_intermediates else None
    state: dict = {}
    for i in tqdm(range(t_start, -1, -1), disable=not progress, desc="sampling", leave=False):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        x, _ = step(model, diffusion, x, t, generator=generator, clip_denoised=clip_denoised, eta=eta, state=state)
        if return_intermediates:
            intermediates.append(x)
    return (x, intermediates) if return_intermediates else x


def with_autocast(model, autocast: Callable) -> Callable:
    """`model` run inside `autocast()` (mixed precision for the network only), output float32."""

    def run(x: Tensor, t: Tensor, **kwargs) -> Tensor:
        with autocast():
            return model(x, t, **kwargs).float()

    return run


@torch.no_grad()
def sample(model, diffusion, shape, *, sampler: str = "ddim", eta: float = 0.0, x_start: Tensor | None = None,
           t_start: int | None = None, noise: Tensor | None = None, generator: Generators = None,
           clip_denoised: bool = True, progress: bool = False, return_intermediates: bool = False,
           device=None) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Draw samples of `shape` (B, C, H, W), starting at respaced index t_start (default: the last).

    x_start None: x = noise (drawn from `generator` if not given) at the last index. With a prior
    x_start: x = q_sample(x_start, t_start, noise), then the loop from t_start (SDEdit); t_start −1
    returns x_start unchanged. With return_intermediates, also the list of x after each step
    (starting with the initial x).
    """
    step = step_for(sampler)
    last = diffusion.num_timesteps - 1
    t_start = last if t_start is None else t_start
    if not -1 <= t_start <= last:
        raise DiffusionSettingError(f"t_start must be in [-1, {last}], got {t_start}")
    if x_start is None and t_start != last:
        raise DiffusionSettingError(f"pure noise starts at the last index {last}; t_start {t_start} needs x_start")
    if x_start is not None and tuple(x_start.shape) != tuple(shape):
        raise DiffusionSettingError(f"x_start has shape {tuple(x_start.shape)}, expected {tuple(shape)}")
    if device is None:
        device = next((v.device for v in (x_start, noise) if v is not None), None)
        if device is None:
            device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    if t_start < 0:
        return (x_start, [x_start]) if return_intermediates else x_start
    noise = _randn(shape, generator, device) if noise is None else noise.to(device)
    if x_start is None:
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
