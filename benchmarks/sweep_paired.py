"""Paired tests between the points of a strength sweep: which differences are significant at 5 %?

Every point of a sweep draws image i from seed i (the same VAE prior, the same diffusion noise), so
two points are paired image by image, and so are the main and the control model at one point. For
each comparison A vs B:
  * round pupil without bleed, and all circularity rules: McNemar's exact test (discordant pairs);
  * KID against the held-out images, and mean bleed_fraction: a paired bootstrap (pairs drawn
    together, 10,000 resamples) with its 95 % interval;
then Holm's adjustment over every test in the file; "significant" means Holm-adjusted p < 0.05.
Comparisons: each VAE strength against from-noise DDIM of the same model, neighbouring strengths,
DDPM against DDIM from noise, and the main against the control model at each shared point (but
s = 0, the same priors for both).

It scores the images the sweep saved (OUT/images.npz, uint8: what PNGs hold) again, so its rates
can differ by an image or two from sweep.json's, which were scored before rounding; it shows its own.

    python benchmarks/sweep_paired.py runs/sweep      # writes runs/sweep/paired.json and paired.md
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from sweep_scoring import Evaluator, heldout_images

from pipeline.cli.entry import cli_entry
from pipeline.common.config import Config, load_config
from pipeline.common.errors import UserError
from pipeline.common.files import write_text_atomic
from pipeline.common.images import from_uint, to_uint8

log = logging.getLogger("sweep_paired")
RESAMPLES = 10_000


def load_points(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """sweep.json and the saved images ("model|label" → float (N, C, H, W) in [-1, 1])."""
    for name in ("sweep.json", "images.npz"):
        if not (out / name).is_file():
            raise UserError(f"{out / name} not found: run benchmarks/strength_sweep.py --out {out} first")
    result = json.loads((out / "sweep.json").read_text())
    with np.load(out / "images.npz") as saved:
        images = {key: from_uint(saved[key]) for key in saved.files}
    return result, images


def comparisons(result: dict, have: set[str]) -> list[tuple[str, str]]:
    """The (A, B) keys to compare, among the points that were saved."""
    pairs = []
    for model, rows in result["models"].items():
        key = {r["label"]: f"{model}|{r['label']}" for r in rows}
        noise = key.get(f"noise DDIM {result['steps']}")
        vae = sorted((r for r in rows if r["mode"] == "vae" and r["strength"] < 1.0), key=lambda r: r["strength"])
        vae_keys = [key[r["label"]] for r in vae]
        if noise:
            pairs += [(k, noise) for k in vae_keys]  # strength 1 is the DDIM sample itself: no test
            pairs += [(key[r["label"]], noise) for r in rows if r["mode"] == "noise" and r["sampler"] == "ddpm"]
        pairs += list(zip(vae_keys, vae_keys[1:], strict=False))
    models = list(result["models"])
    if len(models) > 1:
        labels = [r["label"] for r in result["models"][models[0]]]
        same_images = ("VAE s=0", "VAE s=1")  # the priors themselves; s=1 repeats DDIM from noise
        pairs += [(f"{models[0]}|{label}", f"{other}|{label}") for other in models[1:] for label in labels
                  if label not in same_images]
    return [(a, b) for a, b in pairs if a in have and b in have]


def compare(a: dict, b: dict, ref_features: np.ndarray, seed: int) -> list[dict]:
    """The four paired tests of A vs B (each a dict with name, values, estimate/interval, p)."""
    from pipeline.check.metrics import mmd2_to_reference
    from pipeline.check.stats import mcnemar_exact, mean_difference, paired_bootstrap

    tests = []
    for name in ("pupil_ok", "pass"):
        m = mcnemar_exact(a[name], b[name])
        tests.append({"test": name, "method": "McNemar exact", "a": float(a[name].mean()), "b": float(b[name].mean()),
                      "estimate": m["difference"], "a_only": m["a_only"], "b_only": m["b_only"], "p_value": m["p_value"]})
    kid_a, kid_b = mmd2_to_reference(a["features"], ref_features), mmd2_to_reference(b["features"], ref_features)
    boot = paired_bootstrap(lambda c: kid_a(c) - kid_b(c), len(a["pass"]), RESAMPLES, seed)
    tests.append({"test": "kid", "method": "paired bootstrap", "a": float(kid_a(np.ones(len(a["pass"])))[0]),
                  "b": float(kid_b(np.ones(len(b["pass"])))[0]), **boot})
    boot = paired_bootstrap(mean_difference(a["bleed"], b["bleed"]), len(a["pass"]), RESAMPLES, seed)
    tests.append({"test": "bleed", "method": "paired bootstrap", "a": float(np.nanmean(a["bleed"])),
                  "b": float(np.nanmean(b["bleed"])), **boot})
    return tests


def paired_report(result: dict, images: dict[str, np.ndarray], cfg: Config, inception=None) -> dict:
    """Score every saved point, run every comparison, adjust the p-values (Holm)."""
    from pipeline.check.stats import holm_adjust

    n, seed = result["n"], result["seed"]
    heldout = from_uint(to_uint8(heldout_images(cfg, n)))  # the sweep's KID reference, rounded like the points
    evaluate = Evaluator(cfg, heldout, seed, inception)
    pairs = comparisons(result, set(images))
    scored = {key: evaluate.per_image(images[key]) for key in sorted({k for pair in pairs for k in pair})}
    rows = [{"a": a, "b": b, "tests": compare(scored[a], scored[b], evaluate.heldout_features, seed)}
            for a, b in pairs]
    flat = [t for r in rows for t in r["tests"]]
    for t, p in zip(flat, holm_adjust([t["p_value"] for t in flat]), strict=True):
        t["p_holm"], t["significant"] = p, p < 0.05
    return {"title": result["title"], "n": n, "seed": seed, "kid_features": evaluate.feature_kind,
            "resamples": RESAMPLES, "tests_in_family": len(flat), "comparisons": rows}


def markdown(report: dict) -> str:
    """One row per comparison: A and B values, the difference and its p (Holm-adjusted)."""
    lines = [f"Paired tests, N = {report['n']} pairs per comparison (same seeds), {report['tests_in_family']} tests; "
             "p is Holm-adjusted over all of them, **bold** = significant at 5 %. Round pupil and all rules: "
             f"McNemar exact; KID ({report['kid_features'].split(' (')[0]}) and bleed: paired bootstrap, "
             f"{report['resamples']} resamples, 95 % interval of A − B.", "",
             "| A | B | round pupil A / B (p) | all rules A / B (p) | KID A − B [95 %] (p) | bleed A − B [95 %] (p) |",
             "|---|---|---|---|---|---|"]

    def p(t: dict) -> str:
        text = f"p={t['p_holm']:.2g}"
        return f"**{text}**" if t["significant"] else text

    for row in report["comparisons"]:
        rate = {t["test"]: t for t in row["tests"]}
        cells = [f"{rate[k]['a']:.3f} / {rate[k]['b']:.3f} ({p(rate[k])})" for k in ("pupil_ok", "pass")]
        cells += [f"{rate[k]['estimate']:+.4f} [{rate[k]['ci95'][0]:+.4f}, {rate[k]['ci95'][1]:+.4f}] ({p(rate[k])})"
                  for k in ("kid", "bleed")]
        lines.append(f"| {row['a']} | {row['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_paired(out: Path, cfg: Config, inception=None) -> str:
    """paired.json and paired.md in `out` from its sweep.json and images.npz (KID on `inception`'s
    features, a `pipeline.check.inception.InceptionFeatures`, when the sweep used them); returns the table."""
    result, images = load_points(out)
    if ("inception" in result["kid_features"]) != (inception is not None):
        raise UserError(f"the sweep's KID used {result['kid_features']}: give the same features "
                        "(--inception-weights PATH for an Inception sweep, none for a proxy one)")
    report = paired_report(result, images, cfg, inception)
    write_text_atomic(out / "paired.json", json.dumps(report, indent=2))
    table = markdown(report)
    write_text_atomic(out / "paired.md", f"# {report['title']}: paired tests\n\n{table}")
    return table


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sweep_paired", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a sweep's output folder (sweep.json, images.npz)")
    parser.add_argument("--config", help="the sweep's config (default: OUT/config.yaml): the held-out images' "
                        "seed and size, circularity thresholds")
    parser.add_argument("--inception-weights", metavar="PATH", help="clean-fid's Inception weights, when the sweep "
                        "ran with --metrics inception (default: proxy features)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    config = Path(args.config) if args.config else out / "config.yaml"
    if not config.is_file():
        raise UserError(f"{config} not found: give the sweep's config with --config")
    inception = None
    if args.inception_weights:
        from pipeline.check.inception import InceptionFeatures

        inception = InceptionFeatures(args.inception_weights)
    print(write_paired(out, load_config(config), inception))
    print(f"wrote {out}/paired.json, paired.md")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
