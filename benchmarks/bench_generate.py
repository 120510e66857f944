"""Generation speed and quality per sampler, on one tiny model: DPM-Solver++(2M) at 10/15/20 steps vs
DDIM 50, from noise and from VAE priors (strength 0.5), plus VAE-seeded DDIM at 25/50 steps and the
full-T DDPM baseline.

Network evaluations are counted by wrapping the model (rows it saw / images), not by arithmetic.
Quality: circularity pass rate (pipeline.check.circularity, all rules) and proxy KID against held-out
synthetic images (benchmarks/sweep_scoring.Evaluator on proxy features, so KIDs rank samplers, they
are not comparable with published ones). The models are trained here for `--train-steps` (a few in
--quick: quality is then near zero for every sampler, the speed ratios still hold), or given with --diffusion/--vae. The full-T DDPM is timed over a few
steps and extrapolated linearly (each step is one network evaluation of the same cost).
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
from sweep_scoring import Evaluator, heldout_images  # noqa: E402

from guided_diffusion.samplers import STEPS, run_loop, sample, strength_to_t_start  # noqa: E402
from guided_diffusion.training.checkpoint import load_for_inference  # noqa: E402
from guided_diffusion.training.factory import create_diffusion  # noqa: E402
from pipeline.cli import train_diffusion  # noqa: E402
from pipeline.common.config import load_config  # noqa: E402
from pipeline.data.folders import load_image_array  # noqa: E402
from vae import train as vae_train  # noqa: E402
from vae.priors import load_vae, sample_priors  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_generate.json"
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
TINY = ["data.image_size=32", "data.synthetic_count=64", "diffusion.steps=4000", "diffusion.noise_schedule=linear",
        "train.batch_size=8", "train.sample_every=1000", "vae.epochs=1"]
SAMPLERS = [("ddim", 50), ("dpm++2m", 10), ("dpm++2m", 15), ("dpm++2m", 20)]


class CountingModel:
    """The network, counting the image rows it evaluates."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def __call__(self, x, t, **kwargs):
        self.rows += len(x)
        return self.model(x, t, **kwargs)


def _train(tmp: Path, train_steps: int) -> tuple[Path, Path]:
    overrides = [*TINY, f"train.max_steps={train_steps}", f"train.save_every={train_steps}"]
    train_diffusion.main.__wrapped__(["--config", str(CONFIG), *sum((["--set", s] for s in overrides), []),
                                      "--out", str(tmp / "diffusion"), "--device", "cpu"])
    cfg = load_config(CONFIG, overrides)
    vae_train.train(cfg, partial(load_image_array, cfg.data), tmp / "vae", verbose=0)
    return tmp / "diffusion", tmp / "vae" / "vae.keras"


def _run(counter: CountingModel, diffusion, shape, priors, strength: float, sampler: str, repeats: int):
    """(images, seconds per image, network evaluations per image) of one setting; the first run warms up."""
    t_start = strength_to_t_start(diffusion, strength)
    x_start = None if strength == 1.0 else priors

    def once() -> torch.Tensor:
        return sample(counter, diffusion, shape, sampler=sampler, x_start=x_start,
                      t_start=None if x_start is None else t_start, generator=torch.Generator().manual_seed(0))

    images = once()
    counter.rows = 0
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    seconds = (time.perf_counter() - start) / repeats
    return images.clamp(-1, 1).numpy(), seconds / shape[0], counter.rows / (repeats * shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, repeats and training steps")
    parser.add_argument("--train-steps", type=int, default=None, help="diffusion training steps (quick: 2, else 300)")
    parser.add_argument("--diffusion", type=Path, help="a trained diffusion run (skips training; with --vae)")
    parser.add_argument("--vae", type=Path, help="a trained VAE .keras file")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    n, repeats = (8, 1) if args.quick else (32, 2)
    train_steps = args.train_steps or (2 if args.quick else 300)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        diffusion_dir, vae_path = ((args.diffusion, args.vae) if args.diffusion else _train(Path(tmp), train_steps))
        model, train_cfg, _ = load_for_inference(diffusion_dir)
        vae = load_vae(vae_path)
        cfg = load_config(CONFIG, TINY)
        evaluate = Evaluator(cfg, heldout_images(cfg, n), seed=0)
        shape = (n, train_cfg.data.channels, train_cfg.data.image_size, train_cfg.data.image_size)
        start = time.perf_counter()
        priors = torch.from_numpy(sample_priors(vae, n, seed=0))
        prior_s = (time.perf_counter() - start) / n
        counter = CountingModel(model)
        rows = []
        for mode, strength in (("from_noise", 1.0), ("from_vae", 0.5)):
            for sampler, steps in SAMPLERS:
                d = create_diffusion(train_cfg, respacing=str(steps))
                images, sec, nfe = _run(counter, d, shape, priors, strength, sampler, repeats)
                quality = evaluate(images)
                rows.append({"mode": mode, "sampler": sampler, "steps": steps, "strength": strength,
                             "nfe_per_image": nfe, "seconds_per_image": sec, "pass_rate": quality["pass_rate"],
                             "pass_ci95": quality["pass_ci95"], "proxy_kid": quality["kid"]})
        for steps in (25, 50):
            d = create_diffusion(train_cfg, respacing=str(steps))
            for strength in (0.3, 0.7):
                _, sec, nfe = _run(counter, d, shape, priors, strength, "ddim", repeats)
                rows.append({"mode": "from_vae", "sampler": "ddim", "steps": steps, "strength": strength,
                             "nfe_per_image": nfe, "seconds_per_image": sec})
        full = create_diffusion(train_cfg)
        timed = 8
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        run_loop(STEPS["ddpm"], counter, full, x, timed - 1, generator=torch.Generator().manual_seed(0))
        per_eval = (time.perf_counter() - start) / timed / n
        rows.append({"mode": "from_noise", "sampler": "ddpm", "steps": full.num_timesteps, "strength": 1.0,
                     "nfe_per_image": full.num_timesteps, "seconds_per_image": per_eval * full.num_timesteps,
                     "extrapolated_from_steps": timed})
    for row in rows:
        row["images_per_s"] = 1.0 / row["seconds_per_image"]
        row["speedup_vs_ddpm_full"] = rows[-1]["seconds_per_image"] / row["seconds_per_image"]

    def find(mode: str, sampler: str, steps: int, strength: float) -> dict:
        return next(r for r in rows if (r["mode"], r["sampler"], r["steps"], r["strength"]) == (mode, sampler, steps,
                                                                                                strength))

    ddim_noise, dpm_noise = find("from_noise", "ddim", 50, 1.0), find("from_noise", "dpm++2m", 15, 1.0)
    ddim_vae, dpm_vae = find("from_vae", "ddim", 50, 0.5), find("from_vae", "dpm++2m", 15, 0.5)
    result = {
        "benchmark": "bench_generate", "quick": args.quick, "images": n, "prior_s_per_image": prior_s,
        "model": f"tiny-cpu (32 px), T={full.num_timesteps}, "
                 + (f"given: {diffusion_dir}" if args.diffusion else f"trained {train_steps} steps here"),
        "note": "NFE counted on a wrapped model; DDPM over all T steps extrapolated from timing a few; "
                "KID on proxy features (ranks sets only)",
        "target": "VAE-seeded <= 50 network evaluations per image",
        "target_met": all(r["nfe_per_image"] <= 50 for r in rows if r["mode"] == "from_vae"),
        "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    result["headline"] = [
        headline("from VAE, DDIM 50, strength 0.5: network evaluations per image (counted)",
                 f"{ddim_vae['nfe_per_image']:g}", "≤ 50", ddim_vae["nfe_per_image"] <= 50),
        headline("speed-up per image, DPM-Solver++(2M) 15 over DDIM 50 (same run): from noise; from VAE s = 0.5",
                 f"{ddim_noise['seconds_per_image'] / dpm_noise['seconds_per_image']:.1f}x; "
                 f"{ddim_vae['seconds_per_image'] / dpm_vae['seconds_per_image']:.1f}x"),
        headline("pass rate, DDIM 50 vs DPM++ 15: from noise; from VAE s = 0.5",
                 f"{ddim_noise['pass_rate']:.2f} vs {dpm_noise['pass_rate']:.2f}; "
                 f"{ddim_vae['pass_rate']:.2f} vs {dpm_vae['pass_rate']:.2f}"),
        headline(f"speed-up of from-VAE DDIM 50 s = 0.5 over full DDPM ({full.num_timesteps} steps, not run: "
                 f"extrapolated from {rows[-1]['extrapolated_from_steps']} timed steps)",
                 f"{ddim_vae['speedup_vs_ddpm_full']:.0f}x"),
    ]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
