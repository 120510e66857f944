"""Timestep respacing (Improved DDPM sec. 4): sample with a subsequence of the training steps.

Keeping steps S = {s_0 < s_1 < …} of a process with ᾱ_t gives a new process with
β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}} (ᾱ_{s_{−1}} = 1), so its ᾱ'_i equals ᾱ_{s_i} exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from guided_diffusion.diffusion import GaussianDiffusion
from guided_diffusion.errors import DiffusionSettingError


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """Sorted original timesteps to keep.

    "ddimN": N steps with one integer stride from 0 (DDIM's uniform spacing).
    "N" or N: N steps spread evenly over [0, T−1], both ends included.
    "a,b,c": T split into equal sections (the first T mod k one longer); a, b, c steps in each,
    placed exactly as openai's improved/guided-diffusion `space_timesteps` places them.
    """
    spec = str(section_counts).strip()
    if spec.startswith("ddim"):
        try:
            desired = int(spec[4:])
        except ValueError:
            raise DiffusionSettingError(f"bad respacing '{spec}': expected ddim<N>, e.g. ddim50") from None
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise DiffusionSettingError(f"cannot take {desired} equally strided steps of {num_timesteps}; use a plain count")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise DiffusionSettingError(f"bad respacing '{spec}': expected N, ddimN or comma-separated counts") from None
    size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if not 1 <= count <= length:
            raise DiffusionSettingError(f"respacing '{spec}': section {i} has {length} steps, cannot keep {count}")
        # openai's rule, float for float: a fractional stride accumulated count times, each
        # position rounded half to even (Python round), so settings carry over between code bases
        stride = (length - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += length
    return sorted(set(kept))


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept timesteps of a base schedule; the model still sees original t."""

    def __init__(self, use_timesteps, betas: np.ndarray, **kwargs):
        base_abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        kept = sorted(int(t) for t in set(use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= len(base_abar):
            raise ValueError("use_timesteps must be non-empty and within the base schedule")
        abar = base_abar[kept]
        abar_prev = np.append(1.0, abar[:-1])
        super().__init__(1.0 - abar / abar_prev, **kwargs)  # β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}}
        self.timestep_map = kept
        self.original_num_steps = len(base_abar)
        self._map_tables: dict[torch.device, Tensor] = {}

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Respaced indices → the original timesteps the network was trained on."""
        if t.device not in self._map_tables:
            self._map_tables[t.device] = torch.tensor(self.timestep_map, dtype=torch.long, device=t.device)
        return self._map_tables[t.device][t]
