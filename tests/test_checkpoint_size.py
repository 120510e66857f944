"""Drive-sized checkpoints: train.save_dtype, train.final_optimizer, keep_last 1, train.save_every_minutes,
the logged size, its estimate and the free-space warning.

Sizes are checked against the files on disk (os.path.getsize), not against the estimator.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from guided_diffusion.timestep_sampler import create_timestep_sampler
from guided_diffusion.training import checkpoint as ckpt_mod
from guided_diffusion.training import loop, save_policy
from guided_diffusion.training.checkpoint import (
    latest_checkpoint,
    load_for_inference,
    load_training_checkpoint,
    save_checkpoint,
)
from guided_diffusion.training.ema import EMA
from guided_diffusion.training.factory import create_diffusion, create_model
from guided_diffusion.training.resume import warn_lossy_resume
from guided_diffusion.training.save_policy import SaveTimer, estimate_size
from pipeline.common.config import Config, config_from_dict
from tests.test_train_cli import TINY, run
from tests.test_train_cli import write_config as write_tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def tiny_sections(**train) -> dict:
    """tests/test_train_cli.py's tiny config, loss-aware, every checkpoint kept, with `train` settings."""
    return {"diffusion": {"timestep_sampler": "loss_aware"},
            "train": {"keep_last": 0, "stats_every": 100, **train}}


def write_config(tmp_path: Path, **train) -> Path:
    return write_tiny_config(tmp_path, **tiny_sections(**train))


def size(path: Path) -> int:
    return os.path.getsize(path)


def tiny_cfg(**train) -> Config:
    sections = tiny_sections(**train)
    return config_from_dict({k: {**v, **sections.get(k, {})} for k, v in TINY.items()})


def tiny_state(cfg: Config) -> tuple[torch.nn.Module, EMA, dict]:
    """A model, its EMAs and a train_state shaped like session.save's, after two AdamW steps."""
    model = create_model(cfg)
    ema = EMA(model, cfg.train.ema_rates)
    opt = torch.optim.AdamW(model.parameters())
    sampler = create_timestep_sampler(cfg.diffusion.timestep_sampler, create_diffusion(cfg))
    for _ in range(2):
        model(torch.randn(2, 1, 16, 16), torch.tensor([3, 7])).square().mean().backward()
        opt.step()
        ema.update()
    state = {"step": 2, "epoch": 0, "batch_in_epoch": 2, "optimizer": opt.state_dict(), "scaler": None,
             "timestep_sampler": sampler.state_dict(), "ema_num_updates": 2,
             "rng": ckpt_mod.capture_rng_state(), "progress": {"best_loss": 1.0, "bad_total": 0},
             "num_images": 24, "world_size": 1, "torch_version": str(torch.__version__)}
    return model, ema, state


# ---------------------------------------------------------------------------------- save_dtype


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_save_dtype_sets_the_ema_files_only_and_they_load(tmp_path, dtype):
    cfg = tiny_cfg(save_dtype=dtype)
    model, ema, state = tiny_state(cfg)
    path = save_checkpoint(tmp_path, 2, cfg, model.state_dict(), ema.shadows, state, 2, ema_dtype=dtype)
    for rate in (0.99, 0.9):
        saved = load_file(str(path / f"ema_{rate}.safetensors"))
        assert {v.dtype for v in saved.values()} == {HALF[dtype]}
        assert all(torch.equal(saved[k], v.to(HALF[dtype])) for k, v in ema.shadows[rate].items())
    assert {v.dtype for v in load_file(str(path / "model.safetensors")).values()} == {torch.float32}
    moments = torch.load(path / "state.pt", weights_only=True)["optimizer"]["state"][0]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float32

    # Sampling: the network gets fp32 copies of the rounded values.
    net, _, info = load_for_inference(tmp_path, ema_rate=0.99)
    assert info["weights"] == "ema_0.99.safetensors"
    for k, v in net.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ema.shadows[0.99][k].to(HALF[dtype]).float())
    # Resuming: the fp32 shadows start from the rounded values too.
    loaded = load_training_checkpoint(path)
    fresh = EMA(create_model(cfg), cfg.train.ema_rates)
    fresh.load_shadow(0.9, loaded.ema_states[0.9])
    for k, v in fresh.shadows[0.9].items():
        assert v.dtype == torch.float32 and torch.equal(v, ema.shadows[0.9][k].to(HALF[dtype]).float())


def test_fp16_ema_files_are_half_the_size(tmp_path):
    cfg = tiny_cfg()
    model, ema, state = tiny_state(cfg)
    full = save_checkpoint(tmp_path / "a", 2, cfg, model.state_dict(), ema.shadows, state, 2)
    half = save_checkpoint(tmp_path / "b", 2, cfg, model.state_dict(), ema.shadows, state, 2, ema_dtype="fp16")
    for name in ("ema_0.99.safetensors", "ema_0.9.safetensors"):
        assert 0.49 < size(half / name) / size(full / name) < 0.52, name
    for name in ("model.safetensors", "state.pt"):
        assert size(half / name) == size(full / name), name


@pytest.mark.parametrize("setting, message", [
    ("train.save_dtype=fp8", "train.save_dtype must be one of fp32, fp16, bf16, got 'fp8'"),
    ("train.save_every_minutes=-5", "train.save_every_minutes must be >= 0"),
])
def test_bad_save_settings_are_one_line_errors(tmp_path, capsys, setting, message):
    assert run("--config", str(write_config(tmp_path)), "--out", str(tmp_path / "run"), "--set", setting) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- final_optimizer


def test_final_checkpoint_without_optimizer_is_small_and_resumes_with_fresh_moments(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, save_dtype="fp16", final_optimizer=False)
    assert run("--config", str(cfg), "--out", str(out)) == 0
    ck = out / "checkpoints"
    mid, final = ck / "step_0000003", ck / "step_0000006"
    mid_state = torch.load(mid / "state.pt", weights_only=True)
    final_state = torch.load(final / "state.pt", weights_only=True)
    assert len(mid_state["optimizer"]["state"]) > 0 and final_state["optimizer"] is None
    assert final_state["step"] == 6 and final_state["rng"]
    assert size(final / "state.pt") < size(mid / "state.pt") / 20
    assert {v.dtype for v in load_file(str(mid / "model.safetensors")).values()} == {torch.float32}
    final_model = load_file(str(final / "model.safetensors"))
    assert {v.dtype for v in final_model.values()} == {torch.float16}
    assert 0.49 < size(final / "model.safetensors") / size(mid / "model.safetensors") < 0.52
    net, _, _ = load_for_inference(out, ema_rate=0)
    assert all(torch.equal(v, final_model[k].float()) for k, v in net.state_dict().items())

    caplog.set_level(logging.WARNING)
    caplog.clear()
    warn_lossy_resume(load_training_checkpoint(mid))  # a regular checkpoint: only the EMAs are rounded
    assert [r.getMessage() for r in caplog.records] == [
        f"resuming: the EMA weights of {mid} are saved in fp16; the EMAs continue from those rounded values"]
    caplog.clear()

    # More steps from the optimizer-less checkpoint: it warns, and AdamW counts its steps from zero.
    assert run("--resume", str(out), "--set", "train.max_steps=8", "--set", "train.final_optimizer=true") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the model weights" in w and "fp16" in w for w in warnings)
    assert any("no optimizer state" in w and "fresh moments" in w and "not bit-exact" in w for w in warnings)
    resumed = torch.load(ck / "step_0000008" / "state.pt", weights_only=True)
    assert {float(s["step"]) for s in resumed["optimizer"]["state"].values()} == {2.0}
    assert {v.dtype for v in load_file(str(ck / "step_0000008" / "model.safetensors")).values()} == {torch.float32}
    assert (ck / "latest").read_text().strip() == "step_0000008"


# ------------------------------------------------------------------ save_every_minutes, keep_last


def test_save_timer_with_a_fake_clock():
    now = [100.0]
    timer = SaveTimer(clock=lambda: now[0])
    now[0] += 59.9
    assert not timer.due(1.0) and not timer.due(0.0)
    now[0] += 0.1
    assert timer.due(1.0) and not timer.due(0.0) and not timer.due(1.01)
    timer.reset()
    assert not timer.due(1.0)
    now[0] += 30.0
    assert timer.due(0.5) and not timer.due(1.0)


def test_time_based_saves_land_on_the_right_steps_and_change_nothing(tmp_path, monkeypatch):
    clock = {"t": 1000.0}
    original = loop.draw_batch

    def slow_draw(*args):  # every step takes 25 s of the fake clock
        clock["t"] += 25.0
        return original(*args)

    monkeypatch.setattr(save_policy, "time", SimpleNamespace(monotonic=lambda: clock["t"]))
    monkeypatch.setattr(loop, "draw_batch", slow_draw)
    timed, plain = tmp_path / "timed", tmp_path / "plain"
    # 25 s a step, a save due 60 s after the last: steps 3 and 6 (75 s each), then the last one.
    cfg = write_config(tmp_path, max_steps=8, save_every=100, save_every_minutes=1.0, save_dtype="fp16")
    assert run("--config", str(cfg), "--out", str(timed)) == 0
    assert sorted(p.name for p in (timed / "checkpoints").iterdir()) == [
        "latest", "step_0000003", "step_0000006", "step_0000008"]

    # The same run saved every 2 steps, keeping 1: it ends with the same weights and one checkpoint.
    cfg = write_config(tmp_path, max_steps=8, save_every=2, keep_last=1)
    assert run("--config", str(cfg), "--out", str(plain)) == 0
    assert sorted(p.name for p in (plain / "checkpoints").iterdir()) == ["latest", "step_0000008"]
    a = load_file(str(timed / "checkpoints" / "step_0000008" / "model.safetensors"))
    b = load_file(str(plain / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)

    # Resuming from the fp16-EMA checkpoint of step 6 is still bit-exact for the model.
    shutil.rmtree(timed / "checkpoints" / "step_0000008")
    (timed / "checkpoints" / "latest").write_text("step_0000006\n")
    assert run("--resume", str(timed)) == 0
    c = load_file(str(timed / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_keep_last_1_never_leaves_zero_complete_checkpoints(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    model, ema, state = tiny_state(cfg)
    seen = []

    def complete_step() -> str | None:
        try:
            return load_training_checkpoint(latest_checkpoint(tmp_path)).path.name
        except Exception:
            return None

    def watched(func):
        def wrapper(*args, **kwargs):
            result = func(*args, **kwargs)
            seen.append((func.__name__, Path(args[0]).name, complete_step()))
            return result
        return wrapper

    save_checkpoint(tmp_path, 1, cfg, model.state_dict(), ema.shadows, state, 1)
    monkeypatch.setattr(ckpt_mod.os, "replace", watched(os.replace))
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", watched(shutil.rmtree))
    for step in (2, 3):
        save_checkpoint(tmp_path, step, cfg, model.state_dict(), ema.shadows, state, 1)
    assert all(step is not None for _, _, step in seen), seen
    assert ("rmtree", "step_0000002", "step_0000003") in seen  # the old one went after the new one was in
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000003"]


# --------------------------------------------------------------------------- size, free space


def logged_size(caplog, name: str) -> tuple[str, list[float]]:
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"checkpoint {name}: "))
    match = re.fullmatch(rf"checkpoint {name}: ([\d.]+) (\w+) \(model ([\d.]+), ema 2×([\d.]+), state ([\d.]+)\)",
                         line)
    assert match, line
    return match[2], [float(match[i]) for i in (1, 3, 4, 5)]


@pytest.mark.parametrize("model_dtype, ema_dtype, optimizer", [("fp32", "fp32", True), ("fp16", "fp16", False)])
def test_size_estimate_and_log_match_the_files(tmp_path, caplog, model_dtype, ema_dtype, optimizer):
    cfg = tiny_cfg()
    model, ema, state = tiny_state(cfg)
    state["optimizer"] = state["optimizer"] if optimizer else None
    caplog.set_level(logging.INFO)
    path = save_checkpoint(tmp_path, 2, cfg, model.state_dict(), ema.shadows, state, 2, model_dtype, ema_dtype)
    est = estimate_size(model.state_dict(), ema.shadows, state, model_dtype, ema_dtype)
    real_emas = [size(path / "ema_0.9.safetensors"), size(path / "ema_0.99.safetensors")]
    real_total = sum(size(p) for p in path.iterdir())
    assert est.model == pytest.approx(size(path / "model.safetensors"), rel=0.03)
    assert est.emas == pytest.approx(real_emas, rel=0.03)
    assert est.state == pytest.approx(size(path / "state.pt"), rel=0.03)
    assert est.total == pytest.approx(real_total, rel=0.03)

    unit, (total, model_size, ema_size, state_size) = logged_size(caplog, "step_0000002")
    scale = {"KiB": 2**10, "MiB": 2**20}[unit]
    assert total == pytest.approx(real_total / scale, abs=0.006)
    assert model_size == pytest.approx(size(path / "model.safetensors") / scale, abs=0.006)
    assert ema_size == pytest.approx(real_emas[0] / scale, abs=0.006)
    assert state_size == pytest.approx(size(path / "state.pt") / scale, abs=0.006)


def test_low_free_space_is_warned_before_saving(tmp_path, caplog, monkeypatch):
    cfg = tiny_cfg()
    model, ema, state = tiny_state(cfg)
    usage = namedtuple("usage", "total used free")
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(save_policy.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**9, 10**9))
    path = save_checkpoint(tmp_path, 1, cfg, model.state_dict(), ema.shadows, state, 2)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]

    seen = []
    monkeypatch.setattr(save_policy.shutil, "disk_usage",
                        lambda path: seen.append(Path(path)) or usage(10**12, 10**12 - 300_000, 300_000))
    save_checkpoint(tmp_path, 2, cfg, model.state_dict(), ema.shadows, state, 2)
    assert seen == [tmp_path / "checkpoints"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    match = re.search(r"checkpoint step_0000002 needs about ([\d.]+) MiB but only 292.97 KiB is free", warning)
    assert match, warning
    assert float(match[1]) * 2**20 == pytest.approx(sum(size(p) for p in path.iterdir()), rel=0.03)
    assert "train.keep_last 1" in warning and "train.save_dtype fp16" in warning
