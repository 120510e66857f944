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
