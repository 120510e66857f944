"""benchmarks/bench_unet.py: its diffusers baseline is our network, its turns alternate, and its
headline's verdict follows the measured ratio and the CPU's target."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_unet  # noqa: E402
import step_timing  # noqa: E402

from guided_diffusion.training.factory import create_model  # noqa: E402

pytest.importorskip("diffusers")


def hp1_shaped():
    """HP1's layout (64 px, channel_mult 1,2,3,4, attention at 16 and 8, 4 heads, so head widths
    differ by level) at a tenth of its width."""
    return bench_unet.bench_config("HP1", model_channels=32, num_res_blocks=1)


def test_diffusers_baseline_is_our_network_in_size_and_shape():
    cfg = hp1_shaped()
    torch.manual_seed(0)
    ours = create_model(cfg)
    twin, twin_cfg = bench_unet.diffusers_twin(cfg, ours)
    assert twin_cfg.model.num_head_channels == 32  # ours: 96/4 = 24 and 128/4 = 32; 32 divides both widths
    n_ours, n_twin = bench_unet.param_count(ours), bench_unet.param_count(twin)
    assert abs(n_twin / n_ours - 1) <= bench_unet.PARAM_TOLERANCE
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([0, 3999])
    with torch.no_grad():
        assert twin(x, t).sample.shape == ours(x, t).shape == x.shape


def test_closest_head_dim_of_the_real_hp1():
    with torch.device("meta"):
        ours = create_model(bench_unet.bench_config("HP1"))
    assert bench_unet.closest_head_dim(ours) == 128  # ours: 96 at 384 channels, 128 at 512


def test_abba_order():
    assert "".join(step_timing.abba_order(["A", "B"], 4)) == "ABBAABBA"
    assert "".join(step_timing.abba_order(["A", "B", "C"], 3)) == "ABCCBAABC"


def test_time_steps_warms_up_first_and_gives_each_its_own_time():
    calls = []
    cost = {"A": 1.0, "B": 3.0}
    now = [0.0]

    def step(name):
        def run():
            calls.append(name)
            now[0] += cost[name] * (10 if calls.count(name) == 1 else 1)  # the first call compiles
        return run

    warm, timed = step_timing.time_steps({n: step(n) for n in cost}, repeats=4, warmup=1, clock=lambda: now[0])
    assert "".join(calls) == "AB" + "ABBAABBA"
    assert warm == {"A": [10.0], "B": [30.0]}
    assert timed == {"A": [1.0] * 4, "B": [3.0] * 4}


def fake_run(ratio, device="cpu", rel=0.0):
    base = {"min_s": 4.0, "median_s": 4.0, "ratio_median_to_diffusers": 1.0, "ratio_min_to_diffusers": 1.0,
            "ratio_median_to_ours_fp32": 1 / ratio}
    ours = dict(base, median_s=4.0 * ratio, ratio_median_to_diffusers=ratio, ratio_min_to_diffusers=ratio,
                ratio_median_to_ours_fp32=1.0)
    compiled = dict(ours, ratio_median_to_ours_fp32=0.8, median_s=3.2 * ratio, compile_s=95.0)
    return {"name": "HP1", "device": device, "batch": 4, "auto_precision": "fp32", "auto_variant": "ours fp32",
            "auto_convolutions": "direct", "params": {"ours": 1000, "diffusers": round(1000 * (1 + rel)), "relative_difference": rel},
            "variants": {"diffusers fp32": base, "ours fp32": ours, "ours compiled": compiled}}


@pytest.mark.parametrize("ratio, flags, met", [
    (0.74, ["avx2", "fma"], True), (0.76, ["avx2", "fma"], False), (1.00, ["avx2"], False),
    (0.74, ["avx2", "avx512_bf16"], False), (0.29, ["avx2", "avx512f", "amx_bf16"], True),
])
def test_headline_met_follows_the_ratio_and_the_cpus_target(ratio, flags, met):
    rows = bench_unet.headlines(fake_run(ratio), flags)
    auto = rows[0]
    assert auto["met"] is met
    assert auto["value"].startswith(f"{ratio:.2f}x median")
    assert auto["target"].startswith("≤ 0.30 (bf16" if "bf16" in "".join(flags) else "≤ 0.75 (AVX2")
    assert rows[1]["met"] is True  # parameter counts equal
    assert "compile 95 s" in rows[2]["value"] and rows[2]["met"] is None


def test_headline_has_no_target_on_cuda_and_flags_a_parameter_mismatch():
    rows = bench_unet.headlines(fake_run(0.5, device="cuda", rel=0.02), ["avx2"])
    assert rows[0]["met"] is None and rows[0]["target"] == ""
    assert rows[1]["met"] is False


def test_convolution_share_tells_convolutions_from_the_rest():
    torch.manual_seed(0)
    # 128 channels on 16 px: the convolution outweighs the loss's elementwise work clearly enough that
    # its share stays well above the bound on a busy VM (16 channels on 32 px gave 0.54-0.71)
    conv, linear = torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.Linear(256, 256)
    x, v = torch.randn(2, 128, 16, 16), torch.randn(64, 256)

    def conv_step():
        conv(x).square().mean().backward()

    def linear_step():
        linear(v).square().mean().backward()

    assert bench_unet.convolution_share(conv_step) > 0.7
    assert bench_unet.convolution_share(linear_step) == 0.0
    # with a filter on the input shapes only the convolutions it accepts count
    assert bench_unet.convolution_share(conv_step, lambda shapes: [128, 128, 3, 3] in shapes) > 0.7
    assert bench_unet.convolution_share(conv_step, lambda shapes: [64, 128, 3, 3] in shapes) == 0.0


def test_the_convolution_bound_row_says_when_the_target_needs_another_algorithm():
    run = fake_run(0.92)
    run["variants"]["ours fp32"].update(convolution_share=0.88, ratio_if_only_convolutions=0.81)
    rows = bench_unet.headlines(run, ["avx2"])
    bound = next(r for r in rows if "if everything but its convolutions" in r["measured"])
    assert bound["value"] == "0.81x (88% of the step is in oneDNN's direct fp32 convolutions)"
    assert "another convolution algorithm" in bound["target"]
    run["variants"]["ours fp32"].update(ratio_if_only_convolutions=0.6)
    bound = next(r for r in bench_unet.headlines(run, ["avx2"]) if "if everything but" in r["measured"])
    assert bound["target"] == "context"


def test_a_bf16_default_gets_its_own_convolution_bound():
    """On a bf16 CPU the defaults' own convolutions bound them: 0.43x here, above the 0.30 target."""
    run = fake_run(1.0)
    auto = dict(run["variants"]["ours fp32"], ratio_median_to_diffusers=0.52, convolution_share=0.83,
                ratio_if_only_convolutions=0.43)
    run["variants"]["ours auto (bf16, direct)"] = auto
    run.update(auto_variant="ours auto (bf16, direct)", auto_precision="bf16")
    run["variants"]["ours fp32"].update(convolution_share=0.87, ratio_if_only_convolutions=0.2)
    rows = [r for r in bench_unet.headlines(run, ["avx512_bf16"]) if "if everything but" in r["measured"]]
    assert [r["measured"].split(": ")[1].split(" /")[0] for r in rows] == ["ours fp32", "ours auto (bf16, direct)"]
    assert rows[0]["target"] == "context"  # 0.2 <= 0.30
    assert rows[1]["value"] == "0.43x (83% of the step is in oneDNN's direct bf16 convolutions)"
    assert "fewer convolution FLOPs or faster bf16 units (AMX)" in rows[1]["target"]


def test_the_context_row_names_each_matmuls_precision_and_device():
    machine = {"cpu": "EPYC", "extensions": ["avx512_bf16"], "cores": 2, "load_average_1min": 0.1,
               "load_average_1min_after": 1.9, "matmul_2048_fp32_gflop_per_s_cpu": [150.0, 163.0],
               "matmul_2048_bf16_gflop_per_s_cpu": [343.0]}
    run = fake_run(1.0)
    run["variants"]["ours fp32"]["achieved_gflop_per_s"] = 161.0
    row = bench_unet.context_row(machine, [run])
    assert row["value"] == "2048³ matmul GFLOP/s: fp32 cpu 163; bf16 cpu 343; achieved GFLOP/s: HP1 cpu ours fp32 161"


def test_the_defaults_row_is_also_put_against_our_direct_path():
    run = fake_run(0.9)
    auto = dict(run["variants"]["ours fp32"], median_s=2.4, ratio_median_to_diffusers=0.6, ratio_min_to_diffusers=0.6,
                ratio_median_to_ours_fp32=round(2.4 / 3.6, 3))
    run["variants"]["ours auto (fp32, winograd)"] = auto
    run.update(auto_variant="ours auto (fp32, winograd)", auto_convolutions="winograd")
    rows = bench_unet.headlines(run, ["avx2"])
    assert rows[0]["met"] is True and "convolutions winograd" in rows[0]["measured"]
    versus = next(r for r in rows if "/ ours fp32 with direct convolutions" in r["measured"])
    assert versus["value"] == "0.67x median; 2.40 vs 3.60 s/step" and versus["met"] is None


def test_layer_ratios_are_timed_both_ways_and_say_where_auto_uses_winograd(monkeypatch):
    from guided_diffusion import winograd

    if not winograd.available()[0]:
        pytest.skip("no C compiler for the Winograd kernels")
    monkeypatch.setattr(bench_unet, "LAYERS", ((64, 64, 32), (64, 64, 8)))
    monkeypatch.setattr(bench_unet, "auto_winograd", lambda: (True, "faster here"))
    rows = bench_unet.layer_ratios(repeats=1, batch=1)
    assert [(r["size"], r["used_by_auto"]) for r in rows] == [(32, True), (8, False)]
    monkeypatch.setattr(bench_unet, "auto_winograd", lambda: (False, "slower here"))
    assert not any(r["used_by_auto"] for r in bench_unet.layer_ratios(repeats=1, batch=1))
    assert all(r["ratio"] == pytest.approx(r["winograd_ms"] / r["direct_ms"], rel=0.05, abs=0.01) for r in rows)
    row = bench_unet.layers_row(rows)
    assert "64→64 ch 8 px" in row["value"] and row["value"].endswith("(not used)") and row["target"] == "context"


def test_gpu_share_of_peak_is_judged_on_the_best_half_precision_variant():
    run = fake_run(0.9, device="cuda")
    run.update(auto_variant="ours auto (bf16, direct)")
    gflop = {"diffusers fp32": 80e3, "ours fp32": 82e3, "ours compiled (bf16)": 350e3}
    for name, g in gflop.items():
        run["variants"][name] = dict(run["variants"].get(name, {}), achieved_gflop_per_s=g)
    run["variants"]["ours auto (bf16, direct)"] = {"achieved_gflop_per_s": 122e3}
    del run["variants"]["ours compiled"]
    row = bench_unet.gpu_peak_row(run, 758.0)
    assert "ours compiled (bf16) 350 TFLOP/s (46%)" in row["value"] and "ours fp32 82 TFLOP/s (11%)" in row["value"]
    assert row["target"] == "≥ 45% (best bf16 variant: ours compiled (bf16))" and row["met"] is True
    run["variants"]["ours compiled (bf16)"]["achieved_gflop_per_s"] = 300e3  # 40 %: the fp32 rows never count
    assert bench_unet.gpu_peak_row(run, 758.0)["met"] is False
