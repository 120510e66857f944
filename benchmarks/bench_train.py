"""Training-step speed and memory: micro-batching and the cost of the training loop.

    python benchmarks/bench_train.py [--quick] [--device auto|cpu|cuda] [--threads N] [--out FILE]

Measured, each in a fresh subprocess (so the CPU peak, ru_maxrss, belongs to that variant alone):

- plain3:   optimizer steps of a plain batch of 3;
- micro120: optimizer steps of a batch of 120 in 40 micro-batches of 3 (the seed's HP3 setting).
  Target: peak memory above the model's setup (RSS on the CPU, allocated bytes on a GPU) within
  1.15x of plain3's (the activations of only 3 images live at a time); beside it, the saved
  activation bytes per image, counted on the model (guided_diffusion.activation_memory).
- bare:     forward/backward + AdamW on a fixed batch, nothing else;
- loop:     the real `train()` loop (data, RNG, clipping, NaN check, EMA, logging) at the same
  batch (both on the 32 px model even with --quick), timing each iteration and the part of it spent in forward/backward + AdamW.step; the
  overhead is iteration time / that part − 1 (target < 5 %). `bare` is the same work without the
  loop, for a cross-check between processes.

Times are wall-clock and CPU-seconds of the process (the latter is steadier on a shared machine;
with one thread it is the work done). JSON to stdout and to --out (default
benchmarks/results/bench_train.json); ratios are against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from results_io import headline, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "bench_train.json"

MODELS = {  # --set overrides for pipeline.common.config
    "quick": ["data.image_size=16", "model.model_channels=16", "model.num_res_blocks=1", "model.channel_mult=[1,2]",
              "model.attention_resolutions=[8]", "model.num_head_channels=16", "diffusion.steps=1000"],
    "full": ["data.image_size=32", "model.model_channels=32", "model.num_res_blocks=1", "model.channel_mult=[1,2,2]",
             "model.attention_resolutions=[8]", "model.num_head_channels=32", "diffusion.steps=1000"],
}
LOOP_BATCH = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _setup(mode: str, device: torch.device):
    from guided_diffusion.training.factory import create_diffusion, create_model
    from pipeline.common.config import load_config

    cfg = load_config(None, MODELS[mode])
    torch.manual_seed(0)
    model, diffusion = create_model(cfg).to(device), create_diffusion(cfg)
    return cfg, model, diffusion, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _batch(cfg, n: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    s = cfg.data.image_size
    x = torch.rand(n, cfg.data.channels, s, s, generator=g).to(device) * 2 - 1
    t = torch.randint(0, cfg.diffusion.steps, (n,), generator=g).to(device)
    return x, t, torch.randn(x.shape, generator=g).to(device), torch.ones(n, device=device)


def _timed(fn, steps: int, device: torch.device) -> dict:
    for _ in range(3):  # warm-up (allocator, lazy initialisation)
        fn()
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    _sync(device)
    return {"s_per_step": (time.perf_counter() - wall) / steps, "cpu_s_per_step": (time.process_time() - cpu) / steps}


def variant_step(mode: str, device: torch.device, batch: int, microbatch: int, steps: int) -> dict:
    """Optimizer steps of `batch` images in micro-batches of `microbatch` (forward_backward + AdamW)."""
    from guided_diffusion.training.step import forward_backward

    cfg, model, diffusion, opt = _setup(mode, device)
    x, t, noise, w = _batch(cfg, batch, device)
    baseline = _peak_bytes(device)

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward(model, diffusion, x, t, w, noise, microbatch)
        opt.step()

    out = _timed(step, steps, device)
    out.update(peak_bytes=_peak_bytes(device), peak_bytes_above_setup=_peak_bytes(device) - baseline,
               images_per_s=batch / out["s_per_step"])
    return out


def variant_bare(mode: str, device: torch.device, steps: int) -> dict:
    """The irreducible step: loss, backward, AdamW on a fixed batch."""
    cfg, model, diffusion, opt = _setup(mode, device)
    x, t, noise, _ = _batch(cfg, LOOP_BATCH, device)

    def step():
        opt.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x, t, noise=noise)["loss"].mean().backward()
        opt.step()

    return _timed(step, steps, device)


def variant_loop(mode: str, device: torch.device, steps: int) -> dict:
    """The real training loop, with the time inside forward/backward and AdamW.step accounted.

    One iteration runs from one forward_backward call to the next; what it spends outside
    forward_backward + optimizer.step is the loop's overhead. Both are measured in the same run,
    so load changes on a shared machine hit both alike.
    """
    from guided_diffusion.training import loop
    from guided_diffusion.training.distributed import Dist
    from pipeline.common.config import load_config
    from pipeline.data.folders import load_image_array

    starts: list[tuple[float, float]] = []
    inner: list[list[float]] = []
    clocks = (time.perf_counter, time.process_time)

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = [c() for c in clocks]
            out = fn(*args, **kwargs)
            _sync(device)
            inner[-1][0] += clocks[0]() - t0[0]
            inner[-1][1] += clocks[1]() - t0[1]
            return out
        return wrapper

    forward_backward = timed(loop.forward_backward)

    def counted_forward_backward(*args, **kwargs):
        starts.append(tuple(c() for c in clocks))
        inner.append([0.0, 0.0])
        return forward_backward(*args, **kwargs)

    loop.forward_backward = counted_forward_backward
    torch.optim.AdamW.step = timed(torch.optim.AdamW.step)
    cfg = load_config(None, [*MODELS[mode], f"train.batch_size={LOOP_BATCH}", f"train.max_steps={steps}",
                             "data.synthetic_count=64", "train.ema_rates=[0.9999,0.999]",
                             f"train.log_every={max(steps // 8, 1)}", "train.save_every=100000",
                             "train.sample_every=100000", "train.stats_every=100000", "train.sample_count=1",
                             "train.sample_steps=2", "train.precision=fp32"])
    with tempfile.TemporaryDirectory() as tmp:
        s = loop.prepare(cfg, partial(load_image_array, cfg.data), device, Dist())
        loop.train(s, Path(tmp), Dist())
    first = 3  # skip warm-up; the last iteration has no successor (and ends in the final save)
    out = {}
    for k, clock in enumerate(("wall", "cpu")):
        period = starts[-1][k] - starts[first][k]
        work = sum(i[k] for i in inner[first:-1])
        out[clock] = {"s_per_step": period / (len(starts) - 1 - first), "overhead": period / work - 1}
    return {"s_per_step": out["wall"]["s_per_step"], "cpu_s_per_step": out["cpu"]["s_per_step"],
            "overhead_wall": out["wall"]["overhead"], "overhead_cpu": out["cpu"]["overhead"]}


def saved_activations(mode: str) -> dict:
    """What autograd keeps per image of the benchmark's model (guided_diffusion.activation_memory):
    the micro-batching claim in bytes, independent of the interpreter's RSS."""
    from guided_diffusion.activation_memory import count_activation_bytes

    cfg, model, _, _ = _setup(mode, torch.device("cpu"))
    counted = count_activation_bytes(model, cfg.data.image_size, cfg.data.channels, "fp32")
    return {"image_size": cfg.data.image_size, "per_image_mib": counted.per_image / 2**20,
            "fixed_mib": counted.fixed / 2**20}


def run_variant(name: str, mode: str, device: str, threads: int | None) -> dict:
    """Run one variant in a fresh interpreter and return its JSON."""
    cmd = [sys.executable, __file__, "--variant", name, "--device", device] + (["--quick"] if mode == "quick" else [])
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(name: str, mode: str, device: torch.device) -> dict:
    quick = mode == "quick"
    if name == "plain3":
        return variant_step(mode, device, 3, 3, 20 if quick else 40)
    if name == "micro120":
        return variant_step(mode, device, 120, 3, 2 if quick else 4)
    # The loop's cost is per step and the model's per pixel: on the 16 px quick model the ratio
    # would say more about the model's size than the loop's, so both modes time the 32 px one.
    if name == "bare":
        return variant_bare("full", device, 20 if quick else 60)
    return variant_loop("full", device, 20 if quick else 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, few steps")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(child(args.variant, mode, torch.device(device))))
        return

    r = {name: run_variant(name, mode, device, args.threads) for name in ("plain3", "micro120", "bare", "loop")}
    result = {
        "benchmark": "bench_train", "mode": mode, "device": device,
        "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "model": MODELS[mode],
        "variants": r,
        "micro120_vs_plain3": {
            "peak_memory_ratio": r["micro120"]["peak_bytes"] / r["plain3"]["peak_bytes"],
            "peak_memory_above_setup_ratio": r["micro120"]["peak_bytes_above_setup"]
            / max(r["plain3"]["peak_bytes_above_setup"], 1),
            "target_peak_memory_ratio": 1.15,
            "images_per_s_ratio": r["micro120"]["images_per_s"] / r["plain3"]["images_per_s"],
        },
        "loop_overhead": {
            "batch": LOOP_BATCH,
            "wall": r["loop"]["overhead_wall"],
            "cpu": r["loop"]["overhead_cpu"],
            "target": 0.05,
            "loop_vs_bare_s_per_step": r["loop"]["s_per_step"] / r["bare"]["s_per_step"],
        },
    }
    result["saved_activations"] = saved_activations(mode)
    ratio, overhead = result["micro120_vs_plain3"]["peak_memory_above_setup_ratio"], r["loop"]["overhead_cpu"]
    saved = result["saved_activations"]
    result["headline"] = [
        headline(f"micro-batching: peak {'GPU memory' if device == 'cuda' else 'RSS'} above the model's setup, "
                 "batch of 120 as 40 × 3 over a plain batch of 3 (same run)", f"{ratio:.3f}x", "≤ 1.15x", ratio <= 1.15),
        headline(f"saved activations per image ({saved['image_size']} px model, fp32, counted): a micro-batch of 3 "
                 "holds 3 images' worth, a plain batch of 120 would hold 120",
                 f"{saved['per_image_mib']:.2f} MiB/image (3: {3 * saved['per_image_mib']:.1f} MiB; "
                 f"120: {120 * saved['per_image_mib']:.0f} MiB)"),
        headline(f"training-loop overhead around forward/backward + AdamW (32 px model, batch {LOOP_BATCH}, CPU time)",
                 f"{overhead:.1%}", "< 5%", overhead < 0.05),
        headline("micro-batching throughput: batch 120 as 40 × 3 over plain 3",
                 f"{result['micro120_vs_plain3']['images_per_s_ratio']:.2f}x images/s"),
    ]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
