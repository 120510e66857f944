"""How every benchmark reports: JSON on stdout and in benchmarks/results/<name>.json."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: Path, result: dict) -> None:
    """Print `result` as JSON and write it to `path` (creating the folder)."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
