"""Which torch device to run on: `auto|cpu|cuda[:N]|mps`, with a clear error when unavailable."""

from __future__ import annotations

from pipeline.common.errors import UserError


def pick_torch_device(requested: str = "auto"):
    """Resolve `auto|cpu|cuda[:N]|mps` to a torch.device, with a clear error when unavailable."""
    import torch

    requested = requested or "auto"
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{requested}' requested but CUDA is not available on this machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device 'mps' requested but MPS is not available on this machine")
    return device
