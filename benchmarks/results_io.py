"""How every benchmark reports: JSON on stdout and in benchmarks/results/<name>.json, with a
`headline` list (what `make bench` puts in its summary table)."""

from __future__ import annotations

import json
from pathlib import Path


def headline(measured: str, value: str, target: str = "", met: bool | None = None) -> dict:
    """One summary line: what was measured, its value with units, the target and whether it was met
    (None: no target)."""
    return {"measured": measured, "value": value, "target": target, "met": met}


def write_result(path: Path, result: dict) -> None:
    """Print `result` as JSON and write it to `path` (creating the folder)."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def machine_facts() -> dict:
    """What a CPU figure depends on: CPU model, its vector/matrix extensions, cores, load, versions."""
    import os
    import platform

    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "extensions": sorted(f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx"))),
            "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version()}
