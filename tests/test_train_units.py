"""Unit tests of the training helpers: LR schedules, EMA, micro-batching, checkpoints, probes, data slices."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.training import checkpoint as ckpt_mod
from guided_diffusion.training import cpu_bf16
from guided_diffusion.training.checkpoint import (
    load_for_inference,
    load_training_checkpoint,
    read_train_state,
    save_checkpoint,
)
from guided_diffusion.training.distributed import Dist
from guided_diffusion.training.ema import EMA, ema_decay, ema_file_name
from guided_diffusion.training.factory import create_diffusion, create_model
from guided_diffusion.training.loop import batch_indices, params_sha256, total_steps
from guided_diffusion.training.lr_schedule import check_schedule, lr_at
from guided_diffusion.training.resume import resume_differences
from guided_diffusion.training.stats import ACT_EPS, ActivationProbe, block_grad_norms, named_blocks
from guided_diffusion.training.step import check_batching, forward_backward, resolve_precision
from pipeline.common.batches import iterate_batches
from pipeline.common.config import Config, TrainConfig, load_config
from pipeline.common.errors import UserError

TINY = ["data.image_size=16", "model.model_channels=16", "model.num_res_blocks=1", "model.channel_mult=[1,2]",
        "model.attention_resolutions=[8]", "model.num_head_channels=16", "diffusion.steps=100"]



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def tiny_cfg(*extra: str) -> Config:
    return load_config(None, TINY + list(extra))


# ------------------------------------------------------------------------------ LR schedules


def test_gear_boundaries_in_steps():
    tc = TrainConfig(lr_schedule="gear", gear=[[0, 3e-4], [100, 1e-4], [250, 5e-5]], gear_unit="steps")
    check_schedule(tc)
    assert lr_at(0, 10, 1000, tc) == 3e-4
    assert lr_at(99, 10, 1000, tc) == 3e-4
    assert lr_at(100, 10, 1000, tc) == 1e-4
    assert lr_at(249, 10, 1000, tc) == 1e-4
    assert lr_at(250, 10, 1000, tc) == 5e-5
    assert lr_at(10_000, 10, 1000, tc) == 5e-5


def test_gear_boundaries_in_epochs():
    tc = TrainConfig(lr_schedule="gear", gear=[[0, 3e-4], [2, 1e-4]], gear_unit="epochs")
    spe = 7  # epoch 2 starts at step 14
    assert lr_at(13, spe, 100, tc) == 3e-4
    assert lr_at(14, spe, 100, tc) == 1e-4


def test_warmup_on_top_of_gear_and_constant():
    tc = TrainConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(0, 5, 100, tc) == pytest.approx(1e-4)
    assert lr_at(4, 5, 100, tc) == pytest.approx(5e-4)
    assert lr_at(9, 5, 100, tc) == pytest.approx(1e-3)
    assert lr_at(50, 5, 100, tc) == 1e-3
    gear = TrainConfig(lr_schedule="gear", gear=[[0, 2e-4], [5, 1e-4]], warmup_steps=10)
    assert lr_at(1, 5, 100, gear) == pytest.approx(2e-4 * 2 / 10)
    assert lr_at(7, 5, 100, gear) == pytest.approx(1e-4 * 8 / 10)


def test_cosine_endpoints_and_midpoint():
    tc = TrainConfig(lr_schedule="cosine", lr=1e-3, min_lr=1e-5)
    assert lr_at(0, 10, 200, tc) == pytest.approx(1e-3)
    assert lr_at(100, 10, 200, tc) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(200, 10, 200, tc) == pytest.approx(1e-5)
    values = [lr_at(s, 10, 200, tc) for s in range(201)]
    assert all(b <= a for a, b in zip(values[:-1], values[1:], strict=True))


@pytest.mark.parametrize("kwargs, message", [
    ({"lr_schedule": "step"}, "unknown train.lr_schedule 'step'"),
    ({"lr_schedule": "gear", "gear": [[0, 1e-4], [10, 1e-5], [5, 1e-6]]}, "must increase strictly"),
    ({"lr_schedule": "gear", "gear": [[1, 1e-4]]}, "must start at 0"),
    ({"lr_schedule": "gear", "gear": []}, "train.gear is empty"),
    ({"lr_schedule": "gear", "gear": [[0, 1e-4]], "gear_unit": "days"}, "unknown train.gear_unit"),
])
def test_bad_schedules_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        check_schedule(TrainConfig(**kwargs))


def test_total_steps_takes_the_first_limit():
    assert total_steps(TrainConfig(epochs=3, max_steps=0), 10) == 30
    assert total_steps(TrainConfig(epochs=3, max_steps=25), 10) == 25
    assert total_steps(TrainConfig(epochs=0, max_steps=25), 10) == 25
    with pytest.raises(UserError, match="both are 0"):
        total_steps(TrainConfig(epochs=0, max_steps=0), 10)


# ---------------------------------------------------------------------------------------- EMA


def test_ema_matches_hand_computation_with_and_without_warmup():
    model = nn.Linear(3, 2)
    model.register_buffer("counter", torch.tensor([5.0]))
    theta0 = model.weight.detach().double().clone()
    for warmup in (True, False):
        with torch.no_grad():
            model.weight.copy_(theta0)
        ema = EMA(model, [0.9, 0.5], warmup=warmup)
        expected = {0.9: theta0.clone(), 0.5: theta0.clone()}
        for n in range(4):
            with torch.no_grad():
                model.weight.add_(torch.full_like(model.weight, 0.25 * (n + 1)))
                model.counter.fill_(float(n))
            ema.update()
            for rate in expected:
                d = min(rate, (1 + n) / (10 + n)) if warmup else rate
                expected[rate] = d * expected[rate] + (1 - d) * model.weight.detach().double()
        for rate, value in expected.items():
            assert ema.shadows[rate]["weight"].dtype == torch.float32
            torch.testing.assert_close(ema.shadows[rate]["weight"].double(), value, rtol=1e-6, atol=1e-6)
            assert ema.shadows[rate]["counter"].item() == 3.0  # buffers copied
        assert ema.num_updates == 4
    assert ema_decay(0.9999, 0, True) == pytest.approx(0.1)
    assert ema_decay(0.9999, 10**9, True) == 0.9999
    assert ema_file_name(0.9999) == "ema_0.9999.safetensors"


# -------------------------------------------------------------------------------- micro-batching


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("weighted", [False, True])
def test_microbatch_gradient_equals_full_batch(weighted):
    cfg = tiny_cfg()
    model, diffusion = create_model(cfg), create_diffusion(cfg)
    with torch.no_grad():  # leave the zero-initialised output layers so every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, 100, (12,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    w = torch.rand(12, generator=g) * 3 + 0.1 if weighted else torch.ones(12)

    # Reference: one pass, the gradient of mean(w · loss) written out directly.
    model.zero_grad()
    (w * diffusion.training_losses(model, x, t, noise=noise)["loss"]).mean().backward()
    reference = _grads(model).clone()

    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    for micro in (12, 3):
        model.zero_grad()
        calls.clear()
        losses = forward_backward(model, diffusion, x, t, w, noise, micro)
        assert len(calls) == 12 // micro
        assert losses.shape == (12,)
        rel = (_grads(model) - reference).norm() / reference.norm()
        assert rel <= 1e-5, (micro, float(rel))
    handle.remove()


def test_check_batching():
    assert check_batching(120, 3) == 3
    assert check_batching(32, 0) == 32
    assert check_batching(8, 2, world_size=2) == 2
    with pytest.raises(UserError, match="not divisible by train.microbatch 7"):
        check_batching(120, 7)
    with pytest.raises(UserError, match="larger than the batch"):
        check_batching(4, 8)
    with pytest.raises(UserError, match="divisible by the number of processes"):
        check_batching(9, 0, world_size=2)


def test_precision_resolution_on_cpu(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "cpu_flags", lambda: {"avx2", "fma"})  # a CPU without native bf16
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UserError, match="unknown train.precision"):
        resolve_precision("fp8", cpu)


# ------------------------------------------------------------------------------------ data order


def test_batches_follow_the_shared_epoch_order_and_ranks_are_disjoint():
    images = np.arange(23, dtype=np.float32).reshape(23, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)
    for epoch in (0, 3):
        expected = list(iterate_batches(images.copy(), 5, seed=4, start_epoch=epoch))
        for index in range(4):
            idx, _ = batch_indices(23, 5, 4, epoch, index, Dist(), hflip=False)
            np.testing.assert_array_equal(images[idx], expected[index])
    a, _ = batch_indices(23, 6, 4, 1, 2, Dist(0, 2), hflip=False)
    b, _ = batch_indices(23, 6, 4, 1, 2, Dist(1, 2), hflip=False)
    whole, _ = batch_indices(23, 6, 4, 1, 2, Dist(), hflip=False)
    assert len(a) == len(b) == 3 and not set(a) & set(b)
    np.testing.assert_array_equal(np.concatenate([a, b]), whole)


# ------------------------------------------------------------------------------------ probes


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(1, 4, 1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()), nn.Conv2d(4, 2, 1)])
        with torch.no_grad():
            self.blocks[0][0].bias[1] = -1e3  # channel 1 of the ReLU can never fire

    def forward(self, x):
        h = self.blocks[0](self.first(x))
        return self.blocks[1](F.silu(h))  # silu outside any block: not counted


def test_activation_probe_finds_the_dead_channel():
    model = _Toy()
    assert [n for n, _ in named_blocks(model)] == ["first", "blocks.0", "blocks.1"]
    xs = [torch.randn(3, 1, 5, 5), torch.randn(2, 1, 5, 5)]  # two micro-batches
    with ActivationProbe(model) as probe:
        for x in xs:
            model(x).sum().backward()
    stats = probe.results()
    assert set(stats) == {"blocks.0"}
    acts = torch.cat([model.blocks[0](model.first(x)) for x in xs]).detach()
    dead = (acts.abs().amax(dim=(0, 2, 3)) < ACT_EPS).float().mean()
    assert stats["blocks.0"]["dead"] == pytest.approx(float(dead))
    assert stats["blocks.0"]["dead"] >= 0.25  # at least the sabotaged channel
    assert stats["blocks.0"]["near_zero"] == pytest.approx(float((acts.abs() < ACT_EPS).float().mean()))
    norms = block_grad_norms(model)
    assert norms["blocks.1"] == pytest.approx(math.sqrt(sum(float(p.grad.pow(2).sum())
                                                            for p in model.blocks[1].parameters())))


def test_activation_probe_sees_functional_silu_in_the_unet():
    model = create_model(tiny_cfg())
    with ActivationProbe(model) as probe:
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 50]))
    stats = probe.results()
    assert "input_blocks.1" in stats and "middle_block" in stats and "out" in stats
    assert all(0.0 <= v["dead"] <= 1.0 and 0.0 <= v["near_zero"] <= 1.0 for v in stats.values())


# -------------------------------------------------------------------------------- checkpoints


def _save_tiny(run_dir, step=7, keep_last=2):
    cfg = tiny_cfg("train.ema_rates=[0.999, 0.9]")
    model = create_model(cfg)
    ema = EMA(model, cfg.train.ema_rates)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt = torch.optim.AdamW(model.parameters())
    state = {"step": step, "optimizer": opt.state_dict(), "rng": ckpt_mod.capture_rng_state()}
    path = save_checkpoint(run_dir, step, cfg, model.state_dict(), ema.shadows, state, keep_last)
    return cfg, model, ema, path


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    cfg, model, ema, path = _save_tiny(tmp_path)
    drawn = (torch.rand(3), np.random.rand(2), random.random())  # right after the RNG states were saved
    assert path.name == "step_0000007"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000007"
    state = torch.load(path / "state.pt", weights_only=True)  # plain tensors and Python values only
    assert state["step"] == 7
    loaded = load_training_checkpoint(path)
    assert loaded.cfg == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model_state[k], v)
    for rate in (0.999, 0.9):
        for k, v in ema.shadows[rate].items():
            assert torch.equal(loaded.ema_states[rate][k], v)
    ckpt_mod.restore_rng_state(read_train_state(path)["rng"])
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]


def test_keep_last_and_latest_pointer(tmp_path):
    for step in (1, 2, 3):
        _save_tiny(tmp_path, step=step, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002", "step_0000003"]
    assert ckpt_mod.latest_checkpoint(tmp_path).name == "step_0000003"
    (tmp_path / "checkpoints" / "latest").unlink()  # pointer lost → highest step directory
    assert ckpt_mod.latest_checkpoint(tmp_path).name == "step_0000003"


def test_load_for_inference_picks_weights(tmp_path):
    cfg, model, ema, path = _save_tiny(tmp_path)
    net, cfg2, info = load_for_inference(tmp_path)
    assert cfg2 == cfg and info["ema_rate"] == 0.999 and info["step"] == 7 and not net.training
    assert info["sha256"] == ckpt_mod.sha256_file(path / "ema_0.999.safetensors")
    for k, v in net.state_dict().items():
        assert torch.equal(v, ema.shadows[0.999][k])
    raw, _, info = load_for_inference(path, ema_rate=0)
    assert info["weights"] == "model.safetensors"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw.state_dict().items())
    _, _, info = load_for_inference(path, ema_rate=0.9)
    assert info["weights"] == "ema_0.9.safetensors"
    with pytest.raises(UserError, match="no EMA rate 0.5"):
        load_for_inference(path, ema_rate=0.5)
    with pytest.raises(UserError, match="run directory not found"):
        load_for_inference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint found"):
        load_for_inference(tmp_path / "empty")


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "ema_0.9.safetensors"])
@pytest.mark.parametrize("with_hashes", [True, False])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, name, with_hashes):
    _, _, _, path = _save_tiny(tmp_path)
    if not with_hashes:  # the parsers themselves must catch the damage
        (path / "hashes.json").unlink()
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_training_checkpoint(path)


def test_resume_differences_split_fixed_and_free_keys():
    old = tiny_cfg()
    new = tiny_cfg("train.max_steps=999", "train.lr=5e-5", "model.model_channels=32", "generate.n=3")
    fixed, free = resume_differences(old, new)
    assert fixed == ["model.model_channels: 16 → 32"]
    assert sorted(free) == ["train.lr: 0.0001 → 5e-05", "train.max_steps: 0 → 999"]


def test_a_half_written_checkpoint_is_ignored_and_cleaned_up(tmp_path):
    _save_tiny(tmp_path, step=1)
    root = tmp_path / "checkpoints"
    partial = root / ".step_0000002.tmp"  # what a crash in the middle of a save leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    (root / ".latest.tmp").write_text("step_0000002\n")
    assert ckpt_mod.latest_checkpoint(tmp_path).name == "step_0000001"
    load_training_checkpoint(ckpt_mod.latest_checkpoint(tmp_path))
    _save_tiny(tmp_path, step=2)
    _save_tiny(tmp_path, step=2)  # saving the same step again replaces it whole
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000002"]
    load_training_checkpoint(ckpt_mod.latest_checkpoint(tmp_path))


def test_params_hash_is_the_bytes_in_logical_order_whatever_the_memory_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 16, 1), nn.Conv2d(16, 16, 3))
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():  # the definition, from NumPy's C-order copy
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value.numpy()).tobytes())
    assert params_sha256(model) == digest.hexdigest()
    assert params_sha256(model.to(memory_format=torch.channels_last)) == digest.hexdigest()
