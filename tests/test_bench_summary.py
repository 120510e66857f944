"""`make bench`'s summary table: one row per headline, failures and stale results shown as such."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402
from results_io import headline  # noqa: E402


def test_rows_per_headline_and_for_failures():
    result = {"headline": [headline("speed", "3 images/s", "≥ 2 images/s", True),
                           headline("memory", "1.2x", "≤ 1.15x", False), headline("note", "x")]}
    rows = run_all.summary_rows("bench_x", 12.4, result, 0)
    assert rows == ["| bench_x (12 s) | speed | 3 images/s | ≥ 2 images/s | yes |",
                    "|  | memory | 1.2x | ≤ 1.15x | **no** |",
                    "|  | note | x |  |  |"]
    assert run_all.summary_rows("bench_y", 1, None, 3) == ["| bench_y (1 s) | failed (exit 3) | | | |"]
    assert "(no headline)" in run_all.summary_rows("bench_z", 1, {}, 0)[0]


def test_run_all_reports_a_failing_benchmark_and_not_its_stale_result(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench_fail.json").write_text(json.dumps({"headline": [headline("old", "1")]}))
    (tmp_path / "bench_fail.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "bench_ok.py").write_text(
        "import json, pathlib\n"
        "p = pathlib.Path(__file__).parent / 'results' / 'bench_ok.json'\n"
        "p.write_text(json.dumps({'headline': [{'measured': 'm', 'value': '5', 'target': '', 'met': None}]}))\n")
    (tmp_path / "bench_miss.py").write_text(
        "import json, pathlib\n"
        "p = pathlib.Path(__file__).parent / 'results' / 'bench_miss.json'\n"
        "p.write_text(json.dumps({'headline': [{'measured': 'slow', 'value': '9', 'target': '< 5', 'met': False}]}))\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["run_all.py"])
    assert run_all.main() == 1
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "| bench_fail (0 s) | failed (exit 3) |" in summary and "old" not in summary
    assert "| m | 5 |" in summary and "Targets missed: 1\n- bench_miss: slow" in summary


def test_help_exits_zero():
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout


def test_readme_block_replaces_only_between_its_markers():
    from readme_block import replace_block

    text = "intro\n<!-- t -->\nold table\n<!-- /t -->\nafter\n"
    assert replace_block(text, "t", "| a |\n|---|\n") == "intro\n<!-- t -->\n| a |\n|---|\n<!-- /t -->\nafter\n"
    for bad in ("no markers\n", "<!-- /t -->\n<!-- t -->\n", text + "<!-- t -->\n"):
        with pytest.raises(ValueError, match="README needs"):
            replace_block(bad, "t", "x")
