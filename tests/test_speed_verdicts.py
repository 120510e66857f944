"""The timing behind the cached speed verdicts (`precision: auto`, `model.conv_algorithm: auto`):
best times taken in turns, and a ratio that matches known durations."""

from __future__ import annotations

import time

import pytest

from guided_diffusion import speed_verdicts


def test_time_ratio_matches_known_durations():
    def slow() -> None:
        time.sleep(0.02)

    def fast() -> None:
        time.sleep(0.01)

    assert speed_verdicts.time_ratio(slow, fast, repeats=3) == pytest.approx(2.0, rel=0.25)
    assert speed_verdicts.time_ratio(fast, slow, repeats=3) == pytest.approx(0.5, rel=0.25)


def test_time_ratio_warms_up_both_then_takes_turns():
    calls = []
    speed_verdicts.time_ratio(lambda: calls.append("old"), lambda: calls.append("new"), repeats=2)
    assert calls == ["old", "new"] * 3


def test_a_verdict_is_measured_once_per_machine_key(tmp_path):
    path, calls = tmp_path / "speed.json", []

    def measure() -> float:
        calls.append(1)
        return 1.05  # faster, but inside the noise margin

    first = speed_verdicts.cached_verdict(path, "cpu A", measure)
    assert first == speed_verdicts.Verdict(False, 1.05, "measured", path) and first.where() == f"measured, cached in {path}"
    second = speed_verdicts.cached_verdict(path, "cpu A", measure)
    assert second.source == "cached" and second.where() == f"cached in {path}" and calls == [1]
    assert speed_verdicts.cached_verdict(path, "cpu B", lambda: 1.5).faster
