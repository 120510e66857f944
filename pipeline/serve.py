"""`iris-demo --serve`: a local web page to generate irises from a demo run with a strength slider.

The page uses Gradio when it is installed (`pip install gradio`, or the `web` extra); `render` is the
framework-free part: VAE priors → diffusion at the chosen strength → circularity check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.common.config import Config
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

GRADIO_MISSING = "the web demo needs Gradio, which is not installed: pip install gradio (or pip install -e '.[web]')"
TILE = 160  # pixels per image on the page


def run_models(run_dir: str | Path) -> tuple[Path, Path]:
    """The VAE file and diffusion run of an `iris-demo` output folder; UserError when they are missing."""
    run_dir = Path(run_dir)
    vae, diffusion = run_dir / "vae" / "vae.keras", run_dir / "diffusion"
    if not vae.is_file() or not (diffusion / "checkpoints").is_dir():
        raise UserError(f"{run_dir} holds no trained demo models (vae/vae.keras, diffusion/checkpoints); "
                        f"run 'iris-demo --out {run_dir}' first")
    return vae, diffusion


def render(cfg: Config, run_dir: str | Path, strength: float, seed: int, n: int, steps: int) -> tuple[np.ndarray, list[list]]:
    """Generate n images from VAE priors at `strength`; returns a uint8 grid (one row per image:
    prior | result, each TILE pixels) and one [image, pass, reason, pupil circularity, bleed] row per image."""
    from pipeline.check.analyze import analyze_batch
    from pipeline.common.images import enlarged_grid
    from pipeline.generate import generate

    vae, diffusion = run_models(run_dir)
    g = cfg.generate
    g.strength, g.seed, g.n, g.steps = float(strength), int(seed), int(n), int(steps)
    result = generate(cfg, diffusion, source="vae", vae_path=vae, device="cpu", progress=False)
    pairs = np.stack([result.priors, result.images], axis=1).reshape(-1, *result.images.shape[1:])
    grid = enlarged_grid(pairs, 2, TILE)
    rows = [[i, "pass" if m["pass"] else "fail", m["reason"] or "", round(float(m["pupil_circularity"]), 3),
             round(float(m["bleed_fraction"]), 4)] for i, m in enumerate(analyze_batch(result.images, cfg.circularity))]
    return grid, rows


def serve(cfg: Config, run_dir: str | Path, port: int) -> None:
    """Serve the strength-slider page on http://127.0.0.1:port until interrupted."""
    run_models(run_dir)  # fail before starting a server
    try:
        import gradio as gr
    except ImportError:
        raise UserError(GRADIO_MISSING) from None

    def on_generate(strength: float, seed: float, n: float, steps: float):
        return render(cfg, run_dir, strength, int(seed), int(n), int(steps))

    with gr.Blocks(title="iris-diffusion") as page:
        gr.Markdown(f"## iris-diffusion: VAE prior → diffusion\nModels from `{run_dir}`. Strength 0 keeps "
                    "the prior, 1 starts from pure noise. Each row: prior | result.")
        with gr.Row():
            strength = gr.Slider(0.0, 1.0, value=cfg.generate.strength, step=0.05, label="strength")
            seed = gr.Number(value=cfg.generate.seed, precision=0, label="seed")
            n = gr.Slider(1, 16, value=4, step=1, label="images")
            steps = gr.Slider(5, 100, value=cfg.generate.steps, step=5, label="DDIM steps")
        button = gr.Button("Generate")
        image = gr.Image(label="prior | result", type="numpy")
        table = gr.Dataframe(headers=["image", "check", "reason", "pupil circularity", "bleed"])
        button.click(on_generate, [strength, seed, n, steps], [image, table])
    log.info("serving on http://127.0.0.1:%d (Ctrl+C to stop)", port)
    page.launch(server_name="127.0.0.1", server_port=port)
