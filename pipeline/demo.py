"""`iris-demo`: the whole pipeline on built-in synthetic irises, on CPU, with an HTML report.

Trains a tiny VAE and a tiny diffusion model (configs/tiny-cpu.yaml), generates N images from VAE
priors and N from pure noise with the same model and seeds, runs the circularity check on both and
writes `OUT/report.html`. Each stage runs the same code as its console script.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pipeline.cli.entry import add_config_args, cli_entry, config_from_args
from pipeline.common.config import dump_config
from pipeline.common.errors import UserError
from pipeline.common.files import prepare_out_dir, write_text_atomic
from pipeline.report import Section, write_report

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SUMMARY_SEEDS, SUMMARY_TILE = 8, 96  # summary.png: this many seeds, each about this many pixels wide
QUICK = ["data.synthetic_count=128", "vae.epochs=2", "train.max_steps=40", "train.save_every=40",
         "train.sample_every=40", "train.log_every=10", "train.stats_every=20"]


def _run(main, argv: list[str]) -> None:
    """Run a console script's `main` in-process (without its exit-code wrapper)."""
    log.info("$ %s %s", main.__module__, " ".join(argv))
    main.__wrapped__(argv)


def _summary_row(name: str, summary: dict) -> list[object]:
    metrics = summary.get("metrics", {})

    def median(key: str) -> object:
        return metrics.get(key, {}).get("median", "n/a")

    return [name, summary.get("n_analysed", 0), summary.get("pass_rate", float("nan")), median("bleed_fraction"),
            median("pupil_circularity"), median("concentricity")]


def _cell(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown_table(table: list[list[object]]) -> str:
    """The headline table (header row first) as Markdown."""
    lines = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table]
    return "\n".join([lines[0], "|" + "---|" * len(table[0]), *lines[1:]]) + "\n"


def write_summary_figure(out: Path, count: int, size: int, channels: int) -> Path:
    """OUT/summary.png: the first `count` seeds as three rows (prior, VAE-seeded, from noise), enlarged."""
    import numpy as np

    from pipeline.common.images import enlarged_grid, write_png_uint
    from pipeline.data.folders import read_image

    folders = (out / "from_vae" / "priors", out / "from_vae", out / "from_noise")
    images = [read_image(f / f"{i:06d}.png", size, channels) for f in folders for i in range(count)]
    path = out / "summary.png"
    write_png_uint(path, enlarged_grid(np.stack(images), count, SUMMARY_TILE))
    return path


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Console script `iris-demo`."""
    parser = argparse.ArgumentParser(prog="iris-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    parser.add_argument("--n", type=int, default=None, help="images per generation mode (default 32, quick 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--serve", action="store_true",
                        help="serve a local web page (Gradio) generating from the models of an earlier demo in --out")
    parser.add_argument("--port", type=int, default=7860, help="port of --serve (default 7860)")
    add_config_args(parser, default_config=str(CONFIG_DIR / "tiny-cpu.yaml"))
    args = parser.parse_args(argv)
    if args.serve:
        from pipeline.serve import serve

        serve(config_from_args(args), args.out, args.port)
        return 0
    if args.quick:
        args.overrides = QUICK + args.overrides
    cfg = config_from_args(args)
    n = args.n or (8 if args.quick else 32)
    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    out = prepare_out_dir(args.out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    write_text_atomic(config_path, dump_config(cfg))

    from pipeline import generate
    from pipeline.cli import circularity_check as circularity_cli
    from pipeline.cli import train_diffusion, train_vae

    timings: dict[str, float] = {}

    def stage(name: str, main, argv: list[str]) -> None:
        t0 = time.perf_counter()
        _run(main, argv)
        timings[name] = time.perf_counter() - t0

    common = ["--config", str(config_path)]
    stage("train VAE", train_vae.main, [*common, "--out", str(out / "vae"), "--overwrite"])
    stage("train diffusion", train_diffusion.main, [*common, "--out", str(out / "diffusion"), "--overwrite",
                                                    "--device", "cpu"])
    gen_args = ["--diffusion", str(out / "diffusion"), "--n", str(n), "--seed", "0", "--device", "cpu",
                "--overwrite", *common]
    stage("generate from VAE", generate.main,
          ["--from-vae", str(out / "vae" / "vae.keras"), "--save-priors", "--out", str(out / "from_vae"), *gen_args])
    stage("generate from noise", generate.main, ["--from-noise", "--out", str(out / "from_noise"), *gen_args])
    stage("circularity check", circularity_cli.main,
          [str(out / "from_vae"), "--reference", str(out / "from_noise"), "--out", str(out / "check"),
           "--overwrite", "--workers", "1", *common])

    summary_png = write_summary_figure(out, min(n, SUMMARY_SEEDS), cfg.data.image_size, cfg.data.channels)
    comparison = json.loads((out / "check" / "comparison.json").read_text())
    summaries = {"VAE-seeded": comparison["folder"], "from noise": comparison["reference"]}
    meta = json.loads((out / "from_vae" / "metadata.json").read_text())
    header = ["images", "n", "pass rate", "median bleed", "median pupil circularity", "median concentricity"]
    table = [header] + [_summary_row(name, s) for name, s in summaries.items()]
    report = write_report(out / "report.html", "iris-diffusion demo", [
        Section("Same seeds, three ways", "Rows: VAE prior, VAE-seeded result, from noise.",
                figures=[("prior / VAE-seeded / from noise", summary_png)]),
        Section("Samples", f"Left of each pair: VAE prior; right: after diffusion at strength {meta['strength']} "
                f"(t_start {meta['t_start']}, {meta['nfe_per_image']} network evaluations). Below: the same "
                "model and seeds from pure noise.",
                figures=[("prior | VAE-seeded", out / "from_vae" / "grid.png"),
                         ("from noise", out / "from_noise" / "grid.png")]),
        Section("Circularity check", "Pass rate and medians per mode (thresholds: configs/circularity.yaml).",
                table=table, figures=[("metric histograms", out / "check" / "comparison.png"),
                                      ("histograms (VAE-seeded)", out / "check" / "histograms.png"),
                                      ("worst cases", out / "check" / "worst.png")]),
        Section("Training", figures=[("VAE loss", out / "vae" / "loss.png"),
                                     ("diffusion loss", out / "diffusion" / "loss.png")]),
        Section("Timings (s)", table=[["stage", "seconds"], *[[k, v] for k, v in timings.items()]]),
        Section("Config", pre=config_path.read_text()),
    ], subtitle="Built-in synthetic irises, CPU. Tiny models: a smoke test of the pipeline, not its quality.")
    write_text_atomic(out / "headline.md", markdown_table(table))
    widths = [max(len(_cell(r[i])) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(_cell(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"wrote {report} (headline.md, summary.png beside it)")
    return 0
