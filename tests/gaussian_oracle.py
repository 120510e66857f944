"""An exact "denoiser" for Gaussian data, used as the model in diffusion and sampler tests.

If every pixel of x_0 is N(μ, s²) then x_t ~ N(√ᾱ_t μ, ᾱ_t s² + 1 − ᾱ_t) and
E[ε | x_t] = √(1−ᾱ_t)(x_t − √ᾱ_t μ)/(ᾱ_t s² + 1 − ᾱ_t).
"""

import numpy as np
import torch
from torch import nn


class GaussianOracle(nn.Module):
    """Returns E[ε | x_t] for the ORIGINAL timesteps t it receives (ᾱ from the base betas).

    learned_frac: if set, also returns the variance channels v = 2·frac − 1 (learned_range).
    """

    def __init__(self, betas: np.ndarray, mu: float, s: float, learned_frac: float | None = None):
        super().__init__()
        self.register_buffer("abar", torch.from_numpy(np.cumprod(1 - np.asarray(betas, np.float64))))
        self.mu, self.s, self.learned_frac = mu, s, learned_frac
        self.seen_t: list[torch.Tensor] = []
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        self.seen_t.append(t.clone())
        a = self.abar[t].view(-1, *([1] * (x.ndim - 1)))
        eps = torch.sqrt(1 - a) * (x.double() - torch.sqrt(a) * self.mu) / (a * self.s**2 + 1 - a)
        eps = eps.float()
        if self.learned_frac is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, 2 * self.learned_frac - 1)], dim=1)
