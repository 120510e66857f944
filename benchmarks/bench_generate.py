"""Generation speed: VAE-seeded (strength 0.3/0.5/0.7, 25/50 DDIM steps) vs from-noise DDIM 50 vs
from-noise DDPM over all T = 4000 steps, on one tiny model (speed, not quality: a few training steps).

The full 4000-step DDPM is timed over a few steps and extrapolated linearly (each step is one network
evaluation of the same cost); the JSON says so. Priors come from the same VAE code as `generate`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_io import headline, write_result  # noqa: E402

from guided_diffusion.samplers import STEPS, run_loop, sample, sampler_nfe  # noqa: E402
from guided_diffusion.training.checkpoint import load_for_inference  # noqa: E402
from guided_diffusion.training.factory import create_diffusion  # noqa: E402
from pipeline.cli import train_diffusion  # noqa: E402
from pipeline.common.config import load_config  # noqa: E402
from pipeline.data.folders import load_image_array  # noqa: E402
from vae import train as vae_train  # noqa: E402
from vae.priors import load_vae, sample_priors  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_generate.json"
TINY = ["data.image_size=32", "data.synthetic_count=64", "diffusion.steps=4000", "diffusion.noise_schedule=linear",
        "train.batch_size=8", "train.max_steps=2", "train.save_every=2", "train.sample_every=1000",
        "vae.epochs=1"]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    n, repeats = (4, 1) if args.quick else (16, 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = REPO / "configs" / "tiny-cpu.yaml"
        train_diffusion.main.__wrapped__(["--config", str(config), *sum((["--set", s] for s in TINY), []),
                                          "--out", str(tmp / "diffusion"), "--device", "cpu"])
        cfg = load_config(config, TINY)
        vae_train.train(cfg, partial(load_image_array, cfg.data), tmp / "vae", verbose=0)
        model, train_cfg, _ = load_for_inference(tmp / "diffusion")
        vae = load_vae(tmp / "vae" / "vae.keras")
        shape = (n, train_cfg.data.channels, train_cfg.data.image_size, train_cfg.data.image_size)
        prior_s = _time(lambda: sample_priors(vae, n, seed=0), repeats)
        priors = torch.from_numpy(sample_priors(vae, n, seed=0))
        rows = []
        for steps in (25, 50):
            diffusion = create_diffusion(train_cfg, respacing=str(steps))
            for strength in (0.3, 0.5, 0.7):
                sec = _time(lambda d=diffusion, s=strength: sample(
                    model, d, shape, x_start=priors, strength=s, generator=torch.Generator().manual_seed(0)), repeats)
                rows.append({"mode": "from_vae", "sampler": "ddim", "steps": steps, "strength": strength,
                             "nfe_per_image": sampler_nfe(diffusion, strength),
                             "images_per_s": n / (sec + prior_s), "prior_s_per_image": prior_s / n})
        ddim50 = create_diffusion(train_cfg, respacing="50")
        sec = _time(lambda: sample(model, ddim50, shape, generator=torch.Generator().manual_seed(0)), repeats)
        rows.append({"mode": "from_noise", "sampler": "ddim", "steps": 50, "strength": 1.0,
                     "nfe_per_image": sampler_nfe(ddim50, 1.0), "images_per_s": n / sec})
        full = create_diffusion(train_cfg)
        timed = 8
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        sec = _time(lambda: run_loop(STEPS["ddpm"], model, full, x, timed - 1,
                                     generator=torch.Generator().manual_seed(0)), repeats)
        per_step = sec / timed
        rows.append({"mode": "from_noise", "sampler": "ddpm", "steps": full.num_timesteps, "strength": 1.0,
                     "nfe_per_image": full.num_timesteps, "images_per_s": n / (per_step * full.num_timesteps),
                     "extrapolated_from_steps": timed})
    base = rows[-1]["images_per_s"]
    for row in rows:
        row["speedup_vs_ddpm_full"] = row["images_per_s"] / base
    result = {
        "benchmark": "bench_generate", "quick": args.quick, "images": n, "model": "tiny-cpu (32 px), T=4000",
        "note": "DDPM over all 4000 steps is extrapolated from timing a few steps of the same loop",
        "target": "VAE-seeded <= 50 network evaluations per image",
        "target_met": all(r["nfe_per_image"] <= 50 for r in rows if r["mode"] == "from_vae"),
        "rows": rows,
        "machine": {"cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    vae50 = next(r for r in rows if r["mode"] == "from_vae" and r["steps"] == 50 and r["strength"] == 0.5)
    noise50 = next(r for r in rows if r["mode"] == "from_noise" and r["sampler"] == "ddim")
    result["headline"] = [
        headline("from VAE, DDIM 50, strength 0.5: network evaluations per image", str(vae50["nfe_per_image"]),
                 "≤ 50", vae50["nfe_per_image"] <= 50),
        headline(f"images/s ({n} images, 32 px tiny model): from VAE DDIM 50 s = 0.5; from noise DDIM 50; DDPM 4000",
                 f"{vae50['images_per_s']:.2f}; {noise50['images_per_s']:.2f}; {rows[-1]['images_per_s']:.4f} (extrapolated)"),
        headline("speed-up of from-VAE DDIM 50 s = 0.5 over full DDPM", f"{vae50['speedup_vs_ddpm_full']:.0f}x"),
    ]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
