"""Run every benchmark (each writes benchmarks/results/<name>.json) and a Markdown summary table
of their headlines (benchmarks/results/summary.md)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from results_io import machine_facts

HERE = Path(__file__).parent
RESULTS = HERE / "results"
MARK = {True: "yes", False: "**no**", None: ""}


def summary_rows(name: str, seconds: float, result: dict | None, code: int) -> list[str]:
    """Table rows for one benchmark: its headlines, or why there are none."""
    label = f"{name} ({seconds:.0f} s)"
    if result is None:
        return [f"| {label} | failed (exit {code}) | | | |"]
    lines = result.get("headline") or [{"measured": "(no headline)", "value": "", "target": "", "met": None}]
    return [f"| {label if i == 0 else ''} | {h['measured']} | {h['value']} | {h['target']} | {MARK[h['met']]} |"
            for i, h in enumerate(lines)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", help="benchmark names, e.g. bench_unet")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem in args.only]
    facts = machine_facts()
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `make bench` on {facts['cores']} CPU cores of "
             f"{facts['cpu']} ({', '.join(facts['extensions']) or 'no AVX2/AVX-512/AMX'}), load "
             f"{facts['load_average_1min']:.2f} before the start{', quick mode' if args.quick else ''}. "
             "Ratios are against baselines run in the same benchmark.", "",
             "| benchmark | measured | value | target | met |", "|---|---|---|---|---|"]
    failed, missed = 0, []
    for script in scripts:
        result_file = RESULTS / f"{script.stem}.json"
        result_file.unlink(missing_ok=True)  # no stale result may pass for this run's
        start = time.perf_counter()
        cmd = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        ok = code == 0 and result_file.is_file()
        failed += not ok
        result = json.loads(result_file.read_text()) if ok else None
        lines += summary_rows(script.stem, time.perf_counter() - start, result, code)
        missed += [f"{script.stem}: {h['measured']}" for h in (result or {}).get("headline", []) if h["met"] is False]
    lines += ["", f"Targets missed: {len(missed)}" + "".join(f"\n- {m}" for m in missed)]
    summary = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {RESULTS}/*.json and {RESULTS / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
