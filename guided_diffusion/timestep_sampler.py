"""Which timesteps a training batch uses, with importance weights that keep the loss unbiased.

"uniform": t ~ U{0..T−1}, weight 1.
"loss_aware" (Improved DDPM sec. 3.3): p_t ∝ √E[L_t²] from the last `history` losses seen at
each t (uniform until every t has a full history), mixed with a little uniform mass; the weight
1/(T·p_t) makes E[w·L_t] equal the uniform-t average.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from guided_diffusion.errors import DiffusionSettingError


class UniformSampler:
    """t uniform over the diffusion's steps, unit weights."""

    def __init__(self, diffusion):
        self.num_timesteps = diffusion.num_timesteps

    def probabilities(self) -> np.ndarray:
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(t LongTensor (B,), weights FloatTensor (B,)) on `device`; drawn with `generator`."""
        where = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=where)
        return t.to(device), torch.ones(batch_size, device=device)

    def update_with_losses(self, t: Tensor, losses: Tensor) -> None:
        """Nothing to learn."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless."""


class LossAwareSampler(UniformSampler):
    """Importance sampling by the RMS of recent per-timestep losses."""

    def __init__(self, diffusion, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(diffusion)
        self.history, self.uniform_prob = history, uniform_prob
        self.losses = np.zeros((self.num_timesteps, history), dtype=np.float64)
        self.counts = np.zeros(self.num_timesteps, dtype=np.int64)  # losses seen per t (capped)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> np.ndarray:
        """p_t ∝ √E[L_t²], mixed (1 − u)·p + u/T; uniform before every t has a full history."""
        if not self.warmed_up():
            return super().probabilities()
        rms = np.sqrt((self.losses**2).mean(axis=1))
        p = rms / rms.sum()
        return (1 - self.uniform_prob) * p + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        where = generator.device if generator is not None else torch.device("cpu")
        p = self.probabilities()
        probs = torch.tensor(p, dtype=torch.float64, device=where)
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probs[t])  # importance weight 1/(T p_t)
        return t.to(device), weights.float().to(device)

    def update_with_losses(self, t: Tensor, losses: Tensor) -> None:
        """Record per-image losses at their timesteps (under DDP, pass the all-gathered ones)."""
        for ti, loss in zip(t.detach().cpu().tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if self.counts[ti] == self.history:  # drop the oldest
                self.losses[ti, :-1] = self.losses[ti, 1:]
                self.losses[ti, -1] = loss
            else:
                self.losses[ti, self.counts[ti]] = loss
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": torch.from_numpy(self.losses.copy()), "counts": torch.from_numpy(self.counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        losses, counts = state["losses"].numpy(), state["counts"].numpy()
        if losses.shape != self.losses.shape:
            raise DiffusionSettingError(f"loss-aware sampler state has shape {tuple(losses.shape)}, "
                            f"expected {self.losses.shape} (different diffusion steps?)")
        self.losses, self.counts = losses.astype(np.float64).copy(), counts.astype(np.int64).copy()


SAMPLERS = {"uniform": UniformSampler, "loss_aware": LossAwareSampler}


def create_timestep_sampler(name: str, diffusion) -> UniformSampler:
    """The named timestep sampler ("uniform" | "loss_aware") for `diffusion`."""
    if name not in SAMPLERS:
        raise DiffusionSettingError(f"unknown timestep sampler '{name}'; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](diffusion)
