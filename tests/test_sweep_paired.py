"""benchmarks/sweep_paired.py: which points it compares, and a paired report on images whose
difference is known (round irises against the same irises under heavy noise)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep_paired as paired  # noqa: E402

from pipeline.common.config import dump_config, load_config  # noqa: E402
from pipeline.common.images import to_uint8  # noqa: E402


def _row(label: str, mode: str, strength: float, sampler: str = "ddim") -> dict:
    return {"label": label, "mode": mode, "strength": strength, "sampler": sampler}


def _result(models: list[str]) -> dict:
    rows = [_row("noise DDIM 50", "noise", 1.0), _row("noise DDPM 1000", "noise", 1.0, "ddpm"),
            _row("VAE s=0", "vae", 0.0), _row("VAE s=0.5", "vae", 0.5), _row("VAE s=1", "vae", 1.0)]
    return {"title": "t", "n": 8, "seed": 0, "steps": 50, "kid_features": "proxy features",
            "models": {m: rows for m in models}}


def test_comparisons_pair_strengths_with_noise_neighbours_and_the_control():
    result = _result(["clean", "defects"])
    have = {f"{m}|{r['label']}" for m in ("clean", "defects") for r in result["models"][m]}
    pairs = paired.comparisons(result, have)
    assert ("clean|VAE s=0", "clean|noise DDIM 50") in pairs
    assert ("clean|noise DDPM 1000", "clean|noise DDIM 50") in pairs
    assert ("clean|VAE s=0", "clean|VAE s=0.5") in pairs  # neighbours
    assert ("clean|VAE s=0.5", "defects|VAE s=0.5") in pairs  # main vs control at one point
    assert ("clean|VAE s=1", "clean|noise DDIM 50") not in pairs  # the same images
    assert ("clean|VAE s=0", "defects|VAE s=0") not in pairs  # the same priors
    assert all("s=1" not in a + b for a, b in pairs)
    missing = paired.comparisons(result, have - {"defects|VAE s=0.5"})
    assert ("clean|VAE s=0.5", "defects|VAE s=0.5") not in missing


def test_report_finds_a_known_difference_and_not_a_null_one(tmp_path):
    from pipeline.data.synthetic import generate_irises

    cfg = load_config(None, ["data.image_size=32"])
    n = 24
    clean, _ = generate_irises(n, 32, 7, 1)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.9, clean.shape), -1, 1)
    result = _result(["clean"])
    result["n"] = n
    result["models"]["clean"] = [_row("noise DDIM 50", "noise", 1.0), _row("VAE s=0.3", "vae", 0.3),
                                 _row("VAE s=0.6", "vae", 0.6)]
    (tmp_path / "sweep.json").write_text(json.dumps(result))
    np.savez(tmp_path / "images.npz", **{"clean|noise DDIM 50": to_uint8(noisy), "clean|VAE s=0.3": to_uint8(clean),
                                         "clean|VAE s=0.6": to_uint8(clean)})
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    with pytest.raises(SystemExit) as exc:
        paired.main([str(tmp_path)])
    assert exc.value.code == 0
    report = json.loads((tmp_path / "paired.json").read_text())
    tests = {(c["a"], c["b"]): {t["test"]: t for t in c["tests"]} for c in report["comparisons"]}
    vs_noise = tests[("clean|VAE s=0.3", "clean|noise DDIM 50")]
    assert vs_noise["pass"]["a"] > 0.6 and vs_noise["pass"]["b"] < 0.2 and vs_noise["pass"]["significant"]
    assert vs_noise["kid"]["estimate"] < 0 and vs_noise["kid"]["ci95"][1] < 0 and vs_noise["kid"]["p_value"] < 0.05
    same = tests[("clean|VAE s=0.3", "clean|VAE s=0.6")]  # identical images: nothing to find
    assert not any(t["significant"] for t in same.values()) and same["kid"]["estimate"] == pytest.approx(0, abs=1e-12)
    assert report["tests_in_family"] == 4 * len(report["comparisons"])
    assert "**p=" in (tmp_path / "paired.md").read_text()


def test_missing_inputs_are_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        paired.main([str(tmp_path)])
    assert exc.value.code == 2 and "config.yaml not found" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(dump_config(load_config(None)))
    with pytest.raises(SystemExit) as exc:
        paired.main([str(tmp_path)])
    assert exc.value.code == 2 and "sweep.json not found" in capsys.readouterr().err
    assert not (tmp_path / "paired.json").exists()


def test_features_must_match_the_sweeps(tmp_path, capsys):
    result = _result(["clean"])
    result["kid_features"] = "inception-v3 (clean-fid)"
    (tmp_path / "sweep.json").write_text(json.dumps(result))
    np.savez(tmp_path / "images.npz", **{"clean|VAE s=0": np.zeros((8, 1, 32, 32), np.uint8)})
    (tmp_path / "config.yaml").write_text(dump_config(load_config(None)))
    with pytest.raises(SystemExit) as exc:
        paired.main([str(tmp_path)])
    assert exc.value.code == 2 and "--inception-weights" in capsys.readouterr().err
