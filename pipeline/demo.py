"""The demo's outputs: the same-seeds summary picture, the headline table and `report.html`.

`iris-demo` (`pipeline.cli.demo`) runs the stages; this module turns their output folders
(vae/, diffusion/, from_vae/, from_noise/, check/) into what a person looks at.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.common.files import write_text_atomic
from pipeline.report import Section, write_report

log = logging.getLogger(__name__)

SUMMARY_SEEDS, SUMMARY_TILE = 8, 96  # summary.png: this many seeds, each about this many pixels wide


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


def write_demo_report(out: Path, image_size: int, channels: int, n: int,
                      timings: dict[str, float]) -> tuple[Path, list[list[object]]]:
    """OUT/summary.png, OUT/headline.md and OUT/report.html from a finished demo run; returns the
    report's path and the headline table (header row first)."""
    summary_png = write_summary_figure(out, min(n, SUMMARY_SEEDS), image_size, channels)
    config_path = out / "config.yaml"
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
    return report, table


def text_table(table: list[list[object]]) -> str:
    """The headline table as aligned plain text, for the console."""
    widths = [max(len(_cell(r[i])) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(_cell(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in table)
