"""Speed and memory of one U-Net training step (forward + backward) at the seed's HP1 and HP2 sizes.

    python benchmarks/bench_unet.py [--quick] [--device cpu|cuda|all] [--configs HP1 HP2] [--out FILE]

For each configuration × precision (fp32, bf16 autocast) × memory format (contiguous,
channels_last) on CPU (and CUDA when present): seconds per step (median over repeats, after a
warm-up step), CPU-seconds per step of this process (less disturbed by other processes on a
busy machine), images/s, peak memory, FLOPs per step (torch.utils.flop_counter on the meta
device) and achieved GFLOP/s. Each measurement runs in a fresh subprocess so that the CPU peak
(ru_maxrss) belongs to it alone. The openai guided-diffusion U-Net's time on this machine class
is recorded beside ours with the ratio. JSON goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_io import headline, write_result
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion.unet import UNetModel

RESULTS = Path(__file__).parent / "results" / "bench_unet.json"

CONFIGS = {
    "HP1": {"image_size": 64, "model_channels": 128, "num_res_blocks": 3, "attention_resolutions": [16, 8],
            "num_head_channels": -1, "batch": 4},
    "HP2": {"image_size": 128, "model_channels": 192, "num_res_blocks": 4, "attention_resolutions": [32, 16, 8],
            "num_head_channels": 64, "batch": 2},
}

# The openai guided-diffusion U-Net at the same configs, forward + backward, measured on this
# machine class (2 CPU cores, fp32): HP1 ≈ 10.5 s/step (≈ 103 GFLOP/s), HP2 ≈ 33 s/step, when
# the cores' fp32 GEMM peak was near 190 GFLOP/s (so ≈ 54 % of it). On a busy machine the
# wall-clock numbers move with the load; `fraction_of_gemm` (our GFLOP/s over a 2048³ matmul's,
# measured in the same process just before and after the steps) is the load-robust comparison.
OPENAI_REFERENCE_S_PER_STEP = {"HP1": 10.5, "HP2": 33.0}
OPENAI_REFERENCE_FRACTION_OF_GEMM = 103 / 190


def build(name: str, device: str = "cpu") -> tuple[UNetModel, torch.Tensor, torch.Tensor]:
    c = CONFIGS[name]
    model = UNetModel(c["image_size"], 1, c["model_channels"], 1, c["num_res_blocks"], c["attention_resolutions"],
                      num_head_channels=c["num_head_channels"]).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c["batch"], 1, c["image_size"], c["image_size"], generator=g).to(device)
    t = torch.randint(0, 4000, (c["batch"],), generator=g).to(device)
    return model, x, t


def flops_per_step(name: str) -> int:
    """FLOPs of one forward + backward, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model, x, t = build(name, "meta")
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, t).float().square().mean().backward()
    return counter.get_total_flops()


def gemm_gflop_per_s(device: str, n: int = 2048) -> float:
    """Best fp32 matmul throughput of three n³ products: what the cores give right now."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str, device: str, precision: str, memory_format: str, repeats: int, warmup: int = 1,
            threads: int = 0) -> dict:
    """Time `repeats` forward+backward steps after `warmup` steps (runs in the current process)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    base_rss = _rss_mb()
    model, x, t = build(name, device)
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, t).float().square().mean()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):  # kernel selection, allocator
        step()
    gemm_before = gemm_gflop_per_s(device)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"s_per_step": statistics.median(wall), "cpu_s_per_step": statistics.median(cpu),
            "peak_mem_mb": round(peak, 1), "repeats": repeats, "warmup": warmup,
            "gemm_gflop_per_s": (gemm_before + gemm_gflop_per_s(device)) / 2}


def run_isolated(spec: dict) -> dict:
    """`measure(**spec)` in a fresh Python process (so its peak RSS is its own)."""
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(quick: bool, devices: list[str], names: list[str], threads: list[int]) -> list[dict]:
    cpu_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    specs = []
    for device in devices:
        for name in names:
            for precision in ("fp32", "bf16"):
                for fmt in ("contiguous", "channels_last"):
                    if device == "cpu" and precision == "bf16" and not cpu_bf16:
                        continue  # emulated bf16 convolutions run at a few GFLOP/s: hours per step
                    if quick and device == "cpu" and (precision == "bf16" or fmt == "channels_last"):
                        continue
                    for n_threads in threads if device == "cpu" else [0]:
                        specs.append({"name": name, "device": device, "precision": precision, "memory_format": fmt,
                                      "repeats": (1 if quick else 3) if device == "cpu" else 20,
                                      "warmup": 0 if quick and device == "cpu" else 1, "threads": n_threads})
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU: fp32 contiguous only, one timed step each, no warm-up")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="CPU thread counts to try (0 = torch's default); on a busy 2-core machine "
                             "1 thread can beat 2")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU and, when present, CUDA")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return

    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "all" and torch.cuda.is_available():
        devices.append("cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    flops = {name: flops_per_step(name) for name in args.configs}
    runs = []
    for spec in plan(args.quick, devices, args.configs, args.threads):
        print(f"{spec['name']} {spec['device']} {spec['precision']} {spec['memory_format']} "
              f"threads={spec['threads'] or 'default'} …", file=sys.stderr, flush=True)
        res = run_isolated(spec)
        row = {k: spec[k] for k in ("name", "device", "precision", "memory_format")}
        row["threads"] = spec["threads"] or torch.get_num_threads()
        row["batch"] = CONFIGS[spec["name"]]["batch"]
        row.update(res)
        if "s_per_step" in res:
            row["images_per_s"] = round(row["batch"] / res["s_per_step"], 3)
            row["gflop_per_step"] = round(flops[spec["name"]] / 1e9, 1)
            achieved = flops[spec["name"]] / 1e9 / res["s_per_step"]
            row["achieved_gflop_per_s"] = round(achieved, 1)
            row["gemm_gflop_per_s"] = round(res["gemm_gflop_per_s"], 1)
            row["fraction_of_gemm"] = round(achieved / res["gemm_gflop_per_s"], 3)
            if spec["device"] == "cpu" and spec["precision"] == "fp32":
                row["speedup_vs_openai_wall"] = round(OPENAI_REFERENCE_S_PER_STEP[spec["name"]] / res["s_per_step"], 2)
                row["speedup_vs_openai_at_equal_gemm"] = round(row["fraction_of_gemm"]
                                                               / OPENAI_REFERENCE_FRACTION_OF_GEMM, 2)
            row["s_per_step"] = round(res["s_per_step"], 4)
            row["cpu_s_per_step"] = round(res["cpu_s_per_step"], 3)
        runs.append(row)
    result = {
        "benchmark": "ADM U-Net forward+backward per training step",
        "quick": args.quick,
        "configs": CONFIGS,
        "openai_reference_s_per_step": OPENAI_REFERENCE_S_PER_STEP,
        "openai_reference_fraction_of_gemm": round(OPENAI_REFERENCE_FRACTION_OF_GEMM, 3),
        "openai_reference_note": "openai guided-diffusion U-Net, same configs, CPU fp32, measured on this machine "
                                 "class (103 GFLOP/s of a ~190 GFLOP/s GEMM peak)",
        "cpu_native_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "runs": runs,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "load_average_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    result["headline"] = [
        headline(f"{r['name']} U-Net forward+backward, {r['device']} {r['precision']}, batch {r['batch']}",
                 f"{r['s_per_step']:.1f} s/step at {r['fraction_of_gemm']:.0%} of a same-run matmul's FLOP/s"
                 f" ({r['speedup_vs_openai_at_equal_gemm']:.2f}x openai's)" if "speedup_vs_openai_at_equal_gemm" in r
                 else f"{r['s_per_step']:.3f} s/step",
                 f"openai code: {OPENAI_REFERENCE_FRACTION_OF_GEMM:.0%} of matmul speed "
                 f"({OPENAI_REFERENCE_S_PER_STEP[r['name']]} s on its reference machine)" if r["device"] == "cpu" else "",
                 r["fraction_of_gemm"] > OPENAI_REFERENCE_FRACTION_OF_GEMM if r["device"] == "cpu" else None)
        for r in runs if "s_per_step" in r]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
