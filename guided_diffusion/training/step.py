"""The pieces of one optimizer step: batch checks, precision (autocast, loss scaling), and the
micro-batched forward/backward.

Micro-batching is exact: a batch of B split into micro-batches of m runs B/m forward/backward
passes, each adding the gradient of (m/B)·mean_i(w_i·L_i) over its m images — together the
gradient of the full-batch objective mean_i(w_i·L_i), with w the timestep sampler's importance
weights. Under DDP, gradients are all-reduced only on the last micro-batch (`no_sync`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from guided_diffusion.training import cpu_bf16
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_batching(batch_size: int, microbatch: int | str, world_size: int = 1) -> int:
    """Validate batch settings; return the per-rank micro-batch size (0 → the whole rank batch;
    "auto" → the whole rank batch here, for the memory plan to lower)."""
    if batch_size < 1:
        raise UserError(f"train.batch_size must be >= 1, got {batch_size}")
    if batch_size % world_size:
        raise UserError(f"train.batch_size {batch_size} must be divisible by the number of processes ({world_size})")
    per_rank = batch_size // world_size
    if microbatch == "auto":
        return per_rank
    if isinstance(microbatch, str):
        raise UserError(f"train.microbatch must be an integer >= 0 or auto, got '{microbatch}'")
    if microbatch < 0:
        raise UserError(f"train.microbatch must be >= 0 (0 = off), got {microbatch}")
    if microbatch == 0:
        return per_rank
    if microbatch > per_rank:
        raise UserError(f"train.microbatch {microbatch} is larger than the batch of {per_rank}"
                        + (f" per process ({batch_size} / {world_size})" if world_size > 1 else ""))
    if per_rank % microbatch:
        raise UserError(f"train.batch_size {per_rank}" + (" per process" if world_size > 1 else "")
                        + f" is not divisible by train.microbatch {microbatch}")
    return microbatch


def resolve_precision(requested: str, device: torch.device, setting: str = "train.precision") -> str:
    """fp32 | bf16 | fp16 for this device. auto: bf16 on CUDA where supported, else fp16; on a CPU
    bf16 where it is native (AMX/AVX512-BF16) and a cached self-check finds it faster, else fp32
    (emulated bf16 is far slower); fp32 on MPS. auto logs its choice and why. `setting` names the
    option in error messages."""
    if requested not in PRECISIONS:
        raise UserError(f"unknown {setting} '{requested}'; valid: {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device.type == "cuda":
            chosen, why = ("bf16", "the GPU supports bf16") if torch.cuda.is_bf16_supported() else (
                "fp16", "no bf16 on this GPU")
        elif device.type == "cpu":
            chosen, why = cpu_bf16.auto_cpu_precision()
        else:
            chosen, why = "fp32", f"no half-precision autocast on {device.type} here"
        log.info("precision auto → %s on %s (%s)", chosen, device.type.upper(), why)
        return chosen
    if requested == "fp16" and device.type != "cuda":
        raise UserError(f"{setting} fp16 needs a CUDA device (got {device.type}); use fp32 or bf16")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{setting} bf16 is not supported by this GPU; use fp16 or fp32")
    if requested == "bf16" and device.type == "mps":
        raise UserError(f"{setting} bf16 is not supported on MPS here; use fp32")
    if requested == "bf16" and device.type == "cpu" and not cpu_bf16.native_bf16_flags(cpu_bf16.cpu_flags()):
        log.warning("%s bf16 on a CPU without AMX/AVX512-BF16: bf16 is emulated here, expect it to be much "
                    "slower than fp32", setting)
    return requested


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context of `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler_for(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (CUDA); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def forward_backward(model: nn.Module, diffusion, x_start: Tensor, t: Tensor, weights: Tensor, noise: Tensor,
                     microbatch: int, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     scaler: torch.amp.GradScaler | None = None) -> Tensor:
    """Accumulate the gradient of mean(weights · loss) over the batch in micro-batches.

    Returns the per-image losses (B,), detached, fp32. `model` may be a DDP wrapper.
    """
    batch = x_start.shape[0]
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    losses = []
    for start in range(0, batch, microbatch):
        end = min(start + microbatch, batch)
        sync = contextlib.nullcontext() if end == batch else no_sync()
        with sync:
            with autocast():
                terms = diffusion.training_losses(model, x_start[start:end], t[start:end], noise=noise[start:end])
            per_image = terms["loss"].float()
            loss = (per_image * weights[start:end]).mean() * ((end - start) / batch)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(per_image.detach())
    return torch.cat(losses)
