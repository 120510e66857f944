"""`precision: auto` on CPUs (issue 20): bf16 only where the CPU has native bf16 (AMX-BF16 or
AVX512-BF16) and a cached timed self-check finds it faster; fp32 elsewhere, without timing; one log
line saying which and why. And bf16 training follows the fp32 loss curve within noise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from guided_diffusion import machine
from guided_diffusion.training import cpu_bf16
from guided_diffusion.training.step import autocast_for, resolve_precision
from tests.test_train_cli import read_rows, run

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
ZEN3 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""
ZEN4 = "model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """The verdict cache in a temporary folder (IRIS_DIFFUSION_CACHE), never the user's."""
    monkeypatch.setenv("IRIS_DIFFUSION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_cpu(monkeypatch, cpuinfo: str) -> None:
    """Make this machine look like the CPU of `cpuinfo`."""
    monkeypatch.setattr(machine, "cpuinfo_text", lambda: cpuinfo)


def fake_timing(monkeypatch, speedup: float) -> list[int]:
    """Replace the self-check by one that reports `speedup`; returns a list counting its calls."""
    calls = []

    def measure() -> float:
        calls.append(1)
        return speedup

    monkeypatch.setattr(cpu_bf16, "measure_speedup", measure)
    return calls


def auto_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision auto")]


# ------------------------------------------------------------------------------ flag detection


def test_flags_and_model_are_read_from_cpuinfo_text():
    assert cpu_bf16.native_bf16_flags(cpu_bf16.cpu_flags(SAPPHIRE_RAPIDS)) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16.native_bf16_flags(cpu_bf16.cpu_flags(ZEN4)) == ["avx512_bf16"]
    assert cpu_bf16.native_bf16_flags(cpu_bf16.cpu_flags(ZEN3)) == []
    assert cpu_bf16.cpu_flags(ARM) == {"fp", "asimd", "bf16", "i8mm"}  # ARM's names, not x86 bf16
    assert cpu_bf16.cpu_flags("") == set() and cpu_bf16.cpu_model("") == "unknown"
    assert cpu_bf16.cpu_model(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert cpu_bf16.native_bf16_flags({"avx512_bf16", "amx_bf16", "avx2"}) == ["amx_bf16", "avx512_bf16"]


# ----------------------------------------------------------------------------- auto on the CPU


def test_auto_is_fp32_without_native_bf16_and_never_times(monkeypatch, caplog, cache_dir):
    fake_cpu(monkeypatch, ZEN3)

    def must_not_time(*args, **kwargs):
        raise AssertionError("the self-check ran on a CPU without native bf16")

    monkeypatch.setattr(cpu_bf16, "measure_speedup", must_not_time)
    monkeypatch.setattr(cpu_bf16, "cpu_bf16_is_faster", must_not_time)
    with caplog.at_level(logging.INFO):
        assert resolve_precision("auto", CPU) == "fp32"
    assert auto_lines(caplog) == ["precision auto → fp32 on CPU (no AMX/AVX512-BF16: bf16 would be emulated)"]
    assert not cache_dir.exists()


def test_auto_is_bf16_when_native_and_the_self_check_finds_it_faster(monkeypatch, caplog, cache_dir):
    fake_cpu(monkeypatch, SAPPHIRE_RAPIDS)
    calls = fake_timing(monkeypatch, 2.9)
    with caplog.at_level(logging.INFO):
        assert resolve_precision("auto", CPU) == "bf16"
    assert calls == [1]
    assert auto_lines(caplog) == [f"precision auto → bf16 on CPU (amx_bf16+avx512_bf16; self-check 2.9x faster than "
                                  f"fp32, measured, cached in {cache_dir / 'cpu_bf16.json'})"]


def test_auto_is_fp32_when_the_self_check_finds_bf16_slower(monkeypatch, caplog, cache_dir):
    fake_cpu(monkeypatch, ZEN4)
    fake_timing(monkeypatch, 0.8)
    with caplog.at_level(logging.INFO):
        assert resolve_precision("auto", CPU, "generate.precision") == "fp32"
    (line,) = auto_lines(caplog)
    assert line.startswith("precision auto → fp32 on CPU (avx512_bf16, but the self-check ran bf16 at 0.80x")


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    fake_cpu(monkeypatch, ZEN3)
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", CPU) == "bf16"
    assert any("expect it to be much slower" in r.getMessage() for r in caplog.records)
    caplog.clear()
    fake_cpu(monkeypatch, SAPPHIRE_RAPIDS)
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", CPU) == "bf16"
    assert caplog.records == []


def test_cpu_bf16_autocast_runs_convolutions_in_bf16():
    conv = torch.nn.Conv2d(2, 4, 3)
    with autocast_for("bf16", CPU)():
        y = conv(torch.randn(1, 2, 8, 8))
    assert y.dtype == torch.bfloat16 and conv.weight.dtype == torch.float32


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("cpuinfo,speedup,expected", [(SAPPHIRE_RAPIDS, 2.9, "bf16"), (SAPPHIRE_RAPIDS, 0.5, "fp32"),
                                                     (ZEN3, 2.9, "fp32")], ids=["amx-faster", "amx-slower", "avx2"])
def test_generate_auto_follows_the_cpu_verdict(tiny_run, monkeypatch, cache_dir, cpuinfo, speedup, expected):
    from pipeline.common.config import load_config
    from pipeline.generate import generate

    fake_cpu(monkeypatch, cpuinfo)
    fake_timing(monkeypatch, speedup)
    cfg = load_config(None, ["generate.n=1", "generate.steps=2", "generate.precision=auto"])
    result = generate(cfg, tiny_run, source="noise", device="cpu", progress=False)
    assert result.metadata["precision"] == expected


# ------------------------------------------------------------------------------- verdict cache


def test_the_verdict_is_timed_once_then_read_from_the_cache(monkeypatch, cache_dir):
    calls = fake_timing(monkeypatch, 2.5)
    first = cpu_bf16.cpu_bf16_is_faster(["amx_bf16"], model="Xeon")
    assert first == cpu_bf16.Verdict(True, 2.5, "measured", cache_dir / "cpu_bf16.json") and calls == [1]
    second = cpu_bf16.cpu_bf16_is_faster(["amx_bf16"], model="Xeon")
    assert second == cpu_bf16.Verdict(True, 2.5, "cached", cache_dir / "cpu_bf16.json") and calls == [1]
    cpu_bf16.cpu_bf16_is_faster(["amx_bf16"], model="another CPU")  # another machine: timed again
    assert calls == [1, 1]
    entries = json.loads((cache_dir / "cpu_bf16.json").read_text())
    assert entries[cpu_bf16.machine_key("Xeon", ["amx_bf16"])]["speedup"] == 2.5 and len(entries) == 2
    assert [p.name for p in cache_dir.iterdir()] == ["cpu_bf16.json"]  # no temp file left behind


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": {"speedup": "fast"}}'])
def test_a_corrupt_cache_is_ignored_and_replaced(monkeypatch, cache_dir, caplog, content):
    cache_dir.mkdir()
    key = cpu_bf16.machine_key("Xeon", ["amx_bf16"])
    (cache_dir / "cpu_bf16.json").write_text(content.replace("%s", key))
    calls = fake_timing(monkeypatch, 0.5)
    with caplog.at_level(logging.DEBUG):
        verdict = cpu_bf16.cpu_bf16_is_faster(["amx_bf16"], model="Xeon")
    assert verdict == cpu_bf16.Verdict(False, 0.5, "measured", cache_dir / "cpu_bf16.json") and calls == [1]
    assert json.loads((cache_dir / "cpu_bf16.json").read_text())[key]["speedup"] == 0.5
    assert all(r.levelno <= logging.DEBUG for r in caplog.records)


def test_an_unwritable_cache_is_not_an_error(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fake_timing(monkeypatch, 3.0)
    with caplog.at_level(logging.DEBUG):
        verdict = cpu_bf16.cpu_bf16_is_faster(["amx_bf16"], model="Xeon", path=blocker / "cpu_bf16.json")
    assert verdict == cpu_bf16.Verdict(True, 3.0, "measured", None)
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_the_default_cache_path_and_its_override(monkeypatch, tmp_path):
    monkeypatch.delenv("IRIS_DIFFUSION_CACHE", raising=False)
    assert cpu_bf16.cache_path() == Path.home() / ".cache" / "iris-diffusion" / "cpu_bf16.json"
    monkeypatch.setenv("IRIS_DIFFUSION_CACHE", str(tmp_path))
    assert cpu_bf16.cache_path() == tmp_path / "cpu_bf16.json"


def test_the_real_self_check_returns_a_time_ratio():
    """The timing itself, at a toy size (bf16 is emulated here, so the ratio says nothing)."""
    speedup = cpu_bf16.measure_speedup(batch=1, channels=8, size=8, layers=1, repeats=1)
    assert np.isfinite(speedup) and speedup > 0


# ------------------------------------------------------------------ bf16 vs fp32 loss curves


def within_noise(reference: np.ndarray, other: np.ndarray) -> bool:
    """Two per-step loss curves of the same seed (same data, timesteps and noise at every step)
    agree within noise when their mean |difference| is below a quarter of the reference's own
    step-to-step spread, mean |L[i+1] - L[i]| (the noise of sampling timesteps and noise that
    every curve has)."""
    spread = np.abs(np.diff(reference)).mean()
    return bool(np.abs(other - reference).mean() < spread / 4)


def test_the_noise_criterion_can_fail():
    rng = np.random.default_rng(0)
    curve = np.linspace(1.0, 0.2, 40) + 0.1 * rng.standard_normal(40)
    assert within_noise(curve, curve + 0.005 * rng.standard_normal(40))
    assert not within_noise(curve, curve + 0.05)  # a shift of half the noise
    assert not within_noise(curve, np.linspace(1.0, 0.2, 40) + 0.1 * rng.standard_normal(40))  # another draw


def train_losses(tmp_path: Path, precision: str, seed: int = 0) -> tuple[np.ndarray, Path]:
    """Per-step losses of configs/tiny-cpu.yaml shrunk to 16 px, 16 channels, 24 steps on the CPU."""
    out = tmp_path / f"{precision}_{seed}"
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    settings = {"train.precision": precision, "train.seed": seed, "data.image_size": 16, "data.synthetic_count": 32,
                "model.model_channels": 16, "model.num_head_channels": 16, "train.batch_size": 8,
                "train.max_steps": 24, "train.log_every": 1, "train.save_every": 24, "train.stats_every": 1000,
                "train.sample_every": 1000, "train.sample_count": 1, "train.sample_steps": 2}
    assert run("--config", str(config), "--out", str(out),
               *sum((["--set", f"{k}={v}"] for k, v in settings.items()), [])) == 0
    return np.array([float(r["loss"]) for r in read_rows(out / "log.csv")]), out / "checkpoints" / "step_0000024"


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_bf16_follows_the_fp32_loss_curve_within_noise(tmp_path):
    fp32, _ = train_losses(tmp_path, "fp32")
    bf16, ckpt = train_losses(tmp_path, "bf16")
    other_seed, _ = train_losses(tmp_path, "fp32", seed=1)
    assert len(fp32) == len(bf16) == 24
    assert within_noise(fp32, bf16), (fp32, bf16)
    assert not within_noise(fp32, other_seed)  # the criterion separates real differences
    # autocast touched only the arithmetic: weights, EMAs and AdamW's moments stay fp32
    for name in ("model.safetensors", "ema_0.999.safetensors", "ema_0.99.safetensors"):
        assert {v.dtype for v in load_file(str(ckpt / name)).values()} == {torch.float32}
    state = torch.load(ckpt / "state.pt", weights_only=True)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    assert moments and {v.dtype for v in moments} == {torch.float32}
