"""benchmarks/strength_sweep.py: its statistics against independent computations, its errors, and
(slow) a quick end-to-end sweep whose rows must agree with each other."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import strength_sweep as sweep  # noqa: E402
import sweep_scoring as scoring  # noqa: E402

Z = 1.959964


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (37, 200), (190, 200)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    lo, hi = scoring.wilson_interval(k, n)
    p = k / n
    assert 0.0 <= lo <= p <= hi <= 1.0
    for bound in (lo, hi):  # a Wilson bound p0 satisfies (p - p0)² = z² p0 (1 - p0) / n
        if 1e-9 < bound < 1.0 - 1e-9:
            assert (p - bound) ** 2 == pytest.approx(Z * Z * bound * (1 - bound) / n, rel=1e-9, abs=1e-12)
    if k == 0:  # closed forms at zero and at all successes
        assert lo == 0.0 and hi == pytest.approx(Z * Z / (n + Z * Z))
    if k == n:
        assert lo == pytest.approx(n / (n + Z * Z)) and hi == pytest.approx(1.0)


def test_mean_pairwise_distance_matches_brute_force():
    x = np.random.default_rng(1).normal(size=(9, 2, 3, 3))
    flat = x.reshape(9, -1)
    brute = np.mean([np.linalg.norm(flat[i] - flat[j]) for i in range(9) for j in range(i + 1, 9)])
    assert scoring.mean_pairwise_distance(x) == pytest.approx(brute, rel=1e-9)
    assert scoring.mean_pairwise_distance(np.repeat(x[:1], 4, axis=0)) == pytest.approx(0.0, abs=1e-6)


def test_points_put_the_noise_baselines_first():
    points = sweep.sweep_points((0.0, 0.5), steps=20, ddpm_steps=100)
    assert [(p["mode"], p["sampler"], p["steps"], p["strength"]) for p in points] == [
        ("noise", "ddim", 20, 1.0), ("noise", "ddpm", 100, 1.0), ("vae", "ddim", 20, 0.0), ("vae", "ddim", 20, 0.5)]
    assert [p["mode"] for p in sweep.sweep_points((0.3,), 20, 0)] == ["noise", "vae"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--strengths", "0.2,1.5"], "--strengths"),
    (["--n", "1"], "--n"),
    (["--vae", "x.keras"], "both --vae and --diffusion"),
    (["--vae", "x.keras", "--diffusion", "nowhere"], "not found"),
    (["--control-defects", "2"], "--control-defects"),
    (["--replot"], "nothing to replot"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--out", str(tmp_path / "sweep"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_quick_sweep_rows_agree(tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--quick", "--out", str(out)])
    assert exc.value.code == 0
    result = json.loads((out / "sweep.json").read_text())
    for model, rows in result["models"].items():
        by_label = {r["label"]: r for r in rows}
        noise, full = by_label["noise DDIM 50"], by_label["VAE s=1"]
        for key in ("pass_rate", "bleed_mean", "kid", "diversity_pixel_rms"):  # strength 1 is from-noise exactly
            assert full[key] == noise[key], (model, key)
        assert by_label["VAE s=0"]["nfe_per_image"] == 0
        for r in rows:
            lo, hi = r["pass_ci95"]
            assert lo <= r["pass_rate"] <= hi and r["n"] == 12 and math.isfinite(r["kid"])
    for name in ("sweep.md", "strength_sweep.png", "strength_grid.png", "strength_grid_defects.png"):
        assert (out / name).is_file(), name


def _row(label: str, mode: str, strength: float, rate: float) -> dict:
    return {"label": label, "mode": mode, "strength": strength, "sampler": "ddim", "steps": 20, "n": 10,
            "nfe_per_image": round(20 * strength), "seconds_per_image": 0.1, "pass_rate": rate,
            "pass_ci95": list(scoring.wilson_interval(round(10 * rate), 10)), "pupil_ok_rate": rate,
            "pupil_ok_ci95": list(scoring.wilson_interval(round(10 * rate), 10)), "bleed_mean": 0.01,
            "pupil_circularity_mean": 0.9, "kid": 0.1, "kid_std": 0.01, "diversity_pixel_rms": 0.3,
            "diversity_feature": 3.0, "reasons": {}}


def _write_sweep(folder: Path, model: str, n: int = 10) -> None:
    folder.mkdir()
    rows = [_row("noise", "noise", 1.0, 0.2), _row("VAE s=0.5", "vae", 0.5, 0.8)]
    result = {"title": "t", "kid_features": "proxy", "n": n, "seed": 0, "steps": 20, "ddpm_steps": 0,
              "control_defects": 0.5 if model == "defects" else 0.0, "models_used": {model: str(folder)},
              "heldout": _row("held-out real", "real", 0.0, 1.0), "models": {model: rows}}
    (folder / "sweep.json").write_text(json.dumps(result))
    (folder / f"strength_grid{'' if model == 'clean' else '_' + model}.png").write_bytes(b"png")


def test_merge_combines_parallel_runs(tmp_path, capsys):
    _write_sweep(tmp_path / "a", "clean")
    _write_sweep(tmp_path / "b", "defects")
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    assert exc.value.code == 0
    merged = json.loads((tmp_path / "m" / "sweep.json").read_text())
    assert list(merged["models"]) == ["clean", "defects"] and merged["control_defects"] == 0.5
    for name in ("sweep.md", "strength_sweep.png", "strength_grid.png", "strength_grid_defects.png"):
        assert (tmp_path / "m" / name).is_file(), name
    table = (tmp_path / "m" / "sweep.md").read_text()
    assert table.count("| clean |") == 2 and table.count("| defects |") == 2
    _write_sweep(tmp_path / "c", "clean", n=20)
    for dirs, message in (([tmp_path / "a", tmp_path / "a"], "appear twice"), ([tmp_path / "a", tmp_path / "c"], "different n")):
        with pytest.raises(SystemExit) as exc:
            sweep.main(["--merge", *map(str, dirs), "--out", str(tmp_path / "m2")])
        assert exc.value.code == 2 and message in capsys.readouterr().err
