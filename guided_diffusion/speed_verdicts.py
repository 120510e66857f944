"""Speed choices settled by timing on this machine once, then read from a cache.

Which of two ways to compute the same thing is faster depends on the CPU and on torch's thread
count more than on rules of thumb (bf16 autocast was 3x faster than fp32 on a Xeon with AMX and
~20x slower on an AVX2-only EPYC; Winograd convolutions beat oneDNN's direct ones on 2-core EPYCs
with and without AVX-512 and lost on a 16-core Xeon). So `precision: auto` and
`model.conv_algorithm: auto` time a small representative workload both ways and keep the verdict
in a JSON file under `$IRIS_DIFFUSION_CACHE` (default ~/.cache/iris-diffusion), one entry per
machine key (CPU model, what is compared, torch version, thread count). A corrupt or unwritable
cache is ignored, never an error.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.1  # the new way must beat the old by this much to be chosen: a margin for timing noise


class Verdict(NamedTuple):
    """The answer for this machine: faster or not, the measured time ratio (old / new: > 1 means
    the new way is faster), where it came from ("measured" now or "cached"), and the cache file
    (None when it could not be written)."""

    faster: bool
    speedup: float
    source: str
    cache: Path | None

    def where(self) -> str:
        """Where the verdict came from, for log lines: "cached in FILE", "measured, cached in FILE"
        or "measured, not cached"."""
        if self.source == "cached":
            return f"cached in {self.cache}"
        return f"measured, cached in {self.cache}" if self.cache is not None else "measured, not cached"


def machine_key(model: str, detail: str) -> str:
    """One cache entry per CPU model, compared `detail`, torch version and torch thread count."""
    return f"{model} | {detail} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def time_ratio(old: Callable[[], None], new: Callable[[], None], repeats: int) -> float:
    """Best time of `old` / best time of `new` over `repeats` calls each, taken in turns (old, new,
    old, …) after one untimed warm-up call of each, so that drift in the machine's speed falls on
    both alike; > 1 means `new` is faster."""
    best = {old: float("inf"), new: float("inf")}
    for step in (old, new):
        step()
    for _ in range(repeats):
        for step in (old, new):
            start = time.perf_counter()
            step()
            best[step] = min(best[step], time.perf_counter() - start)
    return best[old] / best[new]


def _read_entries(path: Path) -> dict:
    """The cache's entries; {} when the file is missing, unreadable or not a JSON object."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.debug("ignoring the speed cache %s: %s", path, exc)
        return {}
    if not isinstance(entries, dict):
        log.debug("ignoring the speed cache %s: not a JSON object", path)
        return {}
    return entries


def _cached_speedup(entries: dict, key: str) -> float | None:
    """The cached speed-up of `key`, or None if absent or malformed."""
    entry = entries.get(key)
    speedup = entry.get("speedup") if isinstance(entry, dict) else None
    if isinstance(speedup, (int, float)) and not isinstance(speedup, bool) and speedup > 0:
        return float(speedup)
    return None


def _write_entries(path: Path, entries: dict) -> bool:
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
        log.debug("could not write the speed cache %s: %s", path, exc)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False


def cached_verdict(path: Path, key: str, measure: Callable[[], float]) -> Verdict:
    """The verdict for machine `key`: read from the cache file `path` when it has an entry, else
    timed by `measure` (returning old time / new time) and written there."""
    entries = _read_entries(path)
    speedup = _cached_speedup(entries, key)
    if speedup is not None:
        return Verdict(speedup >= MIN_SPEEDUP, speedup, "cached", path)
    speedup = measure()
    entries[key] = {"speedup": round(speedup, 3), "measured": time.strftime("%Y-%m-%d")}
    written = _write_entries(path, entries)
    return Verdict(speedup >= MIN_SPEEDUP, speedup, "measured", path if written else None)
