"""Winograd F(4x4, 3x3) convolutions (guided_diffusion/winograd.py): the same numbers as a direct
convolution computed in float64, forward and backward, at shapes that do and do not fill whole
tiles; chunking and threads change nothing; where it applies; how the config picks it."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guided_diffusion import winograd
from guided_diffusion.training.factory import create_model
from pipeline.common.config import config_from_dict
from pipeline.common.errors import UserError

pytestmark = pytest.mark.skipif(winograd._compiler() is None, reason="no C compiler for the Winograd kernels")


def reference(x, w, b, dy):
    """Output and gradients of conv2d(x, w, b, padding=1) in float64: the independent answer."""
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y = F.conv2d(x64, w64, b64, padding=1)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, b64.grad


def winograd_run(x, w, b, dy):
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = winograd.winograd_conv3x3(xs, ws, bs)
    y.backward(dy)
    return y.detach(), xs.grad, ws.grad, bs.grad


def relative_error(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def inputs(n, c, co, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g), torch.randn(co, c, 3, 3, generator=g) / (3 * c**0.5),
            torch.randn(co, generator=g), torch.randn(n, co, h, w, generator=g))


@pytest.mark.parametrize("n, c, co, h, w", [
    (2, 8, 16, 8, 8),  # whole tiles
    (1, 16, 8, 10, 6),  # partial tiles at the bottom and right
    (3, 24, 24, 5, 7),
    (2, 64, 64, 32, 32),
    (1, 8, 8, 1, 1),  # one pixel: all but the centre tap fall on padding
])
def test_output_and_gradients_match_a_float64_direct_convolution(n, c, co, h, w):
    x, wt, b, dy = inputs(n, c, co, h, w)
    ref = reference(x, wt, b, dy)
    for name, got, want in zip(("y", "dx", "dw", "db"), winograd_run(x, wt, b, dy), ref, strict=True):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert relative_error(got, want) < 2e-5, name  # float32 rounding, not a wrong tap
    # a direct float32 convolution is of the same order: Winograd only adds rounding
    assert relative_error(F.conv2d(x, wt, b, padding=1), ref[0]) < 2e-5


def test_a_wrong_weight_layout_would_be_caught():
    """The check above can fail: a transposed kernel (taps (i, j) swapped) is far outside it."""
    x, wt, b, dy = inputs(1, 8, 8, 8, 8)
    y = winograd.winograd_conv3x3(x, wt.transpose(2, 3).contiguous(), b)
    assert relative_error(y, reference(x, wt, b, dy)[0]) > 0.05


def test_chunks_and_threads_change_nothing(monkeypatch):
    x, wt, b, dy = inputs(5, 16, 16, 12, 12, seed=1)
    whole = winograd_run(x, wt, b, dy)
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)  # one image per chunk, buffers reused across chunks
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 3):
            torch.set_num_threads(n_threads)
            for got, want in zip(winograd_run(x, wt, b, dy), whole, strict=True):
                assert relative_error(got, want.double()) < 2e-5  # float32 sums in another order only
    finally:
        torch.set_num_threads(threads)


def test_where_it_applies():
    w = torch.zeros(64, 64, 3, 3)
    x = torch.zeros(1, 64, 32, 32)
    assert winograd.applies(x, w)
    assert not winograd.applies(x[:, :, :16], w)  # small maps
    assert not winograd.applies(torch.zeros(1, 32, 32, 32), torch.zeros(64, 32, 3, 3))  # few channels
    assert not winograd.applies(torch.zeros(1, 72, 32, 32), torch.zeros(68, 72, 3, 3))  # 68 % 8
    assert not winograd.applies(x.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.applies(x, w)


def test_conv3x3_keeps_conv2d_parameters_and_switches_by_flag(monkeypatch):
    layer = winograd.Conv3x3(64, 64)
    assert list(layer.state_dict()) == list(torch.nn.Conv2d(64, 64, 3, padding=1).state_dict())
    calls = []
    real = winograd.winograd_conv3x3
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 64, 32, 32)
    direct = layer(x)
    assert calls == [] and torch.equal(direct, F.conv2d(x, layer.weight, layer.bias, padding=1))
    layer.winograd = True
    fast = layer(x)
    assert calls == [1]
    torch.testing.assert_close(fast, direct, rtol=1e-4, atol=1e-5)
    layer(x[:, :, :16, :16])  # below MIN_SIZE: direct
    assert calls == [1]


def tiny(**model):
    cfg = config_from_dict({"data": {"image_size": 32}, "model": {"model_channels": 64, "num_res_blocks": 1,
                                                                  "attention_resolutions": [], "channel_mult": [1, 2]}})
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def flags(model):
    return {m.winograd for m in model.modules() if isinstance(m, winograd.Conv3x3)}


def test_conv_algorithm_setting(monkeypatch, caplog):
    from guided_diffusion.training import factory

    monkeypatch.setattr(factory, "auto_winograd", lambda: (True, "faster here"))
    with caplog.at_level(logging.INFO):
        assert flags(create_model(tiny())) == {True}
    assert "Winograd F(4x4, 3x3)" in caplog.text
    assert flags(create_model(tiny(conv_algorithm="direct"))) == {False}
    assert flags(create_model(tiny(conv_algorithm="winograd"))) == {True}
    assert flags(create_model(tiny(channels_last=True))) == {False}  # auto keeps the layout's direct path
    with pytest.raises(UserError, match="valid: auto, direct, winograd"):
        create_model(tiny(conv_algorithm="fft"))
    with pytest.raises(UserError, match="cannot run under model.compile"):
        create_model(tiny(conv_algorithm="winograd", compile=True))


def fake_layer_timing(monkeypatch, speedup: float) -> list[int]:
    """Replace the Winograd self-check by one that reports `speedup`; returns a list counting its calls."""
    from guided_diffusion.training import factory

    calls = []
    monkeypatch.setattr(factory, "measure_speedup", lambda: calls.append(1) or speedup)
    return calls


def test_auto_follows_the_self_check_timed_once_per_machine(monkeypatch, tmp_path, caplog):
    from guided_diffusion.training import factory

    if not winograd.available()[0]:
        pytest.skip("no C compiler for the Winograd kernels")
    monkeypatch.setenv("IRIS_DIFFUSION_CACHE", str(tmp_path))
    calls = fake_layer_timing(monkeypatch, 0.6)  # oneDNN's direct convolutions faster, as on a 16-core Xeon
    with caplog.at_level(logging.INFO):
        assert flags(create_model(tiny())) == {False}
    assert "direct (model.conv_algorithm auto: the self-check ran Winograd at 0.60x" in caplog.text
    assert flags(create_model(tiny(conv_algorithm="winograd"))) == {True}  # asked for: still used
    assert flags(create_model(tiny())) == {False} and calls == [1]  # the second model reads the cache
    entries = json.loads((tmp_path / factory.WINOGRAD_CACHE).read_text())
    assert [e["speedup"] for e in entries.values()] == [0.6]
    (tmp_path / factory.WINOGRAD_CACHE).unlink()
    calls = fake_layer_timing(monkeypatch, 1.3)  # as on a 2-core EPYC
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert flags(create_model(tiny())) == {True}
    assert "(model.conv_algorithm auto: self-check 1.30x faster than direct, measured, cached in" in caplog.text
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # another thread count: timed again
    fake_layer_timing(monkeypatch, 0.5)
    assert factory.auto_winograd()[0] is False


def test_auto_times_nothing_for_networks_built_on_meta_or_fake_tensors(monkeypatch, tmp_path):
    """The memory plan and the benchmarks build U-Nets on the meta device and count activations on
    fake tensors: the self-check must not run there (its C kernels would read no memory: a crash)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from guided_diffusion.training import factory

    monkeypatch.setenv("IRIS_DIFFUSION_CACHE", str(tmp_path))
    calls = fake_layer_timing(monkeypatch, 2.0)
    with torch.device("meta"):
        assert flags(create_model(tiny())) == {False}
    with FakeTensorMode():
        assert flags(create_model(tiny())) == {False}
    assert calls == [] and not (tmp_path / factory.WINOGRAD_CACHE).exists()


def test_the_real_self_checks_run_on_the_cpu_inside_a_meta_device_context():
    from guided_diffusion.training import cpu_bf16

    with torch.device("meta"):
        assert cpu_bf16.measure_speedup(batch=1, channels=8, size=8, layers=1, repeats=1) > 0
        if winograd.available()[0]:
            assert np.isfinite(winograd.measure_speedup(batch=1, channels=64, size=32, repeats=1))


def test_the_real_layer_self_check_returns_a_time_ratio():
    if not winograd.available()[0]:
        pytest.skip("no C compiler for the Winograd kernels")
    speedup = winograd.measure_speedup(batch=1, channels=64, size=32, repeats=1)
    assert np.isfinite(speedup) and speedup > 0


def test_without_a_compiler_winograd_fails_clearly_and_auto_stays_direct(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("IRIS_DIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(winograd, "_lib", None)
    monkeypatch.setattr(winograd, "_lib_error", None)
    with pytest.raises(UserError, match="no C compiler"):
        create_model(tiny(conv_algorithm="winograd"))
    with caplog.at_level(logging.WARNING):
        model = create_model(tiny())
    direct = create_model(tiny(conv_algorithm="direct"))
    direct.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 700])
    assert torch.equal(model(x, t), direct(x, t))
    assert "no C compiler" in caplog.text and list(tmp_path.iterdir()) == []


def test_kernels_are_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("IRIS_DIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(winograd, "_lib", None)
    monkeypatch.setattr(winograd, "_lib_error", None)
    lib = winograd.kernels()
    built = list(tmp_path.iterdir())
    assert [p.name for p in built] == [winograd.library_path(winograd._compiler()).name]
    assert built[0].name.startswith("winograd-") and built[0].suffix == ".so"
    assert winograd.kernels() is lib and list(tmp_path.iterdir()) == built  # no temp files left


def test_training_steps_follow_the_direct_path():
    """A few Adam steps of a 64-channel U-Net on one batch: the loss curves of both algorithms agree."""
    torch.manual_seed(0)
    models = {name: create_model(tiny(conv_algorithm=name)) for name in ("direct", "winograd")}
    models["winograd"].load_state_dict(models["direct"].state_dict())
    g = torch.Generator().manual_seed(1)
    x, t, target = torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 4000, (4,), generator=g), \
        torch.randn(4, 1, 32, 32, generator=g)
    curves = {}
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        curves[name] = []
        for _ in range(5):
            opt.zero_grad()
            loss = F.mse_loss(model(x, t), target)
            loss.backward()
            opt.step()
            curves[name].append(loss.item())
    assert curves["direct"][-1] < curves["direct"][0]  # it trains
    for a, b in zip(curves["direct"], curves["winograd"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_resume_keeps_the_convolution_algorithm():
    from guided_diffusion.training.resume import resume_differences

    fixed, free = resume_differences(tiny(), tiny(conv_algorithm="direct"))
    assert fixed == ["model.conv_algorithm: 'auto' → 'direct'"] and free == []


def test_fake_tensors_take_the_direct_path(recwarn):
    """Activation counting runs the model on FakeTensors (no memory): Winograd must not touch them,
    and the count is the direct path's."""
    from guided_diffusion.activation_memory import count_activation_bytes

    counts = [count_activation_bytes(create_model(tiny(conv_algorithm=name)), 32, 1, "fp32")
              for name in ("direct", "winograd")]
    assert counts[0] == counts[1] and counts[0].per_image > 0
    assert not [w for w in recwarn if "data pointer of FakeTensor" in str(w.message)]
