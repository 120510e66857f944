"""Is bf16 autocast worth it on this CPU? What `precision: auto` asks on a CPU.

Only CPUs with native bf16 arithmetic (AMX-BF16, AVX512-BF16) run bf16 convolutions fast; on
others oneDNN emulates them (measured 2026-11-26: the HP1 U-Net forward+backward ran 2.97x faster
in bf16 on a Sapphire Rapids with AMX, ~20x slower on an AVX2-only EPYC). So the CPU flags decide
first; where they promise native bf16, a tiny timed self-check confirms it, and its verdict is
cached per machine (CPU model, flags, torch version, thread count) in a JSON file:
`$IRIS_DIFFUSION_CACHE/cpu_bf16.json`, by default `~/.cache/iris-diffusion/cpu_bf16.json`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from guided_diffusion.machine import cache_root, cpu_flags, cpu_model

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names
MIN_SPEEDUP = 1.1  # bf16 must beat fp32 by this much to be chosen: a margin for timing noise
CACHE_FILE = "cpu_bf16.json"


class Verdict(NamedTuple):
    """The answer for this machine: bf16 faster or not, the measured fp32/bf16 time ratio, where
    it came from ("measured" now or "cached"), and the cache file (None when it could not be written)."""

    faster: bool
    speedup: float
    source: str
    cache: Path | None


def native_bf16_flags(flags: Iterable[str]) -> list[str]:
    """The native-bf16 flags among `flags`, in a fixed order (amx_bf16, avx512_bf16)."""
    present = set(flags)
    return [f for f in NATIVE_BF16_FLAGS if f in present]


def cache_path() -> Path:
    """Where verdicts are cached: $IRIS_DIFFUSION_CACHE/cpu_bf16.json, else ~/.cache/iris-diffusion/."""
    return cache_root() / CACHE_FILE


def machine_key(model: str, flags: list[str]) -> str:
    """One cache entry per CPU model, native-bf16 flags, torch version and torch thread count."""
    return f"{model} | {','.join(flags)} | torch {torch.__version__} | {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------- self-check


def _conv_step(weights: list[torch.Tensor], x: torch.Tensor) -> None:
    """One forward+backward pass of a small conv net (3x3 convs, GroupNorm, SiLU: a U-Net's diet)."""
    h = x
    for w in weights:
        h = F.silu(F.group_norm(F.conv2d(h, w, padding=1), 8))
    h.float().square().mean().backward()


def _best_time(step: Callable[[], None], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `step`, after one untimed warm-up call."""
    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def measure_speedup(batch: int = 8, channels: int = 64, size: int = 32, layers: int = 2, repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small conv net's forward+backward on the CPU (best of
    `repeats`; > 1 means bf16 is faster). About 0.1–0.3 s on a CPU with native bf16."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator)
    weights = [(torch.randn(channels, channels, 3, 3, generator=generator) * 0.05).requires_grad_()
               for _ in range(layers)]

    def fp32() -> None:
        _conv_step(weights, x)

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _conv_step(weights, x)

    return _best_time(fp32, repeats) / _best_time(bf16, repeats)


# --------------------------------------------------------------------------------------- cache


def _read_cache(path: Path) -> dict:
    """The cache's entries; {} when the file is missing, unreadable or not a JSON object."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.debug("ignoring the CPU bf16 cache %s: %s", path, exc)
        return {}
    if not isinstance(entries, dict):
        log.debug("ignoring the CPU bf16 cache %s: not a JSON object", path)
        return {}
    return entries


def _cached_speedup(entries: dict, key: str) -> float | None:
    """The cached speed-up of `key`, or None if absent or malformed."""
    entry = entries.get(key)
    speedup = entry.get("speedup") if isinstance(entry, dict) else None
    if isinstance(speedup, (int, float)) and not isinstance(speedup, bool) and speedup > 0:
        return float(speedup)
    return None


def _write_cache(path: Path, entries: dict) -> bool:
    """Write `entries` atomically (a temp file in the same folder, then os.replace); False on failure."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False) as f:
            tmp = Path(f.name)
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError as exc:
        log.debug("could not write the CPU bf16 cache %s: %s", path, exc)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False


def cpu_bf16_is_faster(flags: list[str], model: str | None = None, path: Path | None = None,
                       measure: Callable[[], float] | None = None) -> Verdict:
    """Whether bf16 autocast beats fp32 on this CPU, which has the native-bf16 `flags` (non-empty):
    read from the cache when this machine has an entry, else timed by `measure` (default
    `measure_speedup`) and cached. A corrupt or unwritable cache is ignored, never an error."""
    path = cache_path() if path is None else path
    key = machine_key(cpu_model() if model is None else model, flags)
    entries = _read_cache(path)
    speedup = _cached_speedup(entries, key)
    if speedup is not None:
        return Verdict(speedup >= MIN_SPEEDUP, speedup, "cached", path)
    speedup = (measure or measure_speedup)()
    entries[key] = {"speedup": round(speedup, 3), "measured": time.strftime("%Y-%m-%d")}
    written = _write_cache(path, entries)
    return Verdict(speedup >= MIN_SPEEDUP, speedup, "measured", path if written else None)


def auto_cpu_precision() -> tuple[str, str]:
    """`precision: auto` on the CPU: ("bf16" | "fp32", why), for the log."""
    flags = native_bf16_flags(cpu_flags())
    if not flags:
        return "fp32", "no AMX/AVX512-BF16: bf16 would be emulated"
    verdict = cpu_bf16_is_faster(flags)
    where = (f"{verdict.source}, cached in {verdict.cache}" if verdict.cache is not None
             else f"{verdict.source}, not cached")
    if verdict.faster:
        return "bf16", f"{'+'.join(flags)}; self-check {verdict.speedup:.1f}x faster than fp32, {where}"
    return "fp32", (f"{'+'.join(flags)}, but the self-check ran bf16 at {verdict.speedup:.2f}x the speed "
                    f"of fp32, below {MIN_SPEEDUP}x; {where}")
