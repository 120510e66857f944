"""The model card (README.md) of an exported diffusers folder: what the model makes, how it was
trained, what was measured (or "not measured"), its licence, intended use, limits and how to load
it. Only numbers handed in are printed; nothing is estimated here."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.common.config import Config, config_to_dict

NOT_MEASURED = "not measured"
FRONT_MATTER = {
    "license": "gpl-2.0",
    "library_name": "diffusers",
    "pipeline_tag": "unconditional-image-generation",
    "tags": ["diffusers", "unconditional-image-generation", "iris", "biometrics", "synthetic-data"],
}


def describe_dataset(cfg: Config, dataset: dict | None) -> str:
    """One sentence on the training images: the checkpoint's dataset record, else the config."""
    path = (dataset or {}).get("path", cfg.data.path)
    count = (dataset or {}).get("count")
    if path == "synthetic":
        count = cfg.data.synthetic_count if count is None else count
        defects = f", {cfg.data.synthetic_defects:.0%} of them with a labelled pupil defect" if cfg.data.synthetic_defects else ""
        return (f"{count} synthetic near-infrared eyes drawn by the project's procedural generator "
                f"(`pipeline/data/synthetic.py`, seed {cfg.data.seed}{defects}); no real eye was used")
    counted = f"{count} images" if count is not None else "the number of images was not recorded"
    kind = "a `prepare-data` cache of iris-centred crops" if (dataset or {}).get("cache") else "an image folder"
    return f"{kind} named `{Path(str(path)).name}` ({counted}), not distributed with this model"


def _evaluation_lines(evaluation: dict | None) -> list[str]:
    if evaluation is None:
        return [f"- circularity-check pass rate: {NOT_MEASURED}", f"- KID: {NOT_MEASURED}"]
    e = evaluation
    source = {"vae": "from VAE priors", "images": "from prior images", "noise": "from noise"}.get(e["source"], e["source"])
    strength = f" at strength {e['strength']}" if e["source"] != "noise" else ""
    lines = [f"- circularity-check pass rate: {100 * e['pass_rate']:.1f} % ({e['n_pass']} of {e['n_analysed']} images); "
             f"round pupil without bleed: {100 * e['round_pupil_rate']:.1f} %. The images: made by `generate` "
             f"{source}{strength}, {e['sampler']} {e['steps']} steps, seed {e['seed']}."]
    if e.get("kid") is None:
        lines.append(f"- KID: {NOT_MEASURED}")
    else:
        lines.append(f"- KID: {e['kid']:.4g} ± {e['kid_std']:.2g} ({e['kid_features']}) against `{e['reference']}`")
    if e["source"] != "noise":
        lines.append("- These figures are for the two-stage pipeline (a shape prior noised, then denoised), not for "
                     "sampling from pure noise as `DDPMPipeline` does.")
    return lines


def _loading(where: str, channels: int, size: int, steps: int, learn_sigma: bool) -> str:
    """The loading snippet: DDPMPipeline as is, and the project's way (DDIM, x̂_0 clipped)."""
    output = (f"unet(x, t).sample[:, :{channels}]  # the mean part (the rest is the variance)" if learn_sigma
              else "unet(x, t).sample")
    return f"""```python
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

pipe = DDPMPipeline.from_pretrained("{where}")  # ancestral sampling over the whole schedule
images = pipe(batch_size=4, num_inference_steps={steps}).images  # PIL images

# deterministic DDIM in 50 steps, as the project samples (x0 clipped, the noise re-derived from it)
unet = UNet2DModel.from_pretrained("{where}", subfolder="unet").eval()
scheduler = DDIMScheduler.from_pretrained("{where}", subfolder="scheduler")
scheduler.set_timesteps(50)
x = torch.randn(4, {channels}, {size}, {size}, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in scheduler.timesteps:
        out = {output}
        x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
images = (x.clamp(-1, 1) + 1) / 2  # (4, {channels}, {size}, {size}) in [0, 1]
```"""


def model_card(cfg: Config, info: dict, scheduler: dict, dataset: dict | None, evaluation: dict | None,
               checked: float, where: str) -> str:
    """The README.md text. `info`: load_for_inference's (step, weights, ema_rate, sha256, checkpoint);
    `scheduler`: the exported scheduler settings; `dataset`: the checkpoint's dataset record;
    `evaluation`: `pipeline.export.read_evaluation`'s result or None; `checked`: the max |Δ| of the
    converted U-Net's output; `where`: the folder name the loading snippet uses."""
    d, m = cfg.data, cfg.model
    colour = "grey (1 channel)" if d.channels == 1 else f"{d.channels}-channel"
    weights = f"EMA {info['ema_rate']}" if info["ema_rate"] else "raw (no EMA)"
    sections = yaml.safe_dump({k: config_to_dict(cfg)[k] for k in ("model", "diffusion", "train")}, sort_keys=False)
    learned = ("The U-Net also predicts the variance (learned range): `DDPMScheduler` uses it; DDIM takes "
               f"only the first {d.channels} output channel(s), as above. ") if m.learn_sigma else ""
    return "\n".join([
        "---", yaml.safe_dump(FRONT_MATTER, sort_keys=False).rstrip(), "---", "",
        f"# iris-diffusion: {d.image_size}x{d.image_size} near-infrared iris U-Net", "",
        f"An unconditional diffusion model that generates {d.image_size}x{d.image_size} {colour} "
        "near-infrared (NIR) images of an eye centred on the iris: pupil, iris texture (crypts, "
        "furrows, collarette), sclera, lids. Pixels are in [-1, 1]. It is the texture stage of the "
        "iris-diffusion project (an ADM U-Net written from the DDPM, Improved DDPM and ADM papers), "
        "converted to diffusers' `UNet2DModel` and `DDPMScheduler`. Checked at export: on a random input "
        f"at t = 0 and t = {cfg.diffusion.steps - 1}, the converted U-Net's output differs from the "
        f"original's by at most {checked:.2g} (float32).", "",
        "## Training", "",
        f"- Data: {describe_dataset(cfg, dataset)}.",
        f"- Steps trained: {info['step']} optimizer steps of batch {cfg.train.batch_size}.",
        f"- Weights: {weights}, from checkpoint `{Path(info['checkpoint']).name}` "
        f"(`{info['weights']}`, sha256 `{info['sha256']}`).",
        f"- Schedule: {cfg.diffusion.noise_schedule}, T = {cfg.diffusion.steps}; predicts "
        f"{scheduler['prediction_type']}; variance {scheduler['variance_type']}.", "",
        "Configuration (the project's `model`, `diffusion` and `train` sections):", "",
        "```yaml", sections.rstrip(), "```", "",
        "## Evaluation", "",
        *_evaluation_lines(evaluation), "",
        "The pass rate is the share of images whose pupil and iris pass the project's `circularity-check` "
        "rules (round, concentric, separated, no dark pupil bleeding into the iris).", "",
        "## Use", "",
        _loading(where, d.channels, d.image_size, cfg.diffusion.steps, m.learn_sigma), "",
        f"{learned}With `num_inference_steps` N, the schedulers' default \"leading\" spacing takes "
        "t = 0, T/N, 2T/N, …: the project's `ddimN` respacing when N divides T. The project's `generate "
        "--steps N` spreads its N steps over [0, T-1] with both ends instead, which `DDIMScheduler` cannot "
        "take (its step assumes the constant stride T//N), and it draws its noise from per-image seeds, so "
        "the same seed does not give the same image in both.", "",
        "## Intended use and limits", "",
        "- For research on iris recognition and iris image quality: synthetic test data, data augmentation, "
        "checking segmentation and quality tools. The generated eyes are not photographs of anyone.",
        "- Not for identity spoofing, presentation attacks, or passing a generated eye off as a real "
        "person's. A model trained on real captures can still reproduce training irises: check new "
        "images against the training set (the project's `identity-check`) before sharing them.",
        "- Known failure modes: from pure noise the pupil is often not round (oval or irregular outlines), "
        "dark pupil pixels bleed into the iris, and the limbus can be off-centre or faint. The project's "
        "first stage, a VAE shape prior noised part-way and then denoised (SDEdit), exists to fix this "
        "and is not part of this export.",
        f"- {d.image_size} px holds far less iris texture than a camera capture (200-300 px across the iris); "
        "figures such as iris-code statistics do not carry over to full-size images.", "",
        "## Licence", "",
        "GPL-2.0 (GPL-2.0-only), as the iris-diffusion code it was trained with.", "",
    ])
