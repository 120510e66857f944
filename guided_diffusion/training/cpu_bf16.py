"""Is bf16 autocast worth it on this CPU? What `precision: auto` asks on a CPU.

Only CPUs with native bf16 arithmetic (AMX-BF16, AVX512-BF16) run bf16 convolutions fast; on
others oneDNN emulates them (measured 2026-11-26: the HP1 U-Net forward+backward ran 2.97x faster
in bf16 on a Sapphire Rapids with AMX, ~20x slower on an AVX2-only EPYC). So the CPU flags decide
first; where they promise native bf16, a tiny timed self-check confirms it, and its verdict is
cached per machine (CPU model, flags, torch version, thread count; guided_diffusion/speed_verdicts.py)
in `$IRIS_DIFFUSION_CACHE/cpu_bf16.json`, by default `~/.cache/iris-diffusion/cpu_bf16.json`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from guided_diffusion import speed_verdicts
from guided_diffusion.machine import cache_root, cpu_flags, cpu_model
from guided_diffusion.speed_verdicts import MIN_SPEEDUP, Verdict, cached_verdict, time_ratio

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names
CACHE_FILE = "cpu_bf16.json"


def native_bf16_flags(flags: Iterable[str]) -> list[str]:
    """The native-bf16 flags among `flags`, in a fixed order (amx_bf16, avx512_bf16)."""
    present = set(flags)
    return [f for f in NATIVE_BF16_FLAGS if f in present]


def cache_path() -> Path:
    """Where verdicts are cached: $IRIS_DIFFUSION_CACHE/cpu_bf16.json, else ~/.cache/iris-diffusion/."""
    return cache_root() / CACHE_FILE


def machine_key(model: str, flags: list[str]) -> str:
    """One cache entry per CPU model, native-bf16 flags, torch version and torch thread count."""
    return speed_verdicts.machine_key(model, ",".join(flags))


# ---------------------------------------------------------------------------------- self-check


def _conv_step(weights: list[torch.Tensor], x: torch.Tensor) -> None:
    """One forward+backward pass of a small conv net (3x3 convs, GroupNorm, SiLU: a U-Net's diet)."""
    h = x
    for w in weights:
        h = F.silu(F.group_norm(F.conv2d(h, w, padding=1), 8))
    h.float().square().mean().backward()


def measure_speedup(batch: int = 8, channels: int = 64, size: int = 32, layers: int = 2, repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small conv net's forward+backward on the CPU (best of
    `repeats` each, in turns; > 1 means bf16 is faster). About 0.1–0.3 s on a CPU with native bf16."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator, device="cpu")
    weights = [(torch.randn(channels, channels, 3, 3, generator=generator, device="cpu") * 0.05).requires_grad_()
               for _ in range(layers)]

    def fp32() -> None:
        _conv_step(weights, x)

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _conv_step(weights, x)

    return time_ratio(fp32, bf16, repeats)


def cpu_bf16_is_faster(flags: list[str], model: str | None = None, path: Path | None = None,
                       measure: Callable[[], float] | None = None) -> Verdict:
    """Whether bf16 autocast beats fp32 on this CPU, which has the native-bf16 `flags` (non-empty):
    read from the cache when this machine has an entry, else timed by `measure` (default
    `measure_speedup`) and cached. A corrupt or unwritable cache is ignored, never an error."""
    path = cache_path() if path is None else path
    key = machine_key(cpu_model() if model is None else model, flags)
    return cached_verdict(path, key, measure or measure_speedup)


def auto_cpu_precision() -> tuple[str, str]:
    """`precision: auto` on the CPU: ("bf16" | "fp32", why), for the log."""
    flags = native_bf16_flags(cpu_flags())
    if not flags:
        return "fp32", "no AMX/AVX512-BF16: bf16 would be emulated"
    verdict = cpu_bf16_is_faster(flags)
    where = verdict.where()
    if verdict.faster:
        return "bf16", f"{'+'.join(flags)}; self-check {verdict.speedup:.1f}x faster than fp32, {where}"
    return "fp32", (f"{'+'.join(flags)}, but the self-check ran bf16 at {verdict.speedup:.2f}x the speed "
                    f"of fp32, below {MIN_SPEEDUP}x; {where}")
