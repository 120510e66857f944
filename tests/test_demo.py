"""iris-demo --quick end to end: every stage runs and the report shows both modes (--serve: test_serve*.py)."""

import json
import re

import numpy as np
import pytest

from pipeline import demo
from pipeline.cli import demo as demo_cli

FAST = ["model.model_channels=16", "model.num_head_channels=16", "train.max_steps=6", "train.save_every=6",
        "train.sample_every=6", "vae.epochs=1", "data.synthetic_count=48"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    with pytest.raises(SystemExit) as exc:
        demo_cli.main(["--quick", "--n", "4", "--out", str(out), *sum((["--set", s] for s in FAST), [])])
    assert exc.value.code == 0
    return out


def test_quick_demo_writes_report(quick_demo, capfd):
    out = quick_demo
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 5
    rows = re.findall(r"<tr><td>(VAE priors|VAE-seeded|from noise)</td><td>(\d+)</td><td>([0-9.]+)% \[", report)
    assert [(name, int(n)) for name, n, _ in rows] == [("VAE priors", 4), ("VAE-seeded", 4), ("from noise", 4)]
    # the round-pupil rates agree with circularity-check's own summaries of the two folders
    comparison = json.loads((out / "check" / "comparison.json").read_text())
    rates = {name: float(rate) / 100 for name, _, rate in rows}
    assert rates["VAE-seeded"] == pytest.approx(comparison["folder"]["round_pupil_rate"])
    assert rates["from noise"] == pytest.approx(comparison["reference"]["round_pupil_rate"])
    headline = (out / "headline.md").read_text().splitlines()
    assert headline[0].startswith("| images | n | round pupil, no bleed") and headline[1].startswith("|---|")
    assert [line.split(" | ")[0] for line in headline[2:5]] == ["| VAE priors", "| VAE-seeded", "| from noise"]
    assert "McNemar exact p =" in headline[-1]
    for path in ("vae/vae.keras", "diffusion/config.yaml", "from_vae/grid.png", "from_noise/metadata.json",
                 "check/comparison.json", "identity_from_vae/closest.png", "identity_from_noise/nearest.csv"):
        assert (out / path).exists(), path


def test_quick_demo_reports_identity_from_identity_checks_summaries(quick_demo):
    out = quick_demo
    report = (out / "report.html").read_text()
    assert "Are they new eyes?" in report
    table = demo.identity_table(out)
    assert [row[0] for row in table[1:]] == ["VAE-seeded", "from noise", "held-out eyes"]
    vae = json.loads((out / "identity_from_vae" / "summary.json").read_text())
    assert table[1][1] == f"{vae['generated']['n_usable']} of 4"
    assert vae["nearest_training"]["n_training"] > 0 and vae["reference"]["n_images"] == 4
    for row in table[1:]:  # every row of the table is in the page
        assert f"<td>{row[0]}</td><td>{row[1]}</td>" in report


def test_summary_figure_stacks_prior_result_and_noise_rows(quick_demo):
    import cv2

    summary = cv2.imread(str(quick_demo / "summary.png"), cv2.IMREAD_GRAYSCALE)
    scale = demo.SUMMARY_TILE // 32
    assert summary.shape == (scale * (3 * 34 + 2), scale * (4 * 34 + 2))  # 3 rows × 4 seeds of 32 px, 2 px gaps
    prior = cv2.imread(str(quick_demo / "from_vae" / "priors" / "000001.png"), cv2.IMREAD_GRAYSCALE)
    noise = cv2.imread(str(quick_demo / "from_noise" / "000001.png"), cv2.IMREAD_GRAYSCALE)
    tile = lambda r, c: summary[scale * (2 + 34 * r) : scale * (34 + 34 * r) : scale,  # noqa: E731
                                scale * (2 + 34 * c) : scale * (34 + 34 * c) : scale]
    np.testing.assert_array_equal(tile(0, 1), prior)
    np.testing.assert_array_equal(tile(2, 1), noise)


def test_demo_refuses_existing_out(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    with pytest.raises(SystemExit) as exc:
        demo_cli.main(["--quick", "--out", str(tmp_path / "demo")])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
