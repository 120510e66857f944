"""Facts about this machine that speed choices depend on (CPU model and flags from /proc/cpuinfo),
and the per-user cache directory where such choices and built kernels are kept:
`$IRIS_DIFFUSION_CACHE`, by default `~/.cache/iris-diffusion`."""

from __future__ import annotations

import os
from pathlib import Path


def cpuinfo_text() -> str:
    """/proc/cpuinfo, or "" where there is none (macOS, Windows) or it cannot be read."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo_field(text: str, name: str) -> str:
    """The value of the first `name : value` line of cpuinfo text ("" if absent)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return ""


def cpu_flags(text: str | None = None) -> set[str]:
    """The CPU's feature flags from cpuinfo text (default: this machine's /proc/cpuinfo; empty off
    Linux). Linux names them `flags` on x86 and `Features` on ARM."""
    text = cpuinfo_text() if text is None else text
    return set((_cpuinfo_field(text, "flags") or _cpuinfo_field(text, "Features")).split())


def cpu_model(text: str | None = None) -> str:
    """The CPU's model name from cpuinfo text (default: this machine's), or "unknown"."""
    text = cpuinfo_text() if text is None else text
    return _cpuinfo_field(text, "model name") or "unknown"


def cache_root() -> Path:
    """$IRIS_DIFFUSION_CACHE, else ~/.cache/iris-diffusion (not created here)."""
    return Path(os.environ.get("IRIS_DIFFUSION_CACHE") or Path.home() / ".cache" / "iris-diffusion")
