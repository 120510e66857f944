"""Where a U-Net training step's GPU time goes: step times of layout and compile variants at chosen
batch sizes in one process, and each variant's kernels grouped by kind (context for issue 20's goal
of ≥ 45 % of the GPU's bf16 peak; the headline figures are bench_unet's).

    python benchmarks/gpu_step_profile.py [--config HP2] [--phase BATCH:VARIANT,… …] [--repeats 5]
                                          [--cudnn-benchmark] [--out FILE]
    python benchmarks/gpu_step_profile.py --phase "32:eager bf16" "16:eager bf16,compiled bf16 channels_last"
    python benchmarks/gpu_step_profile.py --device cpu --config HP1 --phase "1:eager bf16" --repeats 1  # plumbing

Variants, all bf16 autocast (precision auto on a GPU): eager or `model.compile`, NCHW or
channels_last. Each phase is a batch size and its variants; within a phase the variants take turns
in palindromic order after two warm-up steps each (the first holds a compiled variant's compile
time); times are host-clock milliseconds per forward + backward, each step ending with the GPU
synchronised, as in bench_unet (`step_timing.time_steps`). One profiled step per variant gives
the summed kernel time by kind (cuDNN convolutions, layout transposes, GEMMs, attention, norms,
fused Triton, elementwise, reductions), the share of the step the GPU was busy and the peak memory.
The JSON is written after every phase, so a phase cut short by a time limit keeps those before it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from bench_unet import CONFIGS, bench_config, flops_per_step, train_step
from results_io import machine_facts, write_result
from step_timing import gemm_gflop_per_s, matmul_bf16_tflop_per_s, time_steps
from torch.profiler import ProfilerActivity, profile

from guided_diffusion.training.factory import create_model

RESULTS = Path(__file__).parent / "results" / "gpu_step_profile.json"
# kernel kind by name, first match wins (cuDNN / CUTLASS / PyTorch / Triton kernel names)
KINDS = (("fused (triton)", r"^triton_"),
         ("layout transpose", r"nchwToNhwc|nhwcToNchw|transpose|permute"),
         ("attention", r"flash|fmha|attention|sdpa"),
         ("convolution", r"conv|implicit_gemm|dgrad|wgrad|fprop|cudnn|winograd"),
         ("gemm", r"gemm|xmma|cutlass|cublas|sm90_|sm80_|ampere|matmul"),
         ("group norm", r"group_norm|groupnorm|GroupNorm|welford|RowwiseMoments|ComputeFused|ComputeInternalGradients"),
         ("reduction", r"reduce|Reduce|sum_|mean"),
         ("elementwise", r"elementwise|vectorized|unrolled|Elementwise|copy|cat|fill|silu|mul|add"))


def kind_of(kernel: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, kernel)), "other")


def kernel_breakdown(step: Callable[[], None]) -> dict:
    """One profiled step: summed kernel milliseconds by kind, the top kernels, and GPU-busy share."""
    device = torch.autograd.DeviceType.CUDA if torch.cuda.is_available() else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall_ms = (time.perf_counter() - t0) * 1e3
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event in prof.events():
        ms = (event.device_time if device == torch.autograd.DeviceType.CUDA else event.self_cpu_time_total) / 1e3
        if event.device_type == device and ms > 0:
            by_kind[kind_of(event.name)] += ms
            by_name[event.name[:120]] += ms
    busy = sum(by_kind.values())
    return {"kernel_ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "busy_ms": round(busy, 1), "wall_ms": round(wall_ms, 1), "busy_share": round(busy / wall_ms, 3),
            "top_kernels_ms": {k: round(v, 2) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]}}


VARIANTS = ("eager bf16", "eager bf16 channels_last", "compiled bf16", "compiled bf16 channels_last")


def variants(name: str, batch: int, wanted: list[str], device: str) -> dict[str, Callable[[], None]]:
    """Training steps of network `name` on `device` (same weights and data) for the `wanted` VARIANTS."""
    torch.manual_seed(0)
    cfg = bench_config(name)
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    x, target = (torch.randn(batch, 1, size, size, generator=g).to(device) for _ in range(2))
    t = torch.randint(0, cfg.diffusion.steps, (batch,), generator=g).to(device)
    weights = create_model(bench_config(name, conv_algorithm="direct")).state_dict()
    steps = {}
    for variant in wanted:
        cl, compiled = variant.endswith("channels_last"), variant.startswith("compiled")
        model = create_model(bench_config(name, conv_algorithm="direct", channels_last=cl, compile=compiled))
        model.load_state_dict(weights)
        inputs = x.to(memory_format=torch.channels_last) if cl else x
        steps[variant] = train_step(model.to(device), inputs, t, target, "bf16")
    return steps


def parse_phases(texts: list[str]) -> list[tuple[int, list[str]]]:
    """[(batch, variants)] from "BATCH:VARIANT,VARIANT" texts; ValueError names what is wrong."""
    plan = []
    for text in texts:
        batch, _, names = text.partition(":")
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        if not batch.strip().isdigit() or int(batch) < 1 or not wanted:
            raise ValueError(f"--phase '{text}' is not BATCH:VARIANT[,VARIANT…], e.g. '16:eager bf16'")
        unknown = [n for n in wanted if n not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
        plan.append((int(batch), wanted))
    return plan


def run_phase(steps: dict[str, Callable[[], None]], repeats: int) -> dict:
    """Two warm-up steps of every variant (compile times included, each printed as it ends), timed
    steps in turns (`step_timing.time_steps`), then one profiled step each."""
    out: dict[str, dict] = {}
    for n, step in steps.items():
        warm = []
        for _ in range(2):
            t0 = time.perf_counter()
            step()
            warm.append(round((time.perf_counter() - t0) * 1e3, 1))
        out[n] = {"warmup_ms": warm}
        print(f"  {n}: warm-up {warm} ms", file=sys.stderr, flush=True)
    _, timed = time_steps(steps, repeats, warmup=0)
    for n, step in steps.items():
        times = [round(t * 1e3, 2) for t in timed[n]]
        out[n].update(times_ms=times, median_ms=round(statistics.median(times), 2), min_ms=min(times))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out[n].update(kernel_breakdown(step))
        if torch.cuda.is_available():
            out[n]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def write(args: argparse.Namespace, phases: dict[str, dict], peak: float) -> None:
    """The JSON of the phases measured so far, each variant's share of `peak` (the bf16 matmul's
    TFLOP/s, timed in this run)."""
    for phase in phases.values():
        gflop = phase["gflop_per_step"]
        for v in (v for v in phase.values() if isinstance(v, dict)):
            v["achieved_tflop_per_s"] = round(gflop / v["median_ms"], 3)
            v["share_of_bf16_matmul"] = round(gflop / v["median_ms"] / peak, 3)
    machine = machine_facts()
    machine.update(torch=torch.__version__, cuda=torch.cuda.get_device_name() if args.device == "cuda" else None,
                   bf16_matmul_tflop_per_s=round(peak, 3),
                   cudnn=torch.backends.cudnn.version())
    write_result(args.out, {"benchmark": "GPU time of one U-Net training step by variant and kernel kind",
                            "date": time.strftime("%Y-%m-%d %H:%M"), "config": args.config,
                            "cudnn_benchmark": args.cudnn_benchmark, "repeats": args.repeats, "machine": machine,
                            "phases": phases})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="HP2")
    parser.add_argument("--phase", nargs="+", default=["16:" + ",".join(VARIANTS)], metavar="BATCH:VARIANT,…",
                        help=f"phases in order, each a batch size and variants of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant and phase (default 5)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms (autotuning)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a plumbing check only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: this benchmark needs a CUDA GPU (--device cpu checks its plumbing)\n")
    try:
        plan = parse_phases(args.phase)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    peak = matmul_bf16_tflop_per_s() if args.device == "cuda" else gemm_gflop_per_s("cpu", torch.bfloat16) / 1e3
    phases: dict[str, dict] = {}
    for batch, wanted in plan:
        print(f"batch {batch}: {', '.join(wanted)} …", file=sys.stderr, flush=True)
        phases[f"batch {batch}"] = run_phase(variants(args.config, batch, wanted, args.device), args.repeats)
        phases[f"batch {batch}"]["gflop_per_step"] = round(flops_per_step(args.config, batch) / 1e9, 1)
        write(args, phases, peak)  # after each phase: a phase that runs out of time leaves the ones before
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for phase, v in phases.items():  # a short table last: the device reply carries the end of the output
        for n, r in ((n, r) for n, r in v.items() if isinstance(r, dict)):
            kinds = ", ".join(f"{k} {ms:.0f}" for k, ms in list(r.get("kernel_ms_by_kind", {}).items())[:5])
            print(f"{phase:24s} {n:28s} {r['median_ms']:7.1f} ms  {r['share_of_bf16_matmul']:.0%} of peak  "
                  f"busy {r.get('busy_share', 0):.0%}  peak {r.get('peak_gib', 0)} GiB | {kinds}", file=sys.stderr)


if __name__ == "__main__":
    main()
