"""Hours per checkpoint and per run at a measured speed (guided_diffusion.training.run_hours), the
speed read from log.csv, and `train-diffusion --plan --it-s`."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from guided_diffusion.training.logs import LOG_FIELDS
from guided_diffusion.training.run_hours import (
    format_run_hours,
    hours_per_checkpoint,
    measured_it_s,
    run_hours,
)
from pipeline.cli.train_diffusion import main
from pipeline.common.config import TrainConfig
from pipeline.common.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_hours_per_checkpoint_is_save_every_over_speed():
    assert hours_per_checkpoint(0.26, TrainConfig(save_every=500)) == pytest.approx(500 / 0.26 / 3600)
    assert hours_per_checkpoint(2.0, TrainConfig(save_every=7200)) == pytest.approx(1.0)


@pytest.mark.parametrize("speed", [0.0, -1.0, math.nan, math.inf])
def test_a_speed_must_be_positive_and_finite(speed):
    with pytest.raises(UserError, match="speed"):
        hours_per_checkpoint(speed, TrainConfig())
    with pytest.raises(UserError, match="speed"):
        run_hours(speed, TrainConfig(max_steps=10), 1)


def test_run_length_follows_max_steps_or_epochs():
    by_epochs = run_hours(0.5, TrainConfig(epochs=600, save_every=500), steps_per_epoch=16)
    assert by_epochs.total_steps == 9600 and by_epochs.total == pytest.approx(9600 / 0.5 / 3600)
    capped = run_hours(0.5, TrainConfig(epochs=600, max_steps=1800, save_every=500), steps_per_epoch=16)
    assert capped.total_steps == 1800 and capped.total == pytest.approx(1.0)
    resumed = run_hours(0.5, TrainConfig(max_steps=1800), steps_per_epoch=16, done=900)
    assert resumed.left == pytest.approx(0.5)
    with pytest.raises(UserError, match="fewer images than one batch"):
        run_hours(0.5, TrainConfig(epochs=3), steps_per_epoch=0)


def test_save_every_minutes_shortens_the_time_between_saves():
    h = run_hours(0.26, TrainConfig(save_every=500, save_every_minutes=30, max_steps=9600), 1)
    assert h.per_checkpoint == pytest.approx(0.534, abs=1e-3) and h.between_saves == pytest.approx(0.5)
    text = format_run_hours(h)
    assert "a checkpoint every 500 steps (train.save_every) = 0.53 h (32 min)" in text
    assert "train.save_every_minutes 30 saves every 0.50 h" in text
    assert "the run: 9600 steps = 10.26 h" in text and "left" not in text
    slow_timer = run_hours(0.26, TrainConfig(save_every=500, save_every_minutes=90, max_steps=9600), 1, done=4800)
    assert slow_timer.between_saves == slow_timer.per_checkpoint
    assert "save_every_minutes" not in format_run_hours(slow_timer)
    assert "4800 steps left after step 4800 = 5.13 h" in format_run_hours(slow_timer)
    fast = format_run_hours(run_hours(500.0, TrainConfig(save_every=1000, max_steps=4_000_000), 1))
    assert "= 0.00 h (2 s)" in fast and "the run: 4000000 steps = 2.22 h" in fast
    assert "= 222 h" in format_run_hours(run_hours(5.0, TrainConfig(max_steps=4_000_000), 1))


def write_log(path: Path, speeds: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        for i, speed in enumerate(speeds):
            writer.writerow({"step": 10 * (i + 1), "loss": "0.1", "it_s": speed})
    return path


def test_measured_speed_leaves_out_the_start_up_row(tmp_path):
    assert measured_it_s(write_log(tmp_path / "log.csv", ["0.05", "0.25", "0.27", "0.26"])) == pytest.approx(0.26)
    assert measured_it_s(write_log(tmp_path / "log.csv", ["0.05", "", "0.3"])) == pytest.approx(0.3)
    assert measured_it_s(write_log(tmp_path / "log.csv", ["0.05"])) is None  # start-up only
    assert measured_it_s(write_log(tmp_path / "log.csv", ["0.05"]), skip=0) == pytest.approx(0.05)
    assert measured_it_s(write_log(tmp_path / "log.csv", [])) is None
    assert measured_it_s(tmp_path / "missing.csv") is None


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "cpu"])
    return exc.value.code


def test_plan_prints_hours_at_the_given_speed(capsys):
    tiny = str(REPO / "configs" / "tiny-cpu.yaml")  # max_steps 400, save_every 200
    assert run_cli("--config", tiny, "--plan", "--it-s", "0.1") == 0
    out = capsys.readouterr().out
    assert "peak estimate" in out
    assert "at 0.1 it/s: a checkpoint every 200 steps (train.save_every) = 0.56 h" in out
    assert "the run: 400 steps = 1.11 h" in out
    # epochs: the steps per epoch come from the dataset (synthetic_count // batch_size)
    assert run_cli("--config", tiny, "--plan", "--it-s", "1", "--set", "train.max_steps=0",
                   "--set", "train.epochs=3", "--set", "data.synthetic_count=100") == 0
    assert "the run: 18 steps" in capsys.readouterr().out  # 3 x (100 // 16)


@pytest.mark.parametrize(("argv", "message"), [
    (["--it-s", "1"], "only go with --plan"),
    (["--plan", "--it-s", "0"], "speed must be > 0"),
    (["--plan", "--it-s", "1", "--set", "train.max_steps=0", "--set", "train.epochs=1",
      "--set", "data.path=/nonexistent/folder"], "not found"),
])
def test_bad_speed_arguments_are_one_line_errors(argv, message, capsys):
    assert run_cli("--config", str(REPO / "configs" / "tiny-cpu.yaml"), *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.usefixtures("one_torch_thread")
def test_plan_of_a_run_to_resume_says_what_is_left(tmp_path, capsys):
    cfg = {"data": {"image_size": 16, "synthetic_count": 16},
           "model": {"model_channels": 16, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [8],
                     "num_head_channels": 16},
           "diffusion": {"steps": 50},
           "train": {"batch_size": 8, "max_steps": 4, "log_every": 2, "save_every": 4, "sample_every": 100,
                     "stats_every": 100, "sample_count": 2, "sample_steps": 2}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert run_cli("--config", str(tmp_path / "tiny.yaml"), "--out", str(run)) == 0
    assert measured_it_s(run / "log.csv") > 0  # the second row: a real speed
    capsys.readouterr()
    assert run_cli("--resume", str(run), "--plan", "--it-s", "0.001", "--set", "train.max_steps=40") == 0
    out = capsys.readouterr().out
    assert "the run: 40 steps = 11.11 h; 36 steps left after step 4 = 10.00 h" in out
