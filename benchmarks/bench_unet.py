"""Speed of one U-Net training step (forward + backward), as ratios to diffusers' UNet2DModel in the same run.

    python benchmarks/bench_unet.py [--quick] [--device cpu|cuda|all] [--configs HP1 [HP2]]
                                    [--batch N] [--repeats N] [--no-compile] [--out FILE]

The baseline is diffusers' `UNet2DModel` configured as the same ADM network through
pipeline/diffusers_map.py (scale-shift norm, resnet up/down-sampling, attention at the same sizes,
our weights under its names; where our heads differ in width by level, which UNet2DModel cannot
express, the closest single attention_head_dim, which changes no parameter count). Against it, in
one process: our U-Net in fp32 with direct convolutions (`model.conv_algorithm: direct`), in
channels_last, with the defaults (`precision: auto`, what `resolve_precision("auto", device)` picks:
fp32 on a CPU without bf16 support; `model.conv_algorithm: auto`: Winograd F(4x4, 3x3) for the large
3x3 layers where a self-check timed once per machine finds it faster), in channels_last under the defaults'
precision too where that is not fp32, and compiled (`model.compile: true` under the defaults'
precision; its compile time is measured apart from its steps). After WARMUP steps each, the
variants take turns in palindromic order (A B C C B A A B C …), `--repeats` timed steps each, so
drift in the machine's load falls on all alike; min and median seconds per step and the ratios of
medians and of mins. The machine (CPU model, AVX2 /
AVX-512 / AMX flags, cores, load) and a 2048³ fp32 matmul's GFLOP/s are recorded as context only,
and so are single HP1 3x3 layers timed with Winograd and with oneDNN's direct convolution (where
conv_algorithm auto uses which). On a GPU each variant's achieved TFLOP/s is also put against a
bf16 8192³ matmul timed in the same run (the goal: ≥ 45 % of it).
JSON goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import headline, machine_facts, write_result
from step_timing import gemm_gflop_per_s, matmul_bf16_tflop_per_s, summarize, time_steps
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion import winograd
from guided_diffusion.training.factory import auto_winograd, create_model
from guided_diffusion.training.step import autocast_for, resolve_precision
from guided_diffusion.unet import AttentionBlock
from pipeline.common.config import Config, config_from_dict
from pipeline.diffusers_map import unet_config, unet_state_dict

RESULTS = Path(__file__).parent / "results" / "bench_unet.json"
BASELINE = "diffusers fp32"
OURS = "ours fp32"  # direct convolutions
CONFIGS = {  # the seed's HP1 and HP2 networks, and the batch each step trains on
    "HP1": ({"data": {"image_size": 64}, "model": {"model_channels": 128, "num_res_blocks": 3,
                                                    "attention_resolutions": [16, 8]}}, 4),
    "HP2": ({"data": {"image_size": 128}, "model": {"model_channels": 192, "num_res_blocks": 4,
                                                     "attention_resolutions": [32, 16, 8], "num_head_channels": 64}}, 2),
}
PARAM_TOLERANCE = 0.01
WARMUP = 2  # steps per variant before timing: a compiled model compiles forward and backward in its first;
# the allocator settles on the sizes of a step's buffers in the first few (page faults in the first)
TARGETS = {"bf16": 0.30, "avx2": 0.75}  # precision auto / diffusers fp32, by whether the CPU has native bf16
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
GPU_PEAK_GOAL = 0.45  # achieved / measured bf16 matmul TFLOP/s on a GPU (issue 20's goal there)
# 3x3 layers of HP1 (in channels, out channels, map size), batch 4: where Winograd pays and where not
LAYERS = ((64, 64, 64), (128, 128, 64), (256, 256, 32), (384, 384, 16), (512, 512, 16), (512, 512, 8))


def bench_config(name: str, **model: object) -> Config:
    """The Config of a named network (grey images), with `model` settings replaced."""
    cfg = config_from_dict(CONFIGS[name][0])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def closest_head_dim(model: nn.Module) -> int:
    """The one attention head width, dividing every attention block's width, closest (in log ratio)
    to the head widths of `model` (ours may differ by level; UNet2DModel has one)."""
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    widths = {b.norm.num_channels for b in blocks}
    heads = {b.norm.num_channels // b.num_heads for b in blocks}
    common = math.gcd(*widths)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    return min(divisors, key=lambda d: sum(abs(math.log(d / h)) for h in heads))


def diffusers_twin(cfg: Config, ours: nn.Module) -> tuple[nn.Module, Config]:
    """diffusers' UNet2DModel as the network of `cfg`, holding `ours`' weights, and the config it was
    built from (num_head_channels set to the closest single head width when ours has none)."""
    from diffusers import UNet2DModel

    if cfg.model.num_head_channels <= 0 and cfg.model.num_heads > 1:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_head_channels=closest_head_dim(ours)))
    twin = UNet2DModel(**unet_config(cfg))
    twin.load_state_dict(unet_state_dict(ours.state_dict(), cfg))
    return twin, cfg


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
               precision: str = "fp32") -> Callable[[], None]:
    """One forward + backward of the MSE to `target` (the diffusion loss) under `precision`'s
    autocast, gradients cleared first."""
    cast = autocast_for(precision, x.device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with cast():
            out = model(x, t)
        F.mse_loss(getattr(out, "sample", out).float(), target).backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def flops_per_step(name: str, batch: int) -> int:
    """FLOPs of one forward + backward of our network, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = create_model(bench_config(name))
        size = model.image_size
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.randn(batch, 1, size, size), torch.zeros(batch)).square().mean().backward()
    return counter.get_total_flops()


def convolution_share(step: Callable[[], None], shapes: Callable[[list], bool] | None = None) -> float:
    """The share of one CPU step's operator time spent inside convolutions (forward and backward,
    oneDNN's kernels), from the profiler's self times: what neither fusion nor compilation of the
    rest can remove. With `shapes`, only the convolutions whose input shapes it accepts."""
    from torch.profiler import ProfilerActivity, profile

    by_shape = shapes is not None
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        step()
    events = prof.key_averages(group_by_input_shape=by_shape)
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events
               if "convolution" in e.key and (not by_shape or shapes(e.input_shapes)))
    return conv / total


def layer_ratios(repeats: int = 3, batch: int = 4) -> list[dict]:
    """Forward + backward of single 3x3 layers (LAYERS) on the CPU, Winograd F(4x4, 3x3) against
    oneDNN's direct convolution, the two in turns (ABBA), best of `repeats` each; whether
    conv_algorithm auto uses Winograd for that layer. Empty where the kernels cannot be built."""
    if not winograd.available()[0]:
        return []
    rows, auto_uses_it = [], auto_winograd()[0]
    for c, co, size in LAYERS:
        x, w, steps = winograd.layer_passes(batch, c, co, size, torch.Generator().manual_seed(0))
        _, timed = time_steps(steps, repeats, warmup=1)
        rows.append({"in": c, "out": co, "size": size, "direct_ms": round(min(timed["direct"]) * 1e3, 2),
                     "winograd_ms": round(min(timed["winograd"]) * 1e3, 2),
                     "ratio": round(min(timed["winograd"]) / min(timed["direct"]), 2),
                     "used_by_auto": winograd.applies(x, w) and auto_uses_it})
    return rows


def target_for(extensions: list[str], device: str) -> tuple[float | None, str]:
    """The precision-auto / diffusers-fp32 ceiling for this machine, and its label (None on CUDA: no
    target there, only the GPU's share of its peak, which this benchmark does not know)."""
    if device != "cpu":
        return None, ""
    if any(f in extensions for f in BF16_FLAGS):
        return TARGETS["bf16"], f"≤ {TARGETS['bf16']:.2f} (bf16 CPU; AVX2: ≤ {TARGETS['avx2']:.2f})"
    return TARGETS["avx2"], f"≤ {TARGETS['avx2']:.2f} (AVX2 CPU; bf16 CPU: ≤ {TARGETS['bf16']:.2f})"


def measure(name: str, device: str, repeats: int, warmup: int, compile_too: bool, quick: bool = False,
            batch: int | None = None) -> dict:
    """Every variant of network `name` on `device` (quick: the baseline and ours at fp32 and auto only),
    timed in turns in one process; `batch` images per step (default: the config's)."""
    batch = batch or CONFIGS[name][1]
    torch.manual_seed(0)
    cfg = bench_config(name)
    ours = create_model(bench_config(name, conv_algorithm="direct")).to(device)
    twin, twin_cfg = diffusers_twin(cfg, ours.cpu())
    ours, twin = ours.to(device), twin.to(device)
    g = torch.Generator().manual_seed(0)
    size = cfg.data.image_size
    x, target = (torch.randn(batch, 1, size, size, generator=g).to(device) for _ in range(2))
    t = torch.randint(0, cfg.diffusion.steps, (batch,), generator=g).to(device)
    auto = resolve_precision("auto", torch.device(device))
    defaults = create_model(cfg).to(device)  # precision auto, conv_algorithm auto
    defaults.load_state_dict(ours.state_dict())
    convs = winograd.conv_algorithm(defaults, device, auto)  # Winograd is CPU fp32 only, never under autocast
    auto_name = f"ours auto ({auto}, {convs})"
    steps = {BASELINE: train_step(twin, x, t, target), OURS: train_step(ours, x, t, target),
             auto_name: train_step(defaults, x, t, target, auto)}
    if not quick:
        cl = create_model(bench_config(name, channels_last=True)).to(device)
        cl.load_state_dict(ours.state_dict())
        x_cl = x.to(memory_format=torch.channels_last)
        steps["ours channels_last"] = train_step(cl, x_cl, t, target)
        if auto != "fp32":
            steps[f"ours {auto} channels_last"] = train_step(cl, x_cl, t, target, auto)
    compiled_name = f"ours compiled ({auto})"
    if compile_too:
        compiled = create_model(bench_config(name, compile=True)).to(device)
        compiled.load_state_dict(ours.state_dict())
        steps[compiled_name] = train_step(compiled, x, t, target, auto)
    warm, timed = time_steps(steps, repeats, warmup)
    variants = {n: summarize(timed[n]) for n in steps}
    base = variants[BASELINE]
    for n, v in variants.items():
        v["ratio_median_to_diffusers"] = round(v["median_s"] / base["median_s"], 3)
        v["ratio_min_to_diffusers"] = round(v["min_s"] / base["min_s"], 3)
        v["ratio_median_to_ours_fp32"] = round(v["median_s"] / variants[OURS]["median_s"], 3)
        v["warmup_s"] = [round(s, 2) for s in warm[n]]
    if device == "cpu":  # how close to the baseline ours could come with the same convolutions (and bf16's)
        for n in [OURS] + ([auto_name] if auto != "fp32" else []):
            share = convolution_share(steps[n])
            variants[n]["convolution_share"] = round(share, 3)
            variants[n]["ratio_if_only_convolutions"] = round(share * variants[n]["ratio_median_to_diffusers"], 3)
    if compile_too:  # the first call compiles forward and backward
        variants[compiled_name]["compile_s"] = round(warm[compiled_name][0] - variants[compiled_name]["median_s"], 1)
    return {"name": name, "device": device, "batch": batch, "auto_precision": auto,
            "auto_variant": auto_name, "auto_convolutions": convs,
            "params": {"ours": param_count(ours), "diffusers": param_count(twin),
                       "relative_difference": round(param_count(twin) / param_count(ours) - 1, 6)},
            "diffusers_attention_head_dim": twin_cfg.model.num_head_channels, "variants": variants}


def headlines(run: dict, extensions: list[str]) -> list[dict]:
    """The summary rows of one measured network × device (pure: from the numbers alone)."""
    v, label = run["variants"], f"{run['name']} fwd+bwd, batch {run['batch']}, {run['device']}"
    limit, target = target_for(extensions, run["device"])
    auto = v[run["auto_variant"]]
    rel = run["params"]["relative_difference"]
    rows = [
        headline(f"{label}: defaults (precision auto = {run['auto_precision']}, convolutions "
                 f"{run['auto_convolutions']}) / diffusers UNet2DModel fp32 (same run, ABBA)",
                 f"{auto['ratio_median_to_diffusers']:.2f}x median ({auto['ratio_min_to_diffusers']:.2f}x min); "
                 f"{auto['median_s']:.2f} vs {v[BASELINE]['median_s']:.2f} s/step median",
                 target, None if limit is None else auto["ratio_median_to_diffusers"] <= limit),
        headline(f"{label}: parameters ours / diffusers baseline",
                 f"{run['params']['ours']:,} / {run['params']['diffusers']:,} ({rel:+.2%})",
                 f"within {PARAM_TOLERANCE:.0%}", abs(rel) <= PARAM_TOLERANCE),
    ]
    for name, why in ((OURS, "another convolution algorithm"),
                      (run["auto_variant"], "fewer convolution FLOPs or faster bf16 units (AMX)")):
        if "convolution_share" in v[name] and (name == OURS or run["auto_precision"] != "fp32"):
            what = "fp32" if name == OURS else run["auto_precision"]
            rows.append(headline(
                f"{label}: {name} / diffusers if everything but its convolutions took no time (profiled share)",
                f"{v[name]['ratio_if_only_convolutions']:.2f}x ({v[name]['convolution_share']:.0%} of the step is in "
                f"oneDNN's direct {what} convolutions)", f"context: why the target needs {why}"
                if limit is not None and v[name]["ratio_if_only_convolutions"] > limit else "context"))
    if run["auto_variant"] != OURS:
        rows.append(headline(f"{label}: {run['auto_variant']} / ours fp32 with direct convolutions (same run)",
                             f"{auto['ratio_median_to_ours_fp32']:.2f}x median; {auto['median_s']:.2f} vs "
                             f"{v[OURS]['median_s']:.2f} s/step"))
    for name in (n for n in v if n not in (BASELINE, OURS, run["auto_variant"])):
        extra = f"; compile {v[name]['compile_s']:.0f} s (not in the steps)" if "compile_s" in v[name] else ""
        rows.append(headline(f"{label}: {name} / ours fp32 eager (same run)",
                             f"{v[name]['ratio_median_to_ours_fp32']:.2f}x median; {v[name]['median_s']:.2f} s/step"
                             f"{extra}"))
    return rows


def gpu_peak_row(run: dict, peak_tflop_per_s: float) -> dict:
    """Each variant's achieved TFLOP/s as a share of the bf16 matmul peak measured in the same run;
    the goal (≥ GPU_PEAK_GOAL) is judged on the best variant that runs in bf16 (auto or compiled)."""
    v = run["variants"]
    share = {n: v[n]["achieved_gflop_per_s"] / 1e3 / peak_tflop_per_s for n in v}
    half = [n for n in v if n == run["auto_variant"] or "compiled" in n or "bf16" in n]
    best = max(half, key=share.get)
    value = "; ".join(f"{n} {v[n]['achieved_gflop_per_s'] / 1e3:.0f} TFLOP/s ({share[n]:.0%})" for n in v)
    return headline(f"{run['name']} fwd+bwd, batch {run['batch']}, cuda: achieved / bf16 8192³ matmul "
                    f"({peak_tflop_per_s:.0f} TFLOP/s, same run)", value,
                    f"≥ {GPU_PEAK_GOAL:.0%} (best bf16 variant: {best})", share[best] >= GPU_PEAK_GOAL)


def layers_row(layers: list[dict]) -> dict:
    """Winograd / direct per single layer (context: why conv_algorithm auto uses it where it does)."""
    value = "; ".join(f"{r['in']}→{r['out']} ch {r['size']} px {r['ratio']:.2f}x{'' if r['used_by_auto'] else ' (not used)'}"
                      for r in layers)
    return headline("single 3x3 layers fwd+bwd, batch 4, cpu: Winograd F(4x4, 3x3) / oneDNN direct (same run, ABBA, "
                    "best of 3)", value, "context")


def context_row(machine: dict, runs: list[dict]) -> dict:
    """The machine the ratios were measured on (context, no target)."""
    gemm = "; ".join(f"{k.split('_')[2]} {k.split('_')[-1]} {max(v):.0f}" for k, v in machine.items()
                     if k.startswith("matmul_2048_"))
    achieved = "; ".join(f"{r['name']} {r['device']} ours fp32 {r['variants'][OURS]['achieved_gflop_per_s']:.0f}"
                         for r in runs)
    return headline(f"context: {machine['cpu']} ({', '.join(machine['extensions'])}), {machine['cores']} cores, "
                    f"load {machine['load_average_1min']} → {machine['load_average_1min_after']}",
                    f"2048³ matmul GFLOP/s: {gemm}; achieved GFLOP/s: {achieved}", "context")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="diffusers and ours at fp32/auto only, 3 timed steps each")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per variant (default 6)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU and, when present, CUDA")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["HP1"],
                        help="HP2 takes tens of seconds per step on a CPU")
    parser.add_argument("--batch", type=int, help="images per step (default: HP1 4, HP2 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda but CUDA is not available\n")
    repeats = 3 if args.quick else args.repeats
    machine = machine_facts()
    machine.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    runs = []
    for device in devices[args.device]:
        gemm_before = gemm_gflop_per_s(device)
        for name in args.configs:
            print(f"{name} on {device} …", file=sys.stderr, flush=True)
            run = measure(name, device, repeats, WARMUP, not (args.quick or args.no_compile), args.quick, args.batch)
            gflop = flops_per_step(name, run["batch"]) / 1e9
            run["gflop_per_step"] = round(gflop, 1)
            for v in run["variants"].values():
                v["achieved_gflop_per_s"] = round(gflop / v["median_s"], 1)
            runs.append(run)
        machine[f"matmul_2048_fp32_gflop_per_s_{device}"] = [round(gemm_before, 1), round(gemm_gflop_per_s(device), 1)]
        if device == "cpu" and any(f in machine["extensions"] for f in BF16_FLAGS):
            machine["matmul_2048_bf16_gflop_per_s_cpu"] = [round(gemm_gflop_per_s(device, torch.bfloat16), 1)]
    if "cuda" in devices[args.device]:
        machine["matmul_8192_bf16_tflop_per_s_cuda"] = round(matmul_bf16_tflop_per_s(), 1)
    machine["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    result = {"benchmark": "ADM U-Net forward+backward per training step, ratios to diffusers UNet2DModel (same run)",
              "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "repeats": repeats, "warmup": WARMUP,
              "order": "palindromic rounds (A B C, C B A, …) after the warm-up steps",
              "configs": {n: {"config": c, "batch": b} for n, (c, b) in CONFIGS.items()},
              "machine": machine, "runs": runs,
              "headline": [row for run in runs for row in headlines(run, machine["extensions"])]}
    if "cpu" in devices[args.device]:
        result["layers_cpu"] = layer_ratios()
        if result["layers_cpu"]:
            result["headline"].append(layers_row(result["layers_cpu"]))
    if "cuda" in devices[args.device]:
        peak = machine["matmul_8192_bf16_tflop_per_s_cuda"]
        result["headline"] += [gpu_peak_row(run, peak) for run in runs if run["device"] == "cuda"]
    result["headline"].append(context_row(machine, runs))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
