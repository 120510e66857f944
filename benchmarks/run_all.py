"""Run every benchmark (each writes benchmarks/results/<name>.json) and a Markdown summary table."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    """Nested JSON → {"a.b.c": scalar}."""
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        return {prefix[:-1]: f"[{len(tree)} items]"} if tree and isinstance(tree[0], (dict, list)) else {
            prefix[:-1]: tree}
    return {prefix[:-1]: tree}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", help="benchmark names, e.g. bench_unet")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem in args.only]
    lines = ["| benchmark | seconds | result |", "|---|---|---|"]
    failed = 0
    for script in scripts:
        start = time.perf_counter()
        cmd = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        seconds = time.perf_counter() - start
        result = RESULTS / f"{script.stem}.json"
        if code != 0 or not result.is_file():
            failed += 1
            lines.append(f"| {script.stem} | {seconds:.0f} | failed (exit {code}) |")
            continue
        flat = _flatten(json.loads(result.read_text()))
        keys = [k for k in flat if any(w in k for w in ("ratio", "per_s", "s_per_step", "peak", "overhead"))]
        shown = "; ".join(f"{k}={flat[k]:.4g}" if isinstance(flat[k], float) else f"{k}={flat[k]}"
                          for k in keys[:8])
        lines.append(f"| {script.stem} | {seconds:.0f} | {shown} |")
    summary = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {RESULTS}/*.json and {RESULTS / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
