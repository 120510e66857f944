"""Exponential moving averages of a model's weights, at one or more rates, kept in fp32.

After each optimizer update n (0-based), every floating-point parameter θ moves its shadow θ̄:

    d = min(rate, (1 + n) / (10 + n))   with warm-up,  d = rate  without
    θ̄ ← d·θ̄ + (1 − d)·θ

The warm-up keeps early EMA weights close to the live ones (a plain 0.9999 EMA is still mostly
the random initialisation after thousands of steps). Buffers are copied, not averaged.

`every=k` folds the weights in every k-th update only, with the product of the k decays it
stands for (exact when θ did not move in between, the usual EMA-every-k approximation otherwise).

`offload=True` keeps the shadows in CPU memory, off the GPU: each update queues a non-blocking
copy of the live weights into pinned host buffers on the training stream (so the next optimizer
step cannot overwrite them first) and a worker thread folds them in once the copy has landed,
while the GPU trains on. Reading `shadows` waits for that fold, so what is saved or sampled is
always up to date, and the arithmetic (the same fp32 lerps in the same order) is the same
wherever the shadows live.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

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

    def __init__(self, model: nn.Module, rates: list[float], warmup: bool = True, offload: bool = False,
                 every: int = 1):
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.rates = [float(r) for r in rates]
        self.warmup = warmup
        self.every = every
        self.num_updates = 0
        # The live tensors, looked up once (load_state_dict copies in place, so they stay valid).
        self._params = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        self._buffers = list(model.named_buffers())
        home = torch.device("cpu") if offload else None
        self._shadows: dict[float, dict[str, torch.Tensor]] = {
            rate: {k: v.detach().to(home or v.device, torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                   for k, v in model.state_dict().items()}
            for rate in self.rates
        }
        self._staging: list[torch.Tensor] | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        if offload:
            pin = torch.cuda.is_available()
            self._staging = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for _, p in self._params]
            self._staging += [torch.empty(b.shape, dtype=b.dtype, pin_memory=pin) for _, b in self._buffers]
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="ema")

    @property
    def shadows(self) -> dict[float, dict[str, torch.Tensor]]:
        """The EMA weights of every rate, with every update so far folded in."""
        self.wait()
        return self._shadows

    def wait(self) -> None:
        """Block until a pending off-GPU update has been folded in (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _weights(self) -> list[float] | None:
        """(1 − decay) of each rate for this update, or None when this update skips the fold."""
        n = self.num_updates
        if (n + 1) % self.every:
            return None
        weights = []
        for rate in self.rates:
            kept = 1.0
            for j in range(n + 1 - self.every, n + 1):
                kept *= ema_decay(rate, j, self.warmup)
            weights.append(1.0 - kept)
        return weights

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into every shadow, then count the update."""
        weights = self._weights()
        self.num_updates += 1
        if weights is None:
            return
        if self._staging is None:
            self._fold([p.detach().float() for _, p in self._params], [b for _, b in self._buffers], weights)
            return
        self.wait()  # the worker has finished reading the staging buffers
        live = [p.detach() for _, p in self._params] + [b for _, b in self._buffers]
        for dst, src in zip(self._staging, live, strict=True):
            dst.copy_(src, non_blocking=True)
        event = None
        if any(t.is_cuda for t in live):
            event = torch.cuda.Event()
            event.record()
        split = len(self._params)
        self._pending = self._worker.submit(self._fold_when_copied, event, self._staging[:split],
                                            self._staging[split:], weights)

    def _fold_when_copied(self, event, params: list[torch.Tensor], buffers: list[torch.Tensor],
                          weights: list[float]) -> None:
        if event is not None:
            event.synchronize()
        self._fold(params, buffers, weights)

    def _fold(self, params: list[torch.Tensor], buffers: list[torch.Tensor], weights: list[float]) -> None:
        for shadow, weight in zip(self._shadows.values(), weights, strict=True):
            torch._foreach_lerp_([shadow[name] for name, _ in self._params], params, weight)
            for (name, _), buf in zip(self._buffers, buffers, strict=True):
                shadow[name].copy_(buf)

    def load_shadow(self, rate: float, state: dict[str, torch.Tensor]) -> None:
        """Replace the shadow of `rate` with a saved one (keys and shapes must match)."""
        shadow = self.shadows[float(rate)]
        missing = set(shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state keys differ: {sorted(missing)[:5]}")
        for name, value in state.items():
            shadow[name].copy_(value)

    def close(self) -> None:
        """Finish pending work and stop the worker thread."""
        self.wait()
        if self._worker is not None:
            self._worker.shutdown()
