"""Issue 17's training-side pieces: the EMA off the GPU (and every k steps), the sample grid without
a second network, `train.microbatch: auto`, an out-of-memory error that names the fix and keeps
the checkpoint, `model.use_checkpoint` changeable at resume."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from guided_diffusion import samplers
from guided_diffusion.training import loop
from guided_diffusion.training.checkpoint import latest_checkpoint, load_training_checkpoint
from guided_diffusion.training.ema import EMA, ema_decay
from guided_diffusion.training.factory import create_diffusion, create_model
from pipeline.common.config import load_config
from pipeline.common.images import make_grid
from tests.test_train_cli import run, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[1].running_mean.fill_(0.5)
    return model


def _brute_force_ema(thetas: list[torch.Tensor], theta0: torch.Tensor, rate: float, every: int) -> torch.Tensor:
    """Float64 EMA of the weights after each update, folding every `every`-th with the product of
    the decays it stands for."""
    shadow = theta0.double()
    for n, theta in enumerate(thetas):
        if (n + 1) % every == 0:
            kept = 1.0
            for j in range(n + 1 - every, n + 1):
                kept *= min(rate, (1 + j) / (10 + j))
            shadow = kept * shadow + (1 - kept) * theta.double()
    return shadow


@pytest.mark.parametrize("every", [1, 3])
def test_offloaded_ema_equals_the_on_device_one_and_the_brute_force_sum(every):
    model = _toy()
    theta0 = model[0].weight.detach().clone()
    here, offloaded = (EMA(model, [0.9, 0.5], offload=off, every=every) for off in (False, True))
    thetas = []
    g = torch.Generator().manual_seed(1)
    for n in range(7):
        with torch.no_grad():
            model[0].weight.add_(torch.randn(model[0].weight.shape, generator=g))
            model[1].running_mean.fill_(float(n))
        thetas.append(model[0].weight.detach().clone())
        here.update()
        offloaded.update()
    assert here.num_updates == offloaded.num_updates == 7
    for rate in (0.9, 0.5):
        for key, value in here.shadows[rate].items():
            assert torch.equal(value, offloaded.shadows[rate][key]), key  # the same fp32 arithmetic
        expected = _brute_force_ema(thetas, theta0, rate, every)
        torch.testing.assert_close(offloaded.shadows[rate]["0.weight"].double(), expected, rtol=1e-6, atol=1e-6)
        # buffers: copied at each fold (the last fold of every=3 is update 6, running_mean 5)
        assert offloaded.shadows[rate]["1.running_mean"][0].item() == (6.0 if every == 1 else 5.0)
    offloaded.close()
    assert ema_decay(0.9, 0, True) == pytest.approx(0.1)


def test_ema_on_cpu_resumes_bit_exactly_and_matches_the_on_device_run(tmp_path):
    cfg = write_config(tmp_path, train={"ema_device": "cpu"})
    straight, resumed, same = tmp_path / "straight", tmp_path / "resumed", tmp_path / "same"
    assert run("--config", str(cfg), "--out", str(straight)) == 0
    assert run("--config", str(cfg), "--out", str(resumed), "--set", "train.max_steps=3") == 0
    assert run("--resume", str(resumed), "--set", "train.max_steps=6") == 0
    assert run("--config", str(cfg), "--out", str(same), "--set", "train.ema_device=same") == 0
    for name in ("ema_0.99.safetensors", "ema_0.9.safetensors", "model.safetensors"):
        a, b, c = (load_file(str(d / "checkpoints" / "step_0000006" / name)) for d in (straight, resumed, same))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
            torch.testing.assert_close(a[key], c[key], rtol=1e-6, atol=1e-7)


def test_sample_grid_swaps_the_ema_into_the_training_model_and_puts_it_back(tmp_path, monkeypatch):
    cfg = load_config(write_config(tmp_path))
    torch.manual_seed(3)
    model = create_model(cfg).train()
    ema_weights = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in model.state_dict().items()}
    before = copy.deepcopy(model.state_dict())
    grids = []
    monkeypatch.setattr(loop, "write_image", lambda path, img: grids.append(img))
    for batch in (1, 8):
        loop.write_sample_grid(tmp_path / "grid.png", cfg, model, ema_weights, torch.device("cpu"), nullcontext, batch)
        assert model.training
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key  # the training weights are back, bit for bit
    # An independent draw: a separate network holding the EMA weights, the whole grid at once.
    other = create_model(cfg).eval()
    other.load_state_dict(ema_weights)
    shape = (cfg.train.sample_count, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.train.seed))
    with torch.no_grad():
        x = samplers.sample(other, create_diffusion(cfg, respacing=str(cfg.train.sample_steps)), shape, noise=noise)
    expected = make_grid(x.clamp(-1, 1).numpy())
    np.testing.assert_allclose(grids[0], expected, atol=1e-6)
    np.testing.assert_allclose(grids[0], grids[1], atol=1e-6)  # the same grid whatever the sampling batch


def test_microbatch_auto_and_ema_device_settings(tmp_path, capsys):
    cfg = write_config(tmp_path, train={"microbatch": "auto", "ema_device": "auto", "max_steps": 1})
    assert run("--config", str(cfg), "--out", str(tmp_path / "auto")) == 0  # CPU: the whole batch
    for setting, message in [("train.microbatch=some", "train.microbatch must be an integer >= 0 or auto"),
                             ("train.ema_device=gpu", "unknown train.ema_device 'gpu'; valid: auto, cpu, same"),
                             ("train.ema_every=0", "train.ema_every must be >= 1")]:
        capsys.readouterr()
        assert run("--config", str(cfg), "--out", str(tmp_path / "bad"), "--set", setting) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not (tmp_path / "bad").exists()


def test_out_of_memory_is_one_line_naming_the_fix_and_the_checkpoint_survives(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = loop.forward_backward
    calls = {"n": 0}

    def out_of_memory_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", out_of_memory_at_step_5)
    assert run("--config", str(write_config(tmp_path, train={"microbatch": 4})), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: out of GPU memory at step 5 (micro-batch 4"), err
    assert "--set train.microbatch=2" in err
    assert f"the last checkpoint {out / 'checkpoints' / 'step_0000003'} is intact" in err
    assert latest_checkpoint(out).name == "step_0000003"
    load_training_checkpoint(latest_checkpoint(out))  # every hash checks out
    monkeypatch.setattr(loop, "forward_backward", real)
    assert run("--resume", str(out), "--set", "train.microbatch=2") == 0


def test_use_checkpoint_may_change_at_resume_and_changes_nothing_else(tmp_path, capsys):
    cfg = write_config(tmp_path)
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    assert run("--config", str(cfg), "--out", str(straight)) == 0
    assert run("--config", str(cfg), "--out", str(switched), "--set", "train.max_steps=3") == 0
    assert run("--resume", str(switched), "--set", "train.max_steps=6", "--set", "model.use_checkpoint=true") == 0
    for name in ("model.safetensors", "ema_0.99.safetensors"):
        a, b = (load_file(str(Path(d) / "checkpoints" / "step_0000006" / name)) for d in (straight, switched))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert run("--resume", str(switched), "--set", "train.max_steps=7", "--set", "model.model_channels=8") == 2
    assert "model.model_channels" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_ema_on_the_cpu_equals_the_ema_on_the_gpu():
    """A model on the GPU, its weights changed on the GPU's stream right after each update (so a
    non-blocking copy that had not landed would see the next weights): the offloaded EMA (pinned
    copies, an event, worker-thread folds) equals the one kept on the GPU to float rounding
    (CUDA's and the CPU's lerp kernels may round differently) and the brute-force sum."""
    model = nn.Sequential(nn.Linear(1024, 1024), nn.BatchNorm1d(1024)).cuda()
    theta0 = model[0].weight.detach().cpu().clone()
    here, offloaded = (EMA(model, [0.99, 0.9], offload=off) for off in (False, True))
    thetas = []
    for n in range(12):
        with torch.no_grad():
            model[0].weight.mul_(0.5).add_(float(n))  # queued behind the copies on the same stream
            model[1].running_mean.fill_(float(n))
        thetas.append(model[0].weight.detach().cpu().clone())
        here.update()
        offloaded.update()
    assert offloaded.shadows[0.99]["0.weight"].device.type == "cpu"
    for rate in (0.99, 0.9):
        for key, value in here.shadows[rate].items():
            torch.testing.assert_close(offloaded.shadows[rate][key], value.cpu(), rtol=1e-6, atol=1e-6)
        expected = _brute_force_ema(thetas, theta0, rate, 1)
        torch.testing.assert_close(offloaded.shadows[rate]["0.weight"].double(), expected, rtol=1e-5, atol=1e-5)
    offloaded.close()
