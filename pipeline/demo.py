"""The demo's outputs: the same-seeds summary picture, the headline table and `report.html`.

`iris-demo` (`pipeline.cli.demo`) runs the stages; this module turns their output folders
(vae/, diffusion/, from_vae/, from_noise/, check/) into what a person looks at.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.common.config import CircularityConfig
from pipeline.common.files import write_text_atomic
from pipeline.report import Section, write_report

log = logging.getLogger(__name__)

SUMMARY_SEEDS, SUMMARY_TILE = 8, 96  # summary.png: this many seeds, each about this many pixels wide


MODES = {"VAE priors": ("from_vae", "priors"), "VAE-seeded": ("from_vae",), "from noise": ("from_noise",)}


def _sample_files(out: Path, parts: tuple[str, ...], count: int) -> list[Path]:
    """The first `count` images of one mode's folder, in the format its `generate` run recorded."""
    from pipeline.common.images import FORMAT_SUFFIXES

    suffix = FORMAT_SUFFIXES[json.loads((out / parts[0] / "metadata.json").read_text())["format"]]
    return [out.joinpath(*parts, f"{i:06d}{suffix}") for i in range(count)]


def _read_mode(out: Path, parts: tuple[str, ...], count: int, size: int, channels: int):
    """The first `count` images of one mode's folder, (N, C, H, W) in [-1, 1]."""
    import numpy as np

    from pipeline.data.folders import read_image

    return np.stack([read_image(path, size, channels) for path in _sample_files(out, parts, count)])


def headline(out: Path, n: int, size: int, channels: int, cfg: CircularityConfig) -> tuple[list[list[object]], dict]:
    """The headline table (header row first) of priors, VAE-seeded and from-noise images, judged by
    circularity-check's rules, and McNemar's paired test of VAE-seeded against from noise on the
    round-pupil rule (the same seeds in both modes)."""
    import numpy as np

    from pipeline.check.analyze import analyze_batch
    from pipeline.check.rules import round_pupil_without_bleed
    from pipeline.check.stats import mcnemar_exact, wilson_interval

    def rate(flags: list[bool]) -> str:
        lo, hi = wilson_interval(sum(flags), len(flags))
        return f"{100 * sum(flags) / len(flags):.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    def median(rows: list[dict], key: str) -> float:
        values = np.array([r[key] for r in rows], np.float64)
        return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")

    table: list[list[object]] = [["images", "n", "round pupil, no bleed [95% CI]", "all rules [95% CI]",
                                  "median bleed", "median pupil circularity"]]
    round_pupil = {}
    for name, parts in MODES.items():
        rows = analyze_batch(_read_mode(out, parts, n, size, channels), cfg)
        round_pupil[name] = [round_pupil_without_bleed(r, cfg) for r in rows]
        table.append([name, n, rate(round_pupil[name]), rate([bool(r["pass"]) for r in rows]),
                      median(rows, "bleed_fraction"), median(rows, "pupil_circularity")])
    return table, mcnemar_exact(round_pupil["VAE-seeded"], round_pupil["from noise"])


def paired_sentence(test: dict) -> str:
    """The paired comparison in words."""
    return (f"VAE-seeded minus from noise, same seeds: {100 * test['difference']:+.1f} points on the round-pupil "
            f"rule ({test['a_only']} seeds pass only VAE-seeded, {test['b_only']} only from noise; "
            f"McNemar exact p = {test['p_value']:.2g})")


def _cell(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown_table(table: list[list[object]]) -> str:
    """The headline table (header row first) as Markdown."""
    lines = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table]
    return "\n".join([lines[0], "|" + "---|" * len(table[0]), *lines[1:]]) + "\n"


def write_summary_figure(out: Path, count: int, size: int, channels: int) -> Path:
    """OUT/summary.png: the first `count` seeds as three rows (prior, VAE-seeded, from noise), enlarged."""
    import numpy as np

    from pipeline.common.images import enlarged_grid, write_image_uint
    from pipeline.data.folders import read_image

    images = [read_image(path, size, channels) for parts in MODES.values() for path in _sample_files(out, parts, count)]
    path = out / "summary.png"
    write_image_uint(path, enlarged_grid(np.stack(images), count, SUMMARY_TILE))
    return path


IDENTITY_MODES = {"VAE-seeded": "identity_from_vae", "from noise": "identity_from_noise"}


def identity_table(out: Path) -> list[list[object]]:
    """Per set (VAE-seeded, from noise, held-out eyes): usable iris codes, the impostor Hamming
    distances between its images (mean ± std, Daugman's degrees of freedom) and, for the generated
    sets, the nearest training eye (minimum HD, near-copies), from identity-check's summaries."""
    rows: list[list[object]] = [["images", "usable codes", "impostor HD mean ± std", "degrees of freedom",
                                 "min HD to a training eye", "near-copies"]]
    summaries = {name: json.loads((out / folder / "summary.json").read_text()) for name, folder in IDENTITY_MODES.items()}
    sets = [(name, s["generated"], s["nearest_training"]) for name, s in summaries.items()]
    sets.append(("held-out eyes", summaries["VAE-seeded"]["reference"], None))
    for name, coded, nearest in sets:
        imp = coded["impostor"] or {}
        spread = f"{imp['mean']:.3f} ± {imp['std']:.3f}" if imp.get("mean") is not None else "—"
        dof = f"{imp['dof']:.0f}" if imp.get("dof") is not None else "—"
        closest = f"{nearest['min_hd']:.3f}" if nearest and nearest["min_hd"] is not None else "—"
        rows.append([name, f"{coded['n_usable']} of {coded['n_images']}", spread, dof, closest,
                     nearest["n_near_copies"] if nearest else "—"])
    return rows


def identity_section(out: Path, image_size: int) -> Section:
    """The report's "Are they new eyes?" section (identity-check's tables and histograms)."""
    threshold = json.loads((out / "identity_from_vae" / "summary.json").read_text())["near_copy_hd"]
    return Section("Are they new eyes?", f"Iris codes (Daugman) of each set and their Hamming distances (HD): between "
                   "different images of one set (impostor pairs; unrelated eyes score about 0.45–0.5 once the best "
                   f"rotation is taken), and from each generated image to its nearest training eye (below {threshold} "
                   f"is a near-copy). At {image_size} px an iris spans few pixels, so neighbouring code bits are "
                   "correlated and the degrees of freedom are low: compare the sets with each other, not with "
                   "published figures.", table=identity_table(out),
                   figures=[(f"{name}: HD histograms", out / folder / "histograms.png") for name, folder in IDENTITY_MODES.items()]
                   + [("closest generated (VAE-seeded) / training pairs", out / "identity_from_vae" / "closest.png")])


def write_demo_report(out: Path, image_size: int, channels: int, n: int, timings: dict[str, float],
                      cfg: CircularityConfig) -> tuple[Path, list[list[object]], str]:
    """OUT/summary.png, OUT/headline.md and OUT/report.html from a finished demo run; returns the
    report's path, the headline table (header row first) and the paired comparison in words."""
    summary_png = write_summary_figure(out, min(n, SUMMARY_SEEDS), image_size, channels)
    config_path = out / "config.yaml"
    meta = json.loads((out / "from_vae" / "metadata.json").read_text())
    table, paired = headline(out, n, image_size, channels, cfg)
    sentence = paired_sentence(paired)
    report = write_report(out / "report.html", "iris-diffusion demo", [
        Section("Same seeds, three ways", "Rows: VAE prior, VAE-seeded result, from noise.",
                figures=[("prior / VAE-seeded / from noise", summary_png)]),
        Section("Samples", f"Left of each pair: VAE prior; right: after diffusion at strength {meta['strength']} "
                f"(t_start {meta['t_start']}, {meta['nfe_per_image']} network evaluations). Below: the same "
                "model and seeds from pure noise.",
                figures=[("prior | VAE-seeded", out / "from_vae" / "grid.png"),
                         ("from noise", out / "from_noise" / "grid.png")]),
        Section("Circularity check", "Round-pupil rule (pupil found, circularity, axis ratio, bleed) and all "
                f"rules per mode, with Wilson 95 % intervals (thresholds: configs/circularity.yaml). {sentence}.",
                table=table, figures=[("metric histograms", out / "check" / "comparison.png"),
                                      ("histograms (VAE-seeded)", out / "check" / "histograms.png"),
                                      ("worst cases", out / "check" / "worst.png")]),
        identity_section(out, image_size),
        Section("Training", figures=[("VAE loss", out / "vae" / "loss.png"),
                                     ("diffusion loss", out / "diffusion" / "loss.png")]),
        Section("Timings (s)", table=[["stage", "seconds"], *[[k, v] for k, v in timings.items()]]),
        Section("Config", pre=config_path.read_text()),
    ], subtitle="Built-in synthetic irises on the CPU, small models trained in minutes: the same seeds "
                 "from VAE priors and from pure noise, judged by circularity-check.")
    write_text_atomic(out / "headline.md", markdown_table(table) + f"\n{sentence}.\n")
    return report, table, sentence


def text_table(table: list[list[object]]) -> str:
    """The headline table as aligned plain text, for the console."""
    widths = [max(len(_cell(r[i])) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(_cell(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in table)
