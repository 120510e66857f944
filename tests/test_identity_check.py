"""`identity-check`: near-copies of training eyes, impostor statistics, unusable images, exit codes."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.check.folder import read_image
from pipeline.cli.identity_check import main
from pipeline.data.prepared import write_cache
from pipeline.data.synthetic import generate_irises, write_dataset
from pipeline.identity import impostor_groups

REPO = Path(__file__).resolve().parents[1]
COPIED = "000003.png"  # the training image copied into the generated folder


def _run(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def eyes(tmp_path_factory) -> dict[str, Path]:
    """train: 16 synthetic eyes; gen: 12 others, a copy of train/000003.png, a 96 px eye, a blank
    image and a corrupt file; real: 12 more."""
    root = tmp_path_factory.mktemp("identity")
    train = write_dataset(root / "train", 16, 128, seed=1)
    gen = write_dataset(root / "gen", 12, 128, seed=2)
    real = write_dataset(root / "real", 12, 128, seed=3)
    shutil.copy(train / COPIED, gen / "copy.png")
    small, _ = generate_irises(1, 96, seed=4)
    cv2.imwrite(str(gen / "small.png"), np.round((small[0, 0] + 1) * 127.5).astype(np.uint8))
    cv2.imwrite(str(gen / "blank.png"), np.full((128, 128), 128, np.uint8))
    (gen / "broken.png").write_bytes(b"\x89PNG not really")
    return {"root": root, "train": train, "gen": gen, "real": real}


@pytest.fixture(scope="module")
def report(eyes) -> Path:
    """One full run, inline: generated vs training, with the reference."""
    out = eyes["root"] / "report"
    assert _run([eyes["gen"], "--train", eyes["train"], "--reference", eyes["real"], "--out", out,
                 "--workers", 1]) == 0
    return out


def test_a_copied_training_eye_is_a_near_copy_and_others_are_not(report):
    nearest = _csv(report / "nearest.csv")
    assert len(nearest) == 14  # 12 + copy + small usable; blank and broken not
    first, rest = nearest[0], nearest[1:]
    assert (first["file"], first["train_file"], first["near_copy"]) == ("copy.png", COPIED, "True")
    assert float(first["raw_hd"]) == 0.0 and abs(float(first["hd"])) < 0.1  # rescaled: a little below 0
    assert all(r["near_copy"] == "False" and float(r["hd"]) > 0.32 for r in rest)
    near = json.loads((report / "summary.json").read_text())["nearest_training"]
    assert near["n_near_copies"] == 1 and near["near_copy_share"] == pytest.approx(1 / 14)
    assert near["min_hd"] == pytest.approx(float(first["hd"])) and near["closest"][0]["file"] == "copy.png"
    assert (report / "histograms.png").stat().st_size > 0 and (report / "closest.png").stat().st_size > 0


def test_impostor_means_of_different_eyes(report):
    summary = json.loads((report / "summary.json").read_text())
    for label in ("generated", "reference"):
        impostor = summary[label]["impostor"]
        assert 0.4 <= impostor["mean"] <= 0.55, label
        assert impostor["n_below_near_copy_hd"] == 0 and impostor["all_pairs"]
    assert summary["generated"]["impostor"]["n_pairs"] == 14 * 13 // 2


def test_summary_equals_a_recomputation_from_pairs_csv(report):
    summary = json.loads((report / "summary.json").read_text())
    pairs = _csv(report / "pairs.csv")
    ref_bits = np.array([int(p["bits"]) for p in pairs if p["set"] == "reference"])  # the reference sets the scale
    assert summary["hd"] == "rescaled" and summary["typical_bits"] == pytest.approx(np.median(ref_bits))
    for label in ("generated", "reference"):
        rows = [p for p in pairs if p["set"] == label]
        raw, bits = (np.array([float(p[k]) for p in rows]) for k in ("raw_hd", "bits"))
        hd = 0.5 - (0.5 - raw) * np.sqrt(bits / summary["typical_bits"])  # Daugman's rescaling
        np.testing.assert_allclose([float(p["hd"]) for p in rows], hd, rtol=1e-5)
        p, sigma = hd.mean(), hd.std()
        stats = summary[label]["impostor"]
        assert stats["n_pairs"] == len(rows)
        assert (stats["mean"], stats["std"], stats["min"]) == pytest.approx((p, sigma, hd.min()), rel=1e-4)
        assert stats["dof"] == pytest.approx(p * (1 - p) / sigma**2, rel=1e-3)


def test_unusable_images_are_rows_with_reasons(report):
    codes = {(r["set"], r["file"]): r for r in _csv(report / "codes.csv")}
    assert len(codes) == 16 + 16 + 12
    assert (codes["generated", "blank.png"]["usable"], codes["generated", "blank.png"]["reason"]) == ("False", "no pupil")
    assert (codes["generated", "broken.png"]["usable"], codes["generated", "broken.png"]["reason"]) == ("False", "unreadable")
    assert codes["generated", "copy.png"]["usable_bits"] == codes["train", COPIED]["usable_bits"]
    summary = json.loads((report / "summary.json").read_text())
    gen = summary["generated"]
    assert gen["n_images"] == 16 and gen["n_usable"] == 14
    assert gen["unusable"] == {"unreadable": 1, "no pupil": 1, "no iris boundary": 0, "too little iris visible": 0}
    assert gen["sizes"] == {"128x128": 14, "96x96": 1}
    assert len(summary["notes"]) == 1 and "2 sizes" in summary["notes"][0]


def test_two_workers_give_the_same_summary(eyes, report, capsys):
    out = eyes["root"] / "two"
    assert _run([eyes["gen"], "--train", eyes["train"], "--reference", eyes["real"], "--out", out,
                 "--workers", 2]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/" in printed and "degrees of freedom" in printed and "near-copies" in printed

    def stable(path: Path) -> dict:
        summary = json.loads((path / "summary.json").read_text())
        for key in ("seconds", "images_per_second", "workers", "config"):
            summary.pop(key)
        return summary

    assert stable(out) == stable(report)
    for name in ("codes.csv", "pairs.csv", "nearest.csv"):
        assert (out / name).read_text() == (report / name).read_text()


def test_impostor_pairs_are_sampled_with_the_seed():
    assert [g.tolist() for g in impostor_groups(5, 10, 0)] == [[0, 1, 2, 3, 4]]
    for n, max_pairs in ((30, 50), (30, 10), (100, 1000)):
        groups = impostor_groups(n, max_pairs, seed=7)
        pairs = {(a, b) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]}
        assert len(pairs) <= max_pairs and all(a < b for a, b in pairs)
        if max_pairs >= n:  # every image is in some pair
            assert {i for p in pairs for i in p} == set(range(n))
        assert [g.tolist() for g in impostor_groups(n, max_pairs, seed=7)] == [g.tolist() for g in groups]
    pairs_of_two = impostor_groups(30, 10, 0)  # fewer pairs than images: disjoint pairs
    assert len(pairs_of_two) == 10 and all(len(g) == 2 for g in pairs_of_two)
    assert len({int(i) for g in pairs_of_two for i in g}) == 20


def test_max_pairs_samples_and_raw_hds(eyes, tmp_path):
    out = tmp_path / "sampled"
    assert _run([eyes["gen"], "--out", out, "--set", "identity.max_pairs=20", "--set", "identity.rescale=false",
                 "--workers", 1]) == 0
    summary = json.loads((out / "summary.json").read_text())
    impostor = summary["generated"]["impostor"]
    assert not impostor["all_pairs"] and 0 < impostor["n_pairs"] <= 20
    assert summary["hd"] == "raw" and summary["typical_bits"] is None and summary["nearest_training"] is None
    rows = _csv(out / "pairs.csv")
    assert len(rows) == impostor["n_pairs"] and all(r["hd"] == r["raw_hd"] for r in rows)
    assert not (out / "nearest.csv").exists() and (out / "closest.png").is_file()


def test_a_prepare_data_cache_as_training_set(eyes, tmp_path):
    names = sorted(p.name for p in eyes["train"].glob("*.png"))
    images = np.stack([read_image(eyes["train"] / n)[None] for n in names])
    cache_dir = tmp_path / "prepared"
    cache_dir.mkdir()
    write_cache(cache_dir / "dataset.npz", images, [{"file": f"images/{n}"} for n in names], {})
    for train in (cache_dir / "dataset.npz", cache_dir):
        out = tmp_path / f"vs_{train.name}"
        assert _run([eyes["gen"], "--train", train, "--out", out, "--workers", 1]) == 0
        first = _csv(out / "nearest.csv")[0]
        assert (first["file"], first["train_file"], first["near_copy"]) == ("copy.png", f"images/{COPIED}", "True")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["train"]["kind"] == "cache" and summary["train"]["n_usable"] == 16


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_usage_errors_exit_2_with_one_line_and_nothing_written(eyes, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    blanks = tmp_path / "blanks"
    blanks.mkdir()
    for i in range(2):
        cv2.imwrite(str(blanks / f"{i}.png"), np.full((64, 64), 100, np.uint8))
    existing = tmp_path / "existing"
    existing.mkdir()
    out = tmp_path / "out"
    cases = [
        ([tmp_path / "missing", "--out", out], "generated images not found"),
        ([eyes["gen"], "--train", tmp_path / "missing", "--out", out], "training images not found"),
        ([empty, "--out", out], "no images in"),
        ([blanks, "--out", out], "no usable iris in the 2 image(s)"),
        ([eyes["gen"], "--train", blanks, "--out", out], "no usable iris"),
        ([eyes["gen"], "--out", existing], "already exists"),
        ([eyes["gen"], "--out", out, "--set", "identity.max_shift=200"], "identity.max_shift"),
        ([eyes["gen"], "--out", out, "--set", "identity.nearcopy=0.3"], "unknown config key 'identity.nearcopy'"),
    ]
    for argv, message in cases:
        assert _run([*argv, "--workers", 1]) == 2, argv
        assert message in _error(capsys), argv
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["blanks", "empty", "existing"]


def test_runs_as_a_module(eyes, tmp_path):
    """`python -m`: the help, and a run whose worker pool's fork server imports the module as __main__."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.identity_check", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: identity-check ")
    assert "--train" in done.stdout and "--reference" in done.stdout
    out = tmp_path / "as_module"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.identity_check", eyes["real"], "--out", out,
                           "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}/" in done.stdout and json.loads((out / "summary.json").read_text())["workers"] == 2
    assert 'identity-check = "pipeline.cli.identity_check:main"' in (REPO / "pyproject.toml").read_text()
