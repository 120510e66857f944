"""Strength sweep: does seeding the diffusion model with VAE priors keep pupils round?

One VAE and one diffusion model (trained here by `--config`, default configs/sweep-cpu.yaml, unless
`--vae/--diffusion` name trained ones), the same seeds, N images per point:
  * from noise: DDIM (`--steps`) and DDPM over `--ddpm-steps` (default: the model's full T; the
    costliest point, so it runs on the main model only);
  * from VAE priors at each strength in `--strengths` (0 = the priors themselves);
  * held-out training-style images measured the same way (what "real" scores).
Per point: circularity pass rate (all rules, and the pupil rules alone) with Wilson 95% intervals,
mean bleed_fraction and pupil circularity, KID against held-out images, diversity (mean pairwise
pixel RMS and feature distance), network evaluations and seconds per image.

KID uses the project's proxy features by default (`pipeline.check.metrics.proxy_features`: random
projection + intensity and gradient histograms), labelled as such in every output: proxy KID ranks
sets, it is not comparable with published KIDs. `--metrics inception` uses clean-fid's Inception-v3
instead (`pipeline.check.inception`; the extra `metrics`, weights from `--inception-weights PATH` or
clean-fid's cache, never downloaded): real KID, clean-fid's "clean" preprocessing.

The defect-inducing control (`--control-defects F`, default 0.5) trains a second diffusion model on
data where a fraction F of the pupils are defective (bleed, irregular, oval, off-centre) and runs the
same sweep with the same (clean) VAE: do the priors pull its samples back to round pupils?

Writes OUT/sweep.json (updated after every point), OUT/images.npz (every point's images as uint8,
key "model|label"), OUT/paired.json and paired.md (paired tests between points: sweep_paired.py), OUT/sweep.md, OUT/strength_sweep.png and
OUT/strength_grid*.png (rows: seeds; columns: prior, strengths 0.1-1, from noise).

    python benchmarks/strength_sweep.py --out runs/sweep          # trains the models; ~70 min on 2 CPU
                                                                  # cores with --ddpm-steps 250, add ~40 with the full T
    python benchmarks/strength_sweep.py --quick --out /tmp/sweep  # a minutes-long smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from sweep_paired import write_paired
from sweep_scoring import Evaluator, heldout_images
from tqdm import tqdm

from pipeline.cli.entry import add_config_args, add_metrics_args, cli_entry, config_from_args
from pipeline.common.config import Config, dump_config
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir, save_figure_atomic, write_text_atomic
from pipeline.common.images import to_uint8

log = logging.getLogger("strength_sweep")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweep-cpu.yaml"
STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
GRID_STRENGTHS = (0.0, 0.1, 0.3, 0.5, 0.7, 1.0)
GRID_SEEDS = 6
QUICK = {"n": 12, "strengths": (0.0, 0.3, 0.7, 1.0), "ddpm_steps": 40,
         "overrides": ["data.synthetic_count=64", "vae.epochs=1", "train.max_steps=10", "train.save_every=10",
                       "train.sample_every=10", "train.log_every=5", "train.stats_every=5"]}


# ------------------------------------------------------------------------------------------ models


def train_models(cfg_path: Path, out: Path, control_defects: float, device: str = "cpu") -> dict[str, Path]:
    """Train the VAE, the diffusion model and (control_defects > 0) the control model under out/models."""
    from pipeline.cli import train_diffusion, train_vae

    models = out / "models"
    common = ["--config", str(cfg_path)]
    paths = {"vae": models / "vae" / "vae.keras", "clean": models / "diffusion"}
    log.info("training the VAE → %s", paths["vae"].parent)
    train_vae.main.__wrapped__([*common, "--out", str(paths["vae"].parent), "--overwrite"])
    log.info("training the diffusion model → %s", paths["clean"])
    train_diffusion.main.__wrapped__([*common, "--out", str(paths["clean"]), "--overwrite", "--device", device])
    if control_defects > 0:
        paths["defects"] = models / "diffusion_defects"
        log.info("training the control model on %.0f%% defective pupils → %s", 100 * control_defects, paths["defects"])
        train_diffusion.main.__wrapped__([*common, "--set", f"data.synthetic_defects={control_defects}", "--out",
                                          str(paths["defects"]), "--overwrite", "--device", device])
    return paths


# ------------------------------------------------------------------------------------------ the sweep


def sweep_points(strengths: tuple[float, ...], steps: int, ddpm_steps: int) -> list[dict]:
    """The generation settings of every point: from-noise baselines first, then VAE strengths."""
    points = [{"mode": "noise", "label": f"noise DDIM {steps}", "sampler": "ddim", "steps": steps, "strength": 1.0}]
    if ddpm_steps > 0:
        points.append({"mode": "noise", "label": f"noise DDPM {ddpm_steps}", "sampler": "ddpm", "steps": ddpm_steps,
                       "strength": 1.0})
    points += [{"mode": "vae", "label": f"VAE s={s:g}", "sampler": "ddim", "steps": steps, "strength": s}
               for s in strengths]
    return points


def run_point(cfg: Config, diffusion: Path, vae: Path, point: dict, n: int, seed: int,
              batch_size: int, device: str = "cpu") -> tuple[np.ndarray, dict]:
    """Generate one point's images; returns them and the generation facts."""
    from pipeline.generate import generate

    g = cfg.generate
    g.n, g.seed, g.batch_size = n, seed, batch_size
    g.sampler, g.steps, g.strength, g.eta = point["sampler"], point["steps"], point["strength"], 0.0
    result = generate(cfg, diffusion, source=point["mode"], vae_path=vae, device=device, progress=False)
    meta = result.metadata
    return result.images, {"t_start": meta["t_start"], "nfe_per_image": meta["nfe_per_image"],
                           "seconds_per_image": meta["timings_s"]["sampling_per_image"]}


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Every point's images ("model|label" → uint8 N×C×H×W), for re-scoring and paired tests later."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def write_grid(path: Path, columns: list[np.ndarray]) -> None:
    """Rows = seeds, columns = the given image sets (first GRID_SEEDS images of each)."""
    from pipeline.common.images import make_grid, write_image

    stacked = np.stack([c[:GRID_SEEDS] for c in columns], axis=1)  # (seeds, columns, C, H, W)
    write_image(path, make_grid(stacked.reshape(-1, *stacked.shape[2:]), ncol=len(columns)))


def plot_sweep(result: dict, path: Path) -> None:
    """Pass rates, bleed, circularity, KID and cost against strength; from-noise points as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pupil_ok_rate", "round pupil, no bleed (95% CI)"), ("pass_rate", "all circularity rules (95% CI)"),
              ("bleed_mean", "mean bleed_fraction"), ("pupil_circularity_mean", "mean pupil circularity"),
              ("kid", f"KID vs held-out ({'Inception' if 'inception' in result['kid_features'] else 'proxy features'})"),
              ("nfe_per_image", "network evaluations per image")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = axes.ravel()
    colours = {"clean": "tab:blue", "defects": "tab:red"}
    for model, rows in result["models"].items():
        colour = colours.get(model, "tab:green")
        vae = [r for r in rows if r["mode"] == "vae"]
        noise = [r for r in rows if r["mode"] == "noise"]
        s = [r["strength"] for r in vae]
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot(s, [r[key] for r in vae], "o-", color=colour, label=f"{model} model: from VAE", markersize=4)
            if key in ("pass_rate", "pupil_ok_rate"):
                ci = np.array([r[key.replace("_rate", "_ci95")] for r in vae])
                ax.fill_between(s, ci[:, 0], ci[:, 1], color=colour, alpha=0.15)
            for r, style in zip(noise, ("--", ":"), strict=False):
                ax.axhline(r[key], color=colour, linestyle=style, linewidth=1.2, label=f"{model} model: {r['label']}")
    for ax, (key, title) in zip(axes, panels, strict=True):
        if key in result["heldout"] and key != "nfe_per_image":
            ax.axhline(result["heldout"][key], color="grey", linewidth=1, label="held-out real images")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("strength (0 = VAE prior, 1 = pure noise)", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(result["title"], fontsize=11)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=80)
    plt.close(fig)


def write_reports(result: dict, out: Path) -> str:
    """sweep.md and strength_sweep.png from a result; returns the Markdown table."""
    table = markdown_table(result)
    write_text_atomic(out / "sweep.md", f"# {result['title']}\n\nKID features: {result['kid_features']}\n\n{table}")
    plot_sweep(result, out / "strength_sweep.png")
    return table


def markdown_table(result: dict) -> str:
    """One row per point and model, the numbers README quotes."""
    lines = ["| model | point | NFE | s/image | round pupil, no bleed [95% CI] | all rules [95% CI] | "
             "mean bleed | pupil circ. | KID (proxy unless noted) | diversity px / feat |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def row(model: str, r: dict) -> str:
        lo, hi = r["pupil_ok_ci95"]
        plo, phi = r["pass_ci95"]
        return (f"| {model} | {r['label']} | {r.get('nfe_per_image', 0)} | {r.get('seconds_per_image', 0):.3g} | "
                f"{r['pupil_ok_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {r['pass_rate']:.3f} [{plo:.3f}, {phi:.3f}] | "
                f"{r['bleed_mean']:.4f} | {r['pupil_circularity_mean']:.3f} | {r['kid']:.4f} ± {r['kid_std']:.4f} | "
                f"{r['diversity_pixel_rms']:.3f} / {r['diversity_feature']:.2f} |")

    lines.append(row("—", result["heldout"]))
    for model, rows in result["models"].items():
        lines += [row(model, r) for r in rows]
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="strength_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sweep", help="output folder (default: runs/sweep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--vae", help="a trained .keras VAE (default: train one at the config's scale)")
    parser.add_argument("--diffusion", help="a trained diffusion run (default: train one)")
    parser.add_argument("--control", help="a diffusion run trained on defective pupils (default: train one)")
    parser.add_argument("--control-defects", type=float, default=0.5,
                        help="fraction of defective pupils in the control's training data; 0 = no control")
    parser.add_argument("--n", type=int, default=200, help="images per point (default 200)")
    parser.add_argument("--strengths", type=lambda s: tuple(float(v) for v in s.split(",")), default=STRENGTHS,
                        help="comma-separated VAE strengths (default 0,0.1,...,1)")
    parser.add_argument("--steps", type=int, default=50, help="respaced DDIM steps (default 50)")
    parser.add_argument("--ddpm-steps", type=int, default=None,
                        help="steps of the from-noise DDPM baseline (default: the model's T; 0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    add_metrics_args(parser, "KID's features")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: leave as is)")
    parser.add_argument("--device", default="cpu", help="where models train and sample: cpu (default), cuda, auto")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (minutes)")
    parser.add_argument("--label", default="clean", help="name of the main model in the results (default: clean)")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="only combine the sweep.json of earlier runs (e.g. main model and control run "
                        "in parallel) into OUT")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite sweep.md and strength_sweep.png from OUT/sweep.json")
    add_config_args(parser, example="generate.steps=25", default_config=str(CONFIG))
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.strengths = QUICK["n"], QUICK["strengths"]
        args.ddpm_steps = QUICK["ddpm_steps"] if args.ddpm_steps is None else args.ddpm_steps
        args.overrides = QUICK["overrides"] + args.overrides
    return args


def _check(args: argparse.Namespace) -> None:
    if args.n < 2:
        raise UserError(f"--n must be >= 2, got {args.n}")
    if not args.strengths or any(not 0.0 <= s <= 1.0 for s in args.strengths):
        raise UserError(f"--strengths must be values in [0, 1], got {args.strengths}")
    if not 0.0 <= args.control_defects <= 1.0:
        raise UserError(f"--control-defects must be in [0, 1], got {args.control_defects}")
    if (args.vae is None) != (args.diffusion is None):
        raise UserError("give both --vae and --diffusion (trained models) or neither (train them here)")
    for name in ("vae", "diffusion", "control"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            raise UserError(f"--{name} {value} not found")
    if args.inception_weights and args.metrics != "inception":
        raise UserError("--inception-weights goes with --metrics inception")
    if args.metrics == "inception":  # before hours of training, not after
        from pipeline.check.inception import find_weights

        find_weights(args.inception_weights)


def sweep_model(cfg: Config, args: argparse.Namespace, diffusion: Path, vae: Path, points: list[dict],
                evaluate: Evaluator, progress: tqdm) -> Iterator[tuple[list[dict], list[np.ndarray], np.ndarray]]:
    """Run one diffusion model's points; after each, yield the rows so far, the grid columns
    (VAE strengths ascending, then from noise) and the point's images."""
    rows, grid, noise_ddim = [], {}, None
    for point in points:
        progress.set_postfix_str(point["label"])
        if point["mode"] == "vae" and point["strength"] == 1.0 and noise_ddim is not None:
            images, facts = noise_ddim  # strength 1 is from-noise, byte for byte (tests/test_generate.py)
        else:
            images, facts = run_point(cfg, diffusion, vae, point, args.n, args.seed, args.batch_size, args.device)
        if point["mode"] == "noise" and point["sampler"] == "ddim":
            noise_ddim = (images, facts)
            grid["noise"] = images[:GRID_SEEDS]
        elif point["mode"] == "vae" and point["strength"] in GRID_STRENGTHS:
            grid[f"VAE s={point['strength']:g}"] = images[:GRID_SEEDS]
        rows.append({**point, **facts, **evaluate(images)})
        progress.update()
        yield rows, [grid[k] for k in sorted(grid, key=_grid_order)], images


def merge(dirs: list[str]) -> dict:
    """One result from the sweep.json of several runs (e.g. main model and control run in parallel)."""
    results = []
    for d in dirs:
        path = Path(d) / "sweep.json"
        if not path.is_file():
            raise UserError(f"cannot merge {d}: {path} not found")
        results.append(json.loads(path.read_text()))
    first = results[0]
    for key in ("n", "seed", "steps", "kid_features"):
        if any(r[key] != first[key] for r in results):
            raise UserError(f"cannot merge sweeps with different {key}: {[r[key] for r in results]}")
    merged = dict(first, models={}, models_used={}, merged_from=[str(d) for d in dirs])
    for r in results:
        if set(r["models"]) & set(merged["models"]):
            raise UserError(f"cannot merge: model name(s) {sorted(set(r['models']) & set(merged['models']))} "
                            "appear twice (use --label)")
        merged["models"].update(r["models"])
        merged["models_used"].update(r["models_used"])
        merged["control_defects"] = max(merged.get("control_defects", 0.0), r.get("control_defects", 0.0))
    return merged


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.replot:
        path = Path(args.out) / "sweep.json"
        if not path.is_file():
            raise UserError(f"nothing to replot: {path} not found")
        print(write_reports(json.loads(path.read_text()), Path(args.out)))
        return 0
    if args.merge:
        result = merge(args.merge)
        out = prepare_out_dir(args.out, args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        for grid in (g for d in args.merge for g in Path(d).glob("strength_grid*.png")):
            shutil.copyfile(grid, out / grid.name)
        write_text_atomic(out / "sweep.json", json.dumps(result, indent=2))
        print(write_reports(result, out))
        return 0
    _check(args)
    cfg = config_from_args(args)
    out = prepare_out_dir(args.out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.yaml"
    write_text_atomic(cfg_path, dump_config(cfg))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.vae is None:
        models = train_models(cfg_path, out, args.control_defects if args.control is None else 0.0, args.device)
        models[args.label] = models.pop("clean")
    else:
        models = {"vae": Path(args.vae), args.label: Path(args.diffusion)}
    if args.control is not None:
        models["defects"] = Path(args.control)
    train_s = time.perf_counter() - t0

    from guided_diffusion.training.checkpoint import load_for_inference

    train_cfg = load_for_inference(models[args.label], ema_rate=None, device="cpu")[1]  # its config only
    ddpm_steps = train_cfg.diffusion.steps if args.ddpm_steps is None else args.ddpm_steps
    heldout = heldout_images(train_cfg, 2 * args.n)  # image i depends on (seed, i) only: the same first n as before
    inception = None
    if args.metrics == "inception":
        from pipeline.check.inception import InceptionFeatures
        from pipeline.common.devices import pick_torch_device

        inception = InceptionFeatures(args.inception_weights, device=pick_torch_device(args.device))
    evaluate = Evaluator(cfg, heldout[: args.n], args.seed, inception)
    heldout_check = heldout[args.n :]  # a second held-out set, scored like a point
    result = {
        "title": f"strength sweep, {train_cfg.data.image_size}px, N={args.n} per point",
        "kid_features": evaluate.feature_kind, "n": args.n, "seed": args.seed, "steps": args.steps,
        "ddpm_steps": ddpm_steps, "control_defects": args.control_defects if "defects" in models else 0.0,
        "models_used": {k: str(v) for k, v in models.items()}, "train_seconds": train_s,
        "heldout": {"label": "held-out real", **evaluate(heldout_check)},
        "models": {}, "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                                   "python": platform.python_version()},
    }
    names = [m for m in models if m != "vae"]
    # DDPM from noise, the costliest point, runs on the main model only: the control's baseline is DDIM.
    plan = {m: sweep_points(tuple(args.strengths), args.steps, ddpm_steps if m == args.label else 0) for m in names}
    progress = tqdm(total=sum(map(len, plan.values())), unit="point", desc="sweep")
    saved = {}
    for model in names:
        for rows, columns, images in sweep_model(cfg, args, models[model], models["vae"], plan[model], evaluate,
                                                 progress):
            result["models"][model] = rows  # saved after every point, so an interrupted sweep keeps its results
            write_text_atomic(out / "sweep.json", json.dumps(result, indent=2))
            write_grid(out / f"strength_grid{'' if model == 'clean' else '_' + model}.png", columns)
            saved[f"{model}|{rows[-1]['label']}"] = to_uint8(images)
            save_npz_atomic(out / "images.npz", saved)
    progress.close()
    result["total_seconds"] = time.perf_counter() - t0
    write_text_atomic(out / "sweep.json", json.dumps(result, indent=2))
    print(write_reports(result, out))
    print(write_paired(out, cfg, inception))
    print(f"wrote {out}/sweep.json, sweep.md, paired.json, paired.md, images.npz, strength_sweep.png, "
          "strength_grid*.png")
    return 0


def _grid_order(label: str) -> tuple[int, float]:
    """Grid columns: VAE strengths ascending, then the from-noise sample."""
    return (1, 0.0) if label == "noise" else (0, float(label.split("=")[1]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
