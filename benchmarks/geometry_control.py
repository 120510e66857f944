"""Geometry control (issue 23): does a geometry VAE give the pupil dilation it is asked for?

A sweep of requested pupil/iris radius ratios (`--sweep A:B`, `--settings K` values, linspace),
`--n` priors per setting, measured by circularity-check's analysis (`pipeline.geometry_targets.measure`).
Every setting decodes the same latents ε and the same other targets (iris radius `--iris-radius`, 0.35
of the side by default; the pupil offset and, with `--iris-radius bank`, the iris radius drawn from the
VAE's training geometry with one seed), so only the requested ratio changes along the sweep.
Reported: per setting the mean and spread of the measured ratio; over the sweep the mean absolute
error (target ≤ 0.03) and the correlation of measured with requested ratios (target ≥ 0.95), and the
round-pupil pass rate (pupil found, round, no bleed) against the unconditional VAE's on as many priors.

With `--diffusion RUN_DIR` the same requests also go through `generate` at the default strength
(generate.strength) and are measured after diffusion; without it the output says that half was not run.
After diffusion is reported open loop and closed loop: `generate` runs with `--feedback K` rounds of
geometry feedback (generate.geometry_feedback, pipeline/geometry_feedback.py: images that miss their
target by more than `--tolerance` are re-made under a corrected condition, same ε and noise), and the
open loop is the first try of every image, bit-identical to `generate.geometry_feedback=0`
(tests/test_geometry_feedback.py), so it costs no second run. Seconds per image: the wall time of the
`generate` calls per image (closed loop), less the time spent in the feedback loop (open loop).

    python benchmarks/geometry_control.py --out docs/geometry --vae runs/vae-geometry/vae.keras \
        --baseline-vae runs/vae/vae.keras [--diffusion runs/diffusion --feedback 2] [--n 200 --settings 9]

Without --vae (or --baseline-vae) the VAE is trained first with configs/vae.yaml (+ vae.condition=geometry)
into OUT/cvae (OUT/vae). Writes OUT/geometry_control.json, OUT/geometry_control.md and OUT/sweep.png
(one row per requested dilation: priors, and after diffusion open and closed loop when run).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import headline, machine_facts, write_result  # noqa: E402

from pipeline.common.config import CircularityConfig, GenerateConfig, load_config  # noqa: E402
from pipeline.geometry_targets import GeometryRequest, control_error, measure, parse_span  # noqa: E402

MAX_MAE, MIN_CORR = 0.03, 0.95
PICTURE_COLUMNS = 8
SEED = 0


def train_vae(out: Path, conditional: bool) -> Path:
    """Train configs/vae.yaml (a geometry VAE when `conditional`) into `out`; returns its vae.keras."""
    from pipeline.data.folders import load_image_array
    from pipeline.data.geometry import load_geometry, mirror
    from vae.train import ConditionSource, train

    cfg = load_config(ROOT / "configs" / "vae.yaml", ["vae.condition=geometry"] if conditional else [])
    source = ConditionSource(partial(load_geometry, cfg.data), mirror) if conditional else None
    train(cfg, partial(load_image_array, cfg.data), out, overwrite=True, verbose=2, conditions=source)
    return out / "vae.keras"


def setting_rows(ratios: np.ndarray, priors: list[np.ndarray], measured: list[list[dict]]) -> list[dict]:
    """Per requested ratio: measured mean, standard deviation and error, share measured, round-pupil rate."""
    rows = []
    for ratio, ms in zip(ratios, measured, strict=True):
        got = np.array([m["pupil_ratio"] for m in ms])
        ok = np.isfinite(got)
        rows.append({"requested": float(ratio), "measured_mean": float(got[ok].mean()) if ok.any() else math.nan,
                     "measured_sd": float(got[ok].std()) if ok.any() else math.nan,
                     "mae": float(np.abs(got[ok] - ratio).mean()) if ok.any() else math.nan,
                     "measured_share": float(ok.mean()), "round_pupil_rate": float(np.mean([m["round_pupil"] for m in ms]))})
    return rows


def sweep_summary(ratios: np.ndarray, targets: list[np.ndarray], measured: list[list[dict]]) -> dict:
    """MAE and correlation over every image of the sweep, round-pupil rate over all of them."""
    all_targets = np.concatenate(targets)
    all_measured = [m for ms in measured for m in ms]
    err = control_error(all_targets, all_measured, "pupil_ratio")
    iris = control_error(all_targets, all_measured, "iris_radius")
    return {"mae": err["mae"], "corr": err["corr"], "measured": err["measured"], "n": err["n"],
            "iris_radius_mae": iris["mae"],
            "round_pupil_rate": float(np.mean([m["round_pupil"] for m in all_measured])),
            "met": bool(err["mae"] <= MAX_MAE and err["corr"] >= MIN_CORR)}


def request(ratio: float, iris_radius: float | None) -> GeometryRequest:
    """The request of one setting: the ratio, the iris radius when fixed (else from the training geometry)."""
    iris = None if iris_radius is None else (iris_radius, iris_radius)
    return GeometryRequest(pupil_ratio=(float(ratio), float(ratio)), iris_radius=iris,
                           source=f"--pupil-ratio {ratio:.3f}" + (f" --iris-radius {iris_radius}" if iris else ""))


def run_priors(vae, ratios: np.ndarray, n: int, iris_radius: float | None) -> tuple[list, list, list]:
    """Priors, targets and measurements of each requested ratio (shared latents and other targets)."""
    from vae.priors import condition_bank, decode_draws, prior_latents

    eps = prior_latents(vae.latent_dim, n, SEED)
    bank = condition_bank(vae)
    priors, targets, measured = [], [], []
    for ratio in ratios:
        t = request(ratio, iris_radius).targets(n, bank, SEED)
        images = decode_draws(vae, eps, conditions=t)
        priors.append(images)
        targets.append(t)
        measured.append(measure(images, CircularityConfig()))
    return priors, targets, measured


def run_diffusion(vae_path: Path, diffusion: Path, ratios: np.ndarray, n: int, device: str,
                  iris_radius: float | None, feedback: int, tolerance: float) -> tuple[dict, list, dict]:
    """`generate` at the default strength with `feedback` rounds for each requested ratio: the open
    loop (first tries) and closed loop (kept tries) halves, the closed-loop images, and facts."""
    from pipeline.generate import generate

    cfg = load_config(None, [f"generate.n={n}", f"generate.seed={SEED}", f"generate.geometry_feedback={feedback}",
                             f"generate.geometry_tolerance={tolerance}"])
    images, targets, facts = [], [], {}
    halves = {"open_loop": {"measured": [], "seconds": 0.0}, "closed_loop": {"measured": [], "seconds": 0.0}}
    tries = []
    for ratio in ratios:
        start = time.perf_counter()
        gen = generate(cfg, diffusion, source="vae", vae_path=vae_path, device=device, progress=False,
                       geometry=request(ratio, iris_radius))
        wall = time.perf_counter() - start
        geometry = gen.metadata["prior"]["geometry"]
        images.append(gen.images)
        targets.append(np.asarray(geometry["targets"], np.float32))
        loop = geometry.get("feedback", {})
        halves["open_loop"]["measured"].append(geometry.get("measured_open_loop", geometry["measured_result"]))
        halves["closed_loop"]["measured"].append(geometry["measured_result"])
        halves["open_loop"]["seconds"] += wall - gen.metadata["timings_s"]["geometry_feedback"]
        halves["closed_loop"]["seconds"] += wall
        tries += [p["tries"] for p in loop.get("per_image", [])] or [1] * n
        facts = {"checkpoint": str(diffusion), "strength": gen.metadata["strength"], "t_start": gen.metadata["t_start"],
                 "sampler": gen.metadata["sampler"], "steps": gen.metadata["steps"],
                 "image_size": int(gen.images.shape[-1]), "resized_priors": gen.metadata["prior"]["resized"],
                 "feedback_rounds": feedback, "feedback_tolerance": tolerance,
                 "feedback_keys": loop.get("keys"), "feedback_bounds": loop.get("bounds"),
                 "open_loop_from": "the first try of every image of the closed-loop run (= generate.geometry_feedback=0)"}
    out = {}
    for name, half in halves.items():
        out[name] = {"settings": setting_rows(ratios, images, half["measured"]),
                     "sweep": sweep_summary(ratios, targets, half["measured"]),
                     "seconds_per_image": half["seconds"] / (n * len(ratios))}
    out["closed_loop"].update(mean_tries=float(np.mean(tries)), extra_passes_per_image=float(np.mean(tries) - 1),
                              images_regenerated=int(np.sum(np.array(tries) > 1)))
    return out, images, facts


def open_loop_images(vae_path: Path, diffusion: Path, ratios: np.ndarray, device: str,
                     iris_radius: float | None) -> list[np.ndarray]:
    """The picture's open-loop images (the first PICTURE_COLUMNS of each setting, no feedback)."""
    from pipeline.generate import generate

    cfg = load_config(None, [f"generate.n={PICTURE_COLUMNS}", f"generate.seed={SEED}", "generate.geometry_feedback=0"])
    return [generate(cfg, diffusion, source="vae", vae_path=vae_path, device=device, progress=False,
                     geometry=request(ratio, iris_radius)).images for ratio in ratios]


def baseline_after_diffusion(base_path: Path, diffusion: Path, n: int, device: str) -> dict:
    """Round-pupil rate of the unconditional VAE's priors after `generate` at the default strength."""
    from pipeline.generate import generate

    cfg = load_config(None, [f"generate.n={n}", f"generate.seed={SEED}"])
    gen = generate(cfg, diffusion, source="vae", vae_path=base_path, device=device, progress=False)
    measured = measure(gen.images, CircularityConfig())
    return {"n": n, "round_pupil_rate": float(np.mean([m["round_pupil"] for m in measured]))}


def picture(path: Path, ratios: np.ndarray, groups: list[tuple[str, list[np.ndarray]]]) -> None:
    """One row per requested ratio: the first PICTURE_COLUMNS images of each group side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.common.files import save_figure_atomic
    from pipeline.common.images import make_grid, to_uint8

    fig = Figure(figsize=(4.0 * len(groups), 0.5 * len(ratios) + 0.5), layout="tight")
    FigureCanvasAgg(fig)
    for ax, (title, images) in zip(np.atleast_1d(fig.subplots(1, len(groups))), groups, strict=True):
        rows = np.concatenate([im[:PICTURE_COLUMNS] for im in images])
        grid = to_uint8(make_grid(rows, ncol=PICTURE_COLUMNS))
        ax.imshow(grid[0] if grid.ndim == 3 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_yticks([(i + 0.5) * grid.shape[-2] / len(ratios) for i in range(len(ratios))])
        ax.set_yticklabels([f"{r:.2f}" for r in ratios])
        ax.set_xticks([])
        ax.set_ylabel("requested pupil/iris ratio")
        ax.set_title(f"{title} ({images[0].shape[-1]} px)")
    save_figure_atomic(fig, path, dpi=90)


def halves(result: dict) -> list[tuple[str, dict]]:
    """(name, {settings, sweep, …}) of the priors and, when run, after diffusion open and closed loop."""
    d = result.get("diffusion")
    if not d:
        return [("priors", result["priors"])]
    return [("priors", result["priors"]), ("after diffusion, open loop", d["open_loop"]),
            (f"after diffusion, closed loop (K={d['feedback_rounds']})", d["closed_loop"])]


def markdown(result: dict) -> str:
    """The README table: one row per requested ratio, then the sweep's summary lines."""
    parts = halves(result)
    head = "| requested ratio | " + " | ".join(f"{name}: measured mean ± sd | MAE" for name, _ in parts) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(parts))]
    for i, ratio in enumerate(result["ratios"]):
        cells = [f"{h['settings'][i]['measured_mean']:.3f} ± {h['settings'][i]['measured_sd']:.3f} | {h['settings'][i]['mae']:.3f}"
                 for _, h in parts]
        lines.append(f"| {ratio:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"- {result['n_per_setting']} priors per setting; iris radius / side: {result['iris_radius']}")
    if result.get("diffusion"):
        d = result["diffusion"]
        lines.append(f"- after diffusion: {d['n_per_setting']} images per setting at {d['image_size']} px, strength "
                     f"{d['strength']}; closed loop: up to {d['feedback_rounds']} rounds, tolerance {d['feedback_tolerance']} "
                     f"on {', '.join(d['feedback_keys'] or [])}; open loop = {d['open_loop_from']}")
    for name, h in parts:
        s = h["sweep"]
        cost = ""
        if "seconds_per_image" in h:
            cost = f", {h['seconds_per_image']:.2f} s/image"
        if "mean_tries" in h:
            cost += f", {h['mean_tries']:.2f} tries/image ({h['images_regenerated']} images regenerated)"
        lines.append(f"- {name}: MAE {s['mae']:.4f} (target ≤ {MAX_MAE}), correlation {s['corr']:.4f} (target ≥ {MIN_CORR}), "
                     f"{s['measured']}/{s['n']} measured, round pupil {100 * s['round_pupil_rate']:.1f} %{cost}: "
                     f"{'met' if s['met'] else 'NOT met'}")
    base = result["baseline"]
    lines.append(f"- unconditional VAE ({base['vae']}): round pupil {100 * base['round_pupil_rate']:.1f} % of {base['n']} priors")
    free = result["unconditional_sampling"]
    lines.append(f"- geometry VAE sampled without targets (training geometry): round pupil "
                 f"{100 * free['round_pupil_rate']:.1f} % of {free['n']} priors")
    if "after_diffusion" in base:
        after = base["after_diffusion"]
        lines.append(f"- unconditional VAE after diffusion: round pupil {100 * after['round_pupil_rate']:.1f} % of {after['n']}")
    if not result.get("diffusion"):
        lines.append("- after diffusion: not run (no --diffusion)")
    return "\n".join(lines) + "\n"


def headlines(result: dict) -> list[dict]:
    """The summary lines: error, correlation and round pupil of each half against its target."""
    out = []
    for name, h in halves(result):
        s = h["sweep"]
        base = result["baseline"] if name == "priors" else result["baseline"]["after_diffusion"]
        out += [headline(f"{name}: |measured − requested| pupil/iris ratio", f"{s['mae']:.4f}", f"≤ {MAX_MAE}",
                         s["mae"] <= MAX_MAE),
                headline(f"{name}: correlation measured vs requested", f"{s['corr']:.4f}", f"≥ {MIN_CORR}",
                         s["corr"] >= MIN_CORR),
                headline(f"{name}: round pupil vs unconditional VAE", f"{100 * s['round_pupil_rate']:.1f} % vs "
                         f"{100 * base['round_pupil_rate']:.1f} %", "not lower", s["round_pupil_not_lower"])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/geometry_control"))
    parser.add_argument("--vae", type=Path, help="a geometry VAE (default: train configs/vae.yaml with vae.condition=geometry)")
    parser.add_argument("--baseline-vae", type=Path, help="the unconditional VAE to compare round pupils with "
                        "(default: train configs/vae.yaml)")
    parser.add_argument("--diffusion", type=Path, help="a diffusion run: also measure after generate at the default strength")
    parser.add_argument("--n", type=int, default=200, help="priors per setting")
    parser.add_argument("--diffusion-n", type=int, help="images per setting after diffusion (default: --n)")
    parser.add_argument("--settings", type=int, default=9, help="requested ratios along the sweep")
    parser.add_argument("--sweep", default="0.25:0.65", help="requested pupil/iris ratios A:B")
    parser.add_argument("--device", default="cpu", help="the diffusion model's device")
    parser.add_argument("--feedback", type=int, default=GenerateConfig.geometry_feedback,
                        help="closed loop after diffusion: rounds of geometry feedback (default: generate's)")
    parser.add_argument("--tolerance", type=float, default=GenerateConfig.geometry_tolerance,
                        help="closed loop: regenerate while |measured − target| exceeds this (default: generate's)")
    parser.add_argument("--iris-radius", default="0.35", help="iris radius / image side of every request (the middle of "
                        "the synthetic set's 0.28–0.42), or 'bank': each image's from the training geometry")
    args = parser.parse_args()
    from vae.priors import load_vae, sample_priors

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    lo, hi = parse_span(args.sweep, "--sweep")
    ratios = np.linspace(lo, hi, args.settings)
    iris_radius = None if args.iris_radius == "bank" else parse_span(args.iris_radius, "--iris-radius")[0]
    vae_path = args.vae or train_vae(args.out / "cvae", conditional=True)
    base_path = args.baseline_vae or train_vae(args.out / "vae", conditional=False)
    vae = load_vae(vae_path)
    priors, targets, measured = run_priors(vae, ratios, args.n, iris_radius)
    result = {"ratios": ratios.tolist(), "n_per_setting": args.n, "vae": str(vae_path),
              "iris_radius": iris_radius if iris_radius is not None else "each image's from the training geometry",
              "priors": {"settings": setting_rows(ratios, priors, measured), "sweep": sweep_summary(ratios, targets, measured)}}
    base_n = args.n * args.settings
    base = measure(sample_priors(load_vae(base_path), base_n, SEED), CircularityConfig())
    result["baseline"] = {"vae": str(base_path), "n": base_n, "round_pupil_rate": float(np.mean([m["round_pupil"] for m in base]))}
    free = measure(sample_priors(vae, base_n, SEED), CircularityConfig())  # no targets: the training geometry
    result["unconditional_sampling"] = {"n": base_n, "round_pupil_rate": float(np.mean([m["round_pupil"] for m in free]))}
    result["priors"]["sweep"]["round_pupil_not_lower"] = result["priors"]["sweep"]["round_pupil_rate"] >= result["baseline"]["round_pupil_rate"]
    groups = [("priors", priors)]
    if args.diffusion:
        dn = args.diffusion_n or args.n
        d, images, facts = run_diffusion(vae_path, args.diffusion, ratios, dn, args.device, iris_radius,
                                         args.feedback, args.tolerance)
        result["diffusion"] = {**facts, "n_per_setting": dn, **d}
        result["baseline"]["after_diffusion"] = baseline_after_diffusion(base_path, args.diffusion, dn * args.settings,
                                                                         args.device)
        for half in ("open_loop", "closed_loop"):
            s = result["diffusion"][half]["sweep"]
            s["round_pupil_not_lower"] = s["round_pupil_rate"] >= result["baseline"]["after_diffusion"]["round_pupil_rate"]
        groups += [("after diffusion, open loop", open_loop_images(vae_path, args.diffusion, ratios, args.device,
                                                                   iris_radius)),
                   (f"closed loop, K={args.feedback}", images)]
    else:
        result["diffusion"] = None
        result["diffusion_note"] = "after-diffusion half not run: no --diffusion given"
    picture(args.out / "sweep.png", ratios, groups)
    result["seconds"] = time.perf_counter() - start
    result["machine"] = machine_facts()
    result["headline"] = headlines(result)
    (args.out / "geometry_control.md").write_text(markdown(result))
    write_result(args.out / "geometry_control.json", result)


if __name__ == "__main__":
    main()
