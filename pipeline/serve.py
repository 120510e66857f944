"""`iris-demo --serve`: a web page generating irises from a trained VAE + diffusion pair, with a
strength slider and each image's circularity verdict.

The models are the user's runs (`--vae FILE --diffusion RUN_DIR`) or a demo folder's
(`run_models`); `find_models` checks both before any server starts. The page uses Gradio when it is
installed (`pip install gradio`, or the `web` extra); `render` is the framework-free part: VAE priors →
diffusion at the chosen strength → circularity check.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common.config import Config
from pipeline.common.devices import pick_torch_device
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

GRADIO_MISSING = "the web demo needs Gradio, which is not installed: pip install gradio (or pip install -e '.[web]')"
TILE = 160  # pixels per image on the page
HEADERS = ["image", "check", "reason", "pupil circularity", "bleed"]


@dataclass(frozen=True)
class ServedModels:
    """A checked VAE file and diffusion run, and what the page says about them."""

    vae: Path
    diffusion: Path  # the run (or checkpoint) folder as given; generate() loads its latest checkpoint
    checkpoint: Path
    image_shape: tuple[int, int, int]  # (C, H, W) of the diffusion model
    vae_shape: tuple[int, int, int]  # (C, H, W) of the VAE's priors
    latent_dim: int
    timesteps: int  # T of the diffusion schedule it was trained with
    steps_trained: int | None  # None when the checkpoint folder's name does not say

    def describe(self) -> list[str]:
        """Markdown lines naming the two models, their image sizes and training."""
        trained = "steps trained unknown" if self.steps_trained is None else f"{self.steps_trained} steps trained"
        lines = [f"- VAE `{self.vae}`: {_size(self.vae_shape)}, latent dim {self.latent_dim}",
                 f"- diffusion `{self.diffusion}` (checkpoint `{self.checkpoint.name}`): {_size(self.image_shape)}, "
                 f"{trained}, T = {self.timesteps}"]
        if self.vae_shape != self.image_shape:
            lines.append(f"- priors are resized from {_size(self.vae_shape)} to {_size(self.image_shape)}")
        return lines


def _size(shape: tuple[int, int, int]) -> str:
    return f"{shape[2]}x{shape[1]} {'grey' if shape[0] == 1 else f'{shape[0]}-channel'}"


def run_models(run_dir: str | Path) -> tuple[Path, Path]:
    """The VAE file and diffusion run of an `iris-demo` output folder; UserError when they are missing."""
    run_dir = Path(run_dir)
    vae, diffusion = run_dir / "vae" / "vae.keras", run_dir / "diffusion"
    if not vae.is_file() or not (diffusion / "checkpoints").is_dir():
        raise UserError(f"{run_dir} holds no trained demo models (vae/vae.keras, diffusion/checkpoints); "
                        f"run 'iris-demo --out {run_dir}' first, or give --vae FILE --diffusion RUN_DIR")
    return vae, diffusion


def find_models(vae: str | Path | None, diffusion: str | Path | None, demo_dir: str | Path) -> ServedModels:
    """Check the VAE file and the diffusion run to serve; either one not given comes from the demo
    folder `demo_dir`. UserError (one line) when a path is missing or is not a VAE / diffusion run."""
    if vae is None and diffusion is None:
        vae, diffusion = run_models(demo_dir)
    vae = Path(vae) if vae is not None else Path(demo_dir) / "vae" / "vae.keras"
    diffusion = Path(diffusion) if diffusion is not None else Path(demo_dir) / "diffusion"
    vae_shape, latent_dim = _check_vae(vae)
    checkpoint, train_cfg = _check_diffusion(diffusion)
    step = checkpoint.name.removeprefix("step_")
    return ServedModels(
        vae=vae, diffusion=diffusion, checkpoint=checkpoint,
        image_shape=(train_cfg.data.channels, train_cfg.data.image_size, train_cfg.data.image_size),
        vae_shape=vae_shape, latent_dim=latent_dim, timesteps=train_cfg.diffusion.steps,
        steps_trained=int(step) if step.isdigit() else None,
    )


def _check_vae(path: Path) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and latent size of the VAE in `path`; UserError when it is missing or no VAE."""
    from vae.priors import load_vae, vae_image_shape

    model = load_vae(path)  # one-line errors: not found, not .keras, corrupt, not a VAE of train-vae
    return vae_image_shape(model), int(model.latent_dim)


def _check_diffusion(path: Path) -> tuple[Path, Config]:
    """The checkpoint of the diffusion run (or checkpoint folder) `path` and its training config."""
    from guided_diffusion.training.checkpoint import read_config, resolve_checkpoint

    if not path.exists():
        raise UserError(f"diffusion run not found: {path}")
    if not path.is_dir():
        raise UserError(f"--diffusion {path} is a file, not a train-diffusion run folder (or one of its "
                        "checkpoints/step_XXXXXXX folders)")
    try:
        checkpoint = resolve_checkpoint(path)
    except UserError as exc:
        raise UserError(f"{path} is not a diffusion run: {exc}") from None
    return checkpoint, read_config(checkpoint)


def pick_device(requested: str) -> str:
    """`auto` → cuda when torch sees a GPU (else mps, else cpu); `cpu`, `cuda`, `cuda:N` as asked.
    UserError when the device asked for is not there."""
    device = str(pick_torch_device(requested))
    if device.startswith("cuda"):
        import torch

        log.info("generating on %s (%s)", device, torch.cuda.get_device_name(torch.device(device)))
    else:
        log.info("generating on %s%s", device, " (no CUDA GPU found)" if requested == "auto" else "")
    return device


def render(cfg: Config, models: ServedModels, strength: float, seed: int, n: int, steps: int,
           device: str = "cpu") -> tuple[np.ndarray, list[list], str]:
    """Generate n images from VAE priors at `strength` on `device`. Returns a uint8 grid (one row per
    image: prior | result, each TILE pixels), one [image, pass|fail, reason, pupil circularity, bleed]
    row per image (HEADERS) and a one-line summary, "k of n pass circularity-check (…)"."""
    from pipeline.check.analyze import analyze_batch
    from pipeline.common.images import enlarged_grid
    from pipeline.generate import generate

    gen = dataclasses.replace(cfg.generate, strength=float(strength), seed=int(seed), n=int(n), steps=int(steps))
    run_cfg = dataclasses.replace(cfg, generate=gen)
    t0 = time.perf_counter()
    result = generate(run_cfg, models.diffusion, source="vae", vae_path=models.vae, device=device, progress=False)
    seconds = time.perf_counter() - t0
    pairs = np.stack([result.priors, result.images], axis=1).reshape(-1, *result.images.shape[1:])
    grid = enlarged_grid(pairs, 2, TILE)
    metrics = analyze_batch(result.images, cfg.circularity)
    rows = [[i, "pass" if m["pass"] else "fail", m["reason"] or "", round(float(m["pupil_circularity"]), 3),
             round(float(m["bleed_fraction"]), 4)] for i, m in enumerate(metrics)]
    passed = sum(row[1] == "pass" for row in rows)
    summary = (f"{passed} of {len(rows)} pass circularity-check (strength {result.metadata['strength']:g}, "
               f"seed {gen.seed}, {gen.steps} steps, {result.metadata['device']}, {seconds:.1f} s)")
    log.info("%s", summary)
    return grid, rows, summary


def build_page(cfg: Config, models: ServedModels, device: str):
    """The Gradio page: models at the top, the settings, a Generate button, the prior | result grid,
    the verdict table and its one-line summary."""
    import gradio as gr

    def on_generate(strength: float, seed: float, n: float, steps: float):
        try:
            return render(cfg, models, strength, int(seed), int(n), int(steps), device=device)
        except UserError as exc:  # a setting the model cannot take: say so on the page
            raise gr.Error(str(exc)) from None

    with gr.Blocks(title="iris-diffusion", analytics_enabled=False) as page:
        gr.Markdown("\n".join([
            "## iris-diffusion: VAE prior → diffusion", *models.describe(), f"- generating on **{device}**", "",
            "Strength 0 keeps the prior, 1 starts from pure noise. Each row of the grid: prior | result.",
        ]), elem_id="models")
        with gr.Row():
            strength = gr.Slider(0.0, 1.0, value=cfg.generate.strength, step=0.05, label="strength",
                                 elem_id="strength")
            seed = gr.Number(value=cfg.generate.seed, precision=0, label="seed", elem_id="seed")
            n = gr.Slider(1, 16, value=4, step=1, label="images", elem_id="images")
            steps = gr.Slider(1, models.timesteps, value=min(cfg.generate.steps, models.timesteps), step=1,
                              label="sampling steps", elem_id="steps")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        image = gr.Image(label="prior | result", type="numpy", elem_id="grid")
        summary = gr.Markdown(elem_id="summary")
        table = gr.Dataframe(headers=HEADERS, label="circularity-check", elem_id="verdicts")
        button.click(on_generate, [strength, seed, n, steps], [image, table, summary])
    return page


def serve(cfg: Config, models: ServedModels, device: str = "cpu", host: str = "127.0.0.1", port: int = 7860,
          share: bool = False) -> None:
    """Serve the page on http://host:port (and a public gradio.live link with `share`) until interrupted."""
    try:
        import gradio  # noqa: F401  (only to fail with one line before building the page)
    except ImportError:
        raise UserError(GRADIO_MISSING) from None
    page = build_page(cfg, models, device)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request Gradio makes to itself
    log.info("serving on http://%s:%d%s (Ctrl+C to stop)", host, port, ", with a public share link" if share else "")
    if host in ("0.0.0.0", "::"):
        log.warning("listening on every interface: anyone who can reach this machine can use the page")
    page.launch(server_name=host, server_port=port, share=share)
