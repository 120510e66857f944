"""Training memory: activations saved per image, the memory plan, and (on a GPU) measured peaks.

    python benchmarks/bench_memory.py [--quick] [--train-steps N] [--out FILE]

Writes benchmarks/results/bench_memory.json (bench_memory_gpu.json with --train-steps).

1. Saved activations per image (what autograd keeps for backward, counted on fake tensors by
   guided_diffusion.activation_memory under CUDA's autocast rules) for a small 64 px config and
   the seed's HP2, in fp32 and half precision; beside them the same network with torch's own
   nn.GroupNorm and nn.Upsample (the layers before issue 17: float32 outputs under CUDA's
   autocast), counted in the same run, and openai guided-diffusion's fp16 recipe as counted on
   2026-11-26 (context: not run here).
2. The memory plan of configs/hp2-128.yaml for a 15 GiB (free Colab T4) and a 40 GiB card.
3. With CUDA and --train-steps N: each recipe of RECIPES trains N steps of HP2 on synthetic data
   in its own process under torch.cuda.set_per_process_memory_fraction(budget), and its
   measured peak (torch.cuda.max_memory_allocated) is set beside the plan's estimate.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from results_io import headline, write_result
from torch import nn

from guided_diffusion.activation_memory import count_activation_bytes
from guided_diffusion.nn import GroupNorm, NearestUpsample
from guided_diffusion.training.factory import create_model
from guided_diffusion.training.memory_plan import GIB, format_plan, plan_for_gpu
from pipeline.common.config import load_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "bench_memory.json"
GPU_RESULTS = Path(__file__).parent / "results" / "bench_memory_gpu.json"  # with --train-steps
MIB = 2**20
HP2_CONFIG = REPO / "configs" / "hp2-128.yaml"
SMALL = ["data.image_size=64", "model.model_channels=64", "model.num_res_blocks=2", "model.channel_mult=[1,2,3,4]",
         "model.attention_resolutions=[16,8]"]
# openai guided-diffusion's fp16 recipe (GroupNorm32 outputs in half precision), saved bytes per
# image counted the same way on 2026-11-26 (issue 17). Context only: that code does not run here.
OPENAI_FP16_MIB = {"small": 76.4, "HP2": 1127.7}
# (name, budget GiB, --set overrides on configs/hp2-128.yaml) for the GPU runs.
RECIPES = [
    ("T4 recipe (hp2-128-t4.yaml) at 15.0 GiB", 15.0, "configs/hp2-128-t4.yaml", []),
    ("fp16, micro-batch 3, EMA on the GPU, at 15.0 GiB", 15.0, "configs/hp2-128.yaml",
     ["train.precision=fp16", "train.microbatch=3", "train.ema_device=same"]),
    ("bf16, micro-batch 24, EMA on the GPU, at 40 GiB", 40.0, "configs/hp2-128.yaml",
     ["train.precision=bf16", "train.microbatch=24", "train.ema_device=same"]),
]


def with_plain_torch_modules(model: nn.Module) -> nn.Module:
    """The U-Net as it was before issue 17: torch's nn.GroupNorm and nn.Upsample in place of ours
    (both return float32 under CUDA's autocast), same weights."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, NearestUpsample):
                setattr(parent, name, nn.Upsample(scale_factor=2, mode="nearest"))
            elif isinstance(child, GroupNorm):
                child.__class__ = nn.GroupNorm
    return model


def count(cfg, precision: str, torch_norms: bool) -> dict:
    with torch.device("meta"):
        model = create_model(cfg)
    if torch_norms:
        model = with_plain_torch_modules(model)
    counted = count_activation_bytes(model, cfg.data.image_size, cfg.data.channels, precision, "cuda")
    return {"per_image_mib": round(counted.per_image / MIB, 1), "fixed_mib": round(counted.fixed / MIB, 1)}


def saved_bytes_table() -> dict:
    table = {}
    for name, cfg in (("small", load_config(None, SMALL)), ("HP2", load_config(HP2_CONFIG))):
        started = time.perf_counter()
        table[name] = {f"{p}{' before issue 17' if plain else ''}": count(cfg, p, plain)
                       for p in ("fp32", "bf16", "fp16") for plain in (False, True) if not (p == "fp32" and plain)}
        table[name]["openai fp16 recipe (2026-11-26, not run here)"] = {"per_image_mib": OPENAI_FP16_MIB[name]}
        table[name]["count_s"] = round(time.perf_counter() - started, 1)
    return table


def plans() -> dict:
    cfg = load_config(HP2_CONFIG)
    out = {}
    for gib in (15.0, 40.0):
        plan = plan_for_gpu(cfg, torch.device("cpu"), gib)
        out[f"{gib:.0f} GiB"] = {"peak_gib": round(plan.chosen.peak / GIB, 2),
                                 "settings": dataclasses.asdict(plan.chosen.settings), "fits": plan.fits,
                                 "text": format_plan(plan, "configs/hp2-128.yaml").splitlines()}
    return out


def one_gpu_run(config: str, overrides: list[str], budget_gib: float, steps: int) -> dict:
    """Train `steps` steps in this process under a memory fraction; the plan's estimate and the peak."""
    from pipeline.cli.train_diffusion import main as train_diffusion

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total))
    sets = [*overrides, f"train.max_steps={steps}", f"train.save_every={steps}", f"train.sample_every={steps}",
            "data.synthetic_count=240", "train.log_every=1", "train.sample_steps=5", f"train.gpu_memory={budget_gib}"]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--config", str(REPO / config), "--out", f"{tmp}/run", "--device", "cuda"]
        argv += [a for s in sets for a in ("--set", s)]
        started = time.perf_counter()
        try:
            train_diffusion(argv)
        except SystemExit as exc:
            if exc.code:
                return {"error": f"exit {exc.code}"}
        summary = json.loads(Path(f"{tmp}/run/summary.json").read_text())
        with open(f"{tmp}/run/log.csv", newline="") as f:
            rates = [float(row["it_s"]) for row in csv.DictReader(f)][1:]  # after the first (warm-up) step
    return {"plan_gib": round(summary["plan_peak_gib"], 2), "settings": summary["settings"],
            "peak_gib": round(summary["gpu_peak_gib"], 2),
            "steps_per_s": round(statistics.median(rates), 3) if rates else None,
            "wall_s": round(time.perf_counter() - started, 1),
            "plan_error": round(summary["plan_peak_gib"] / summary["gpu_peak_gib"] - 1, 3)}


def gpu_runs(steps: int) -> Iterator[tuple[str, dict]]:
    """(recipe, result) for each of RECIPES, each trained in a process of its own."""
    for name, budget, config, overrides in RECIPES:
        if budget * GIB > torch.cuda.get_device_properties(0).total_memory:
            yield name, {"skipped": f"needs {budget} GiB"}
            continue
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_memory as b; "
                f"print('RESULT', json.dumps(b.one_gpu_run({config!r}, {overrides!r}, {budget}, {steps})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        yield name, json.loads(line[7:]) if line else {"error": proc.stderr[-2000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(the counts are quick already)")
    parser.add_argument("--train-steps", type=int, default=0, help="with CUDA: train each recipe this many steps")
    parser.add_argument("--out", type=Path, help=f"default: {RESULTS.name}, with --train-steps {GPU_RESULTS.name}")
    args = parser.parse_args()
    table = saved_bytes_table()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "saved_activations": table, "plans_hp2": plans()}
    out = args.out or (GPU_RESULTS if args.train_steps else RESULTS)
    if args.train_steps and torch.cuda.is_available():
        result["gpu_runs"] = {}
        for name, run in gpu_runs(args.train_steps):  # written after each run: a time-out keeps the others
            result["gpu_runs"][name] = run
            write_result(out, result)
    heads = []
    for name in ("small", "HP2"):
        ours = max(table[name]["bf16"]["per_image_mib"], table[name]["fp16"]["per_image_mib"])
        before = table[name]["bf16 before issue 17"]["per_image_mib"]
        heads.append(headline(f"{name}: saved activations per image under CUDA autocast, vs the U-Net before "
                              "issue 17 (same run)",
                              f"{ours} MiB vs {before} ({ours / before:.2f}x)", "< 1.00x", ours < before))
        heads.append(headline(f"{name}: the same vs openai's fp16 recipe (counted 2026-11-26, not run here)",
                              f"{ours} MiB vs {OPENAI_FP16_MIB[name]}", "context", None))
    t4 = result["plans_hp2"]["15 GiB"]
    heads.append(headline("HP2 plan on a 15 GiB card (peak estimate)", f"{t4['peak_gib']} GiB", "<= 12.0 GiB",
                          t4["peak_gib"] <= 12.0))
    result["headline"] = heads
    for name, run in result.get("gpu_runs", {}).items():
        if "peak_gib" in run:
            heads.append(headline(f"GPU peak of {name} vs the plan", f"{run['peak_gib']} GiB vs {run['plan_gib']}",
                                  "within 10 %", abs(run["plan_error"]) < 0.10))
    write_result(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
