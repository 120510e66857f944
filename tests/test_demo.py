"""iris-demo --quick end to end: every stage runs and the report shows both modes."""

import re

import pytest

from pipeline import demo

FAST = ["model.model_channels=16", "model.num_head_channels=16", "train.max_steps=6", "train.save_every=6",
        "train.sample_every=6", "vae.epochs=1", "data.synthetic_count=48"]


def test_quick_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exc:
        demo.main(["--quick", "--n", "4", "--out", str(out), *sum((["--set", s] for s in FAST), [])])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "VAE-seeded" in printed and "from noise" in printed and str(out / "report.html") in printed
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4
    rows = re.findall(r"<tr><td>(VAE-seeded|from noise)</td><td>(\d+)</td><td>([0-9.]+)</td>", report)
    assert [(name, int(n)) for name, n, _ in rows] == [("VAE-seeded", 4), ("from noise", 4)]
    assert all(0.0 <= float(rate) <= 1.0 for _, _, rate in rows)
    for path in ("vae/vae.keras", "diffusion/config.yaml", "from_vae/grid.png", "from_noise/metadata.json",
                 "check/comparison.json"):
        assert (out / path).exists(), path


def test_demo_refuses_existing_out(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    with pytest.raises(SystemExit) as exc:
        demo.main(["--quick", "--out", str(tmp_path / "demo")])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
