"""`export`: a trained diffusion run as a diffusers folder (`DDPMPipeline`: unet/ + scheduler/ +
model_index.json) with a model card (README.md).

The settings and weight names come from `pipeline.diffusers_map`; diffusers builds and saves the
models itself (`DDPMPipeline.save_pretrained`), so the folder is exactly what it loads. Before
anything is written the converted U-Net is run beside ours on one random input, and the
scheduler's betas are checked against ours. The folder is built in a temp folder and renamed
when complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common.config import Config
from pipeline.common.errors import UserError
from pipeline.common.files import building, prepare_out_dir
from pipeline.diffusers_map import scheduler_config, unet_config, unet_state_dict
from pipeline.model_card import model_card

DIFFUSERS_MISSING = "export needs diffusers: pip install -e '.[export]'"
OUTPUT_TOLERANCE = 1e-3  # max |ours − diffusers| on the check input, relative to max(1, |ours|)


def require_diffusers() -> None:
    """UserError with the install command when diffusers is not installed."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise UserError(DIFFUSERS_MISSING) from None


def diffusers_unet(model: torch.nn.Module, cfg: Config):
    """Our U-Net (weights and all) as a diffusers `UNet2DModel` in eval mode; UserError naming a
    setting diffusers cannot express."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet_config(cfg))
    unet.load_state_dict(unet_state_dict(model.state_dict(), cfg), strict=True)
    return unet.eval()


def diffusers_scheduler(cfg: Config, clip_sample: bool):
    """The run's process as a `DDPMScheduler`, its betas checked against ours (diffusers keeps them
    in float32) and checked to load as a `DDIMScheduler` too."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from guided_diffusion.schedules import get_betas

    scheduler = DDPMScheduler(**scheduler_config(cfg, clip_sample))
    ours = get_betas(cfg.diffusion.noise_schedule, cfg.diffusion.steps)
    theirs = scheduler.betas.double().numpy()
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-6, atol=0.0):
        raise UserError(f"this diffusers' {cfg.diffusion.noise_schedule} betas differ from ours "
                        f"(max relative {np.max(np.abs(theirs / ours - 1)):.2g}); nothing written")
    DDIMScheduler.from_config(scheduler.config)
    return scheduler


@torch.no_grad()
def output_difference(model: torch.nn.Module, unet, cfg: Config) -> float:
    """Max |ours − diffusers| over one random image at t = 0 and t = T − 1 (fp32, CPU, fixed seed)."""
    size, channels = cfg.data.image_size, cfg.data.channels
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, cfg.diffusion.steps - 1])
    with torch.compiler.set_stance("force_eager"):  # one forward: not worth compiling (model.compile)
        ours = model(x, t).float()
    diff = float((ours - unet(x, t).sample).abs().max())
    if not diff <= OUTPUT_TOLERANCE * max(1.0, float(ours.abs().max())):
        raise UserError(f"the converted U-Net's output differs from the checkpoint's by {diff:.3g} "
                        "(a conversion bug; nothing written)")
    return diff


def train_dataset(checkpoint: Path) -> dict | None:
    """The dataset record a checkpoint's state.pt keeps (path, count, …), or None if it has none.
    Memory-mapped, so an optimizer state of gigabytes is not read."""
    try:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a missing or unreadable state.pt only loses the dataset line of the card
        return None
    dataset = state.get("dataset") if isinstance(state, dict) else None
    return dataset if isinstance(dataset, dict) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def read_evaluation(eval_dir: str | Path, weights_sha256: str) -> dict:
    """What `circularity-check` measured on images `generate` made from these weights.

    `eval_dir`: a generate output folder (its check read from `<DIR>_circularity/` beside it,
    circularity-check's default) or that check folder itself. The images' metadata.json must name
    weights with `weights_sha256`. KID comes from comparison.json (circularity-check --reference):
    Inception features if it has them, else the project's proxy features, labelled as such.
    """
    eval_dir = Path(eval_dir)
    if (eval_dir / "summary.json").is_file():
        check_dir = eval_dir
        summary = _read_json(check_dir / "summary.json")
        images_dir = Path(summary.get("folder", ""))
    else:
        images_dir, check_dir = eval_dir, eval_dir.parent / f"{eval_dir.resolve().name}_circularity"
        if not (check_dir / "summary.json").is_file():
            raise UserError(f"--eval {eval_dir}: no circularity-check summary.json in it or in {check_dir} "
                            f"(run: circularity-check {eval_dir})")
        summary = _read_json(check_dir / "summary.json")
    if not (images_dir / "metadata.json").is_file():
        raise UserError(f"--eval {eval_dir}: no generate metadata.json in {images_dir}, so which weights made "
                        "the images is unknown")
    meta = _read_json(images_dir / "metadata.json")
    made_by = meta.get("diffusion_checkpoint", {})
    if made_by.get("sha256") != weights_sha256:
        raise UserError(f"--eval {eval_dir}: its images were generated from {made_by.get('weights', '?')} of "
                        f"{made_by.get('checkpoint', '?')}, not from the weights being exported")
    measured = ("pass_rate", "n_pass", "n_analysed", "round_pupil_rate")
    if not all(key in summary for key in measured):
        raise UserError(f"--eval {eval_dir}: {check_dir / 'summary.json'} is not a circularity-check summary")
    evaluation = {key: summary[key] for key in measured}
    evaluation.update({key: meta.get(key) for key in ("source", "strength", "sampler", "steps")})
    evaluation["seed"] = meta.get("seeds", {}).get("seed")
    evaluation["kid"] = None
    if (check_dir / "comparison.json").is_file():
        comparison = _read_json(check_dir / "comparison.json")
        dist, reference = comparison.get("distances", {}), comparison.get("reference", {}).get("folder", "?")
        for prefix, features in (("", "Inception-v3 features"),
                                 ("proxy_", "the project's proxy features, not Inception: not comparable with published KIDs")):
            if f"{prefix}kid_mean" in dist:
                evaluation.update(kid=dist[f"{prefix}kid_mean"], kid_std=dist[f"{prefix}kid_std"],
                                  kid_features=features, reference=Path(reference).name)
                break
    return evaluation


@dataclass
class Export:
    """What `export_run` wrote and checked."""

    out: Path
    info: dict  # load_for_inference's: checkpoint, step, weights, ema_rate, sha256
    max_abs_difference: float
    evaluation: dict | None


def export_run(run_dir: str | Path, out: str | Path, *, ema_rate: float | None = None, clip_sample: bool = True,
               eval_dir: str | Path | None = None, overwrite: bool = False) -> Export:
    """Write the run's U-Net (`ema_rate`: None = the slowest EMA saved, 0 = raw weights) and schedule
    as a diffusers folder `out` with README.md. Every check (existing output, settings diffusers
    cannot express, betas, outputs, the evaluation's weights) fails before anything is written."""
    require_diffusers()
    from diffusers import DDPMPipeline

    from guided_diffusion.training.checkpoint import load_for_inference

    out = prepare_out_dir(out, overwrite)
    model, cfg, info = load_for_inference(run_dir, ema_rate=ema_rate, device="cpu")
    unet_config(cfg)  # a setting diffusers cannot express fails here, before the slow parts
    scheduler = diffusers_scheduler(cfg, clip_sample)
    evaluation = read_evaluation(eval_dir, info["sha256"]) if eval_dir is not None else None
    unet = diffusers_unet(model, cfg)
    diff = output_difference(model, unet, cfg)
    card = model_card(cfg, info, dict(scheduler.config), train_dataset(Path(info["checkpoint"])), evaluation,
                      checked=diff, where=out.name)
    with building(out.resolve()) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
    return Export(out=out, info=info, max_abs_difference=diff, evaluation=evaluation)
