"""Exponential moving averages of a model's weights, at one or more rates, kept in fp32.

After each optimizer update n (0-based), every floating-point parameter θ moves its shadow θ̄:

    d = min(rate, (1 + n) / (10 + n))   with warm-up,  d = rate  without
    θ̄ ← d·θ̄ + (1 − d)·θ

The warm-up keeps early EMA weights close to the live ones (a plain 0.9999 EMA is still mostly
the random initialisation after thousands of steps). Buffers are copied, not averaged.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(rate: float, num_updates: int, warmup: bool) -> float:
    """The decay applied at update `num_updates` (0-based)."""
    if not warmup:
        return rate
    return min(rate, (1.0 + num_updates) / (10.0 + num_updates))


def ema_file_name(rate: float) -> str:
    """The checkpoint file of one EMA rate, e.g. `ema_0.9999.safetensors`."""
    return f"ema_{float(rate)!r}.safetensors"


class EMA:
    """fp32 shadow copies of `model`'s state (same keys as `model.state_dict()`) for each rate."""

    def __init__(self, model: nn.Module, rates: list[float], warmup: bool = True):
        self.rates = [float(r) for r in rates]
        self.warmup = warmup
        self.num_updates = 0
        # The live tensors, looked up once (load_state_dict copies in place, so they stay valid).
        self._params = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        self._buffers = list(model.named_buffers())
        self.shadows: dict[float, dict[str, torch.Tensor]] = {
            rate: {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                   for k, v in model.state_dict().items()}
            for rate in self.rates
        }

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into every shadow, then count the update."""
        live = [p.detach().float() for _, p in self._params]
        for rate, shadow in self.shadows.items():
            weight = 1.0 - ema_decay(rate, self.num_updates, self.warmup)
            torch._foreach_lerp_([shadow[name] for name, _ in self._params], live, weight)
            for name, buf in self._buffers:
                shadow[name].copy_(buf)
        self.num_updates += 1

    def load_shadow(self, rate: float, state: dict[str, torch.Tensor]) -> None:
        """Replace the shadow of `rate` with a saved one (keys and shapes must match)."""
        shadow = self.shadows[float(rate)]
        missing = set(shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state keys differ: {sorted(missing)[:5]}")
        for name, value in state.items():
            shadow[name].copy_(value)
