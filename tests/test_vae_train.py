"""`train-vae`: end-to-end tiny runs, resume, --sample, CLI errors, torch backend, GPU sharing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli.train_vae import main
from pipeline.common.config import load_config
from pipeline.common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY_SETS = [
    "data.image_size=32", "data.synthetic_count=40", "vae.latent_dim=6", "vae.base_channels=4",
    "vae.channel_mult=[1, 2]", "vae.batch_size=8", "vae.val_fraction=0.2", "vae.kl_warmup_epochs=0",
    "vae.lr=0.003",
]


def _args(*sets: str) -> list[str]:
    return [a for s in (*TINY_SETS, *sets) for a in ("--set", s)]


def _log_rows(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def _exit_code(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    # Progress bars may precede the error on stderr; the error itself must be the last, single line.
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    return exc.value.code, lines[-1] if lines else ""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny 2-epoch run, then resumed to 3 epochs (shared by the tests below)."""
    run = tmp_path_factory.mktemp("train") / "run"
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(run), *_args("vae.epochs=2")])
    assert exc.value.code == 0
    (run / "first_rows.json").write_text(json.dumps(_log_rows(run)))
    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(run), "--set", "vae.epochs=3"])
    assert exc.value.code == 0
    return run


def test_training_writes_the_run_folder(run_dir):
    for name in ("vae.keras", "last.keras", "log.csv", "loss.png", "config.yaml"):
        assert (run_dir / name).stat().st_size > 0, name
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"epoch_00{i}.png" for i in range(3)]
    assert not list(run_dir.glob(".tmp-*")) and not list(run_dir.glob(".*.tmp"))  # no temp file left behind
    from pipeline.common.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    assert cfg.data.image_size == 32 and cfg.vae.epochs == 3


def test_resume_continues_at_the_next_epoch(run_dir):
    first = json.loads((run_dir / "first_rows.json").read_text())
    rows = _log_rows(run_dir)
    assert [r["epoch"] for r in first] == ["0", "1"]
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[:2] == first  # history kept, not retrained
    import keras

    from vae.priors import load_vae

    assert int(keras.ops.convert_to_numpy(load_vae(run_dir / "last.keras").trained_epochs)) == 3


def test_training_lowers_the_loss(run_dir):
    rows = _log_rows(run_dir)
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("recon", "kl", "val_elbo"))
    assert float(rows[-1]["kl"]) > 0.1  # the posterior carries information (no collapse)


def test_the_saved_vae_carries_a_fitted_prior(run_dir):
    import keras

    from vae.priors import load_vae

    scale = keras.ops.convert_to_numpy(load_vae(run_dir / "vae.keras").prior_scale)
    assert np.allclose(scale, np.tril(scale)) and not np.allclose(scale, np.eye(6), atol=1e-3)


def test_sample_cli_writes_priors(run_dir, tmp_path, capsys):
    out = tmp_path / "priors"
    code, _ = _exit_code(["--sample", "5", "--from", str(run_dir / "vae.keras"), "--out", str(out),
                          "--seed", "3", "--temperature", "0.8"], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["grid.png"]
    code, err = _exit_code(["--sample", "5", "--from", str(run_dir / "vae.keras"), "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err
    code, _ = _exit_code(["--sample", "2", "--from", str(run_dir / "vae.keras"), "--out", str(out),
                          "--overwrite"], capsys)
    assert code == 0 and len(list(out.iterdir())) == 3


@pytest.mark.parametrize(("extra", "message"), [
    (["--sample", "0"], "must be positive"),
    (["--sample", "3", "--temperature", "0"], "temperature must be positive"),
    (["--sample", "3", "--set", "data.image_size=64"], "data.image_size"),
    (["--sample", "3", "--config", "{run}/config.yaml", "--set", "vae.latent_dim=9"], "latent_dim"),
])
def test_sample_cli_errors(run_dir, tmp_path, capsys, extra, message):
    argv = ["--from", str(run_dir / "vae.keras"), "--out", str(tmp_path / "p"), *extra]
    code, err = _exit_code([a.replace("{run}", str(run_dir)) for a in argv], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "p").exists()


def test_cli_errors_exit_2(run_dir, tmp_path, capsys):
    cases = [
        (["--sample", "3", "--from", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "o")], "not found"),
        (["--sample", "3", "--out", str(tmp_path / "o")], "--from"),
        (["--out", str(run_dir), *_args()], "already exists"),
        (["--resume", str(tmp_path / "nothing")], "nothing to resume"),
        (["--resume", str(run_dir), "--set", "vae.epochs=3"], "already trained 3"),
        (["--resume", str(run_dir), "--set", "vae.epochs=9", "--set", "vae.latent_dim=7"], "latent_dim"),
        (["--resume", str(run_dir), "--set", "vae.epochs=9", "--set", "data.image_size=64"], "image"),
        (["--resume", str(run_dir), "--out", str(tmp_path / "r")], "drop --out"),
        (["--resume", str(run_dir), "--overwrite"], "contradict"),
        (["--out", str(run_dir), "--resume", "--overwrite"], "contradict"),
        (["--resume", str(run_dir), "--sample", "3"], "cannot be combined"),
        (["--out", str(tmp_path / "r"), *_args("data.path=" + str(tmp_path / "empty"))], "not found"),
        (["--out", str(tmp_path / "r"), *_args("vae.batch_size=64")], "vae.batch_size"),
        (["--out", str(tmp_path / "r"), *_args("vae.nope=1")], "unknown config key"),
        (["--out", str(tmp_path / "r"), *_args("vae.lr_schedule=step")], "vae.lr_schedule"),
        (["--out", str(tmp_path / "r"), *_args("vae.prior=flow")], "vae.prior"),
        (["--out", str(tmp_path / "r"), "--seed", "3"], "--sample"),
    ]
    for argv, message in cases:
        code, err = _exit_code(argv, capsys)
        assert code == 2, argv
        assert err.startswith("error: ") and message in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "r").exists()


def test_cosine_schedule_runs_from_lr_to_its_floor():
    from vae.train import COSINE_FLOOR, _learning_rate

    schedule = _learning_rate(0.002, "cosine", 100)
    values = [float(schedule(step)) for step in (0, 50, 100, 150)]
    expected_mid = 0.002 * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert values == pytest.approx([0.002, expected_mid, 0.002 * COSINE_FLOOR, 0.002 * COSINE_FLOOR], rel=1e-5)
    constant = _learning_rate(0.002, "constant", 100)
    assert [float(constant(step)) for step in (0, 50, 100, 150)] == pytest.approx([0.002] * 4, rel=1e-7)


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("")
    (run / "last.keras").write_bytes(b"\x00" * 100)
    code, err = _exit_code(["--resume", str(run)], capsys)
    assert code == 2 and "cannot load checkpoint" in err


def test_bare_resume_flag_still_continues_out_with_a_deprecation_warning(run_dir, tmp_path, capsys, caplog):
    """`--out DIR --resume` (before issue 21) means `--resume DIR` for one more release, and says so."""
    code, err = _exit_code(["--out", str(run_dir), "--resume", "--set", "vae.epochs=3"], capsys)
    assert code == 2 and "already trained 3" in err  # it went to run_dir's last.keras
    assert f"deprecated and goes in the next release; use 'train-vae --resume {run_dir}'" in caplog.text
    caplog.clear()
    code, err = _exit_code(["--out", str(run_dir), "--resume", str(run_dir), "--set", "vae.epochs=3"], capsys)
    assert code == 2 and "already trained 3" in err and "deprecated" not in caplog.text  # the same folder twice: fine


def test_torch_backend_trains_and_matches_tensorflow(run_dir, tmp_path):
    """Under KERAS_BACKEND=torch: one fit step, save/load, and the TF-trained VAE gives the same priors."""
    from vae.priors import load_vae, sample_priors

    tf_priors = sample_priors(load_vae(run_dir / "vae.keras"), 4, seed=9)
    np.save(tmp_path / "tf_priors.npy", tf_priors)
    script = textwrap.dedent(f"""
        import numpy as np, keras
        assert keras.backend.backend() == "torch"
        from vae.model import IrisVAE
        from vae.priors import load_vae, sample_priors
        vae = IrisVAE(image_size=32, channels=1, latent_dim=6, base_channels=4, channel_mult=[1, 2])
        vae.compile(optimizer=keras.optimizers.Adam(1e-3))
        x = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 1)).astype("float32")
        hist = vae.fit(x, batch_size=8, epochs=2, verbose=0).history
        assert np.isfinite(hist["loss"]).all() and hist["kl"][0] > 0, hist
        vae.save({str(tmp_path / "torch.keras")!r})
        again = load_vae({str(tmp_path / "torch.keras")!r})
        a = keras.ops.convert_to_numpy(vae.decode(x[:2, 0, :6, 0]))
        b = keras.ops.convert_to_numpy(again.decode(x[:2, 0, :6, 0]))
        assert np.array_equal(a, b)
        priors = sample_priors(load_vae({str(run_dir / "vae.keras")!r}), 4, seed=9)
        ref = np.load({str(tmp_path / "tf_priors.npy")!r})
        assert np.abs(priors - ref).max() < 1e-4, np.abs(priors - ref).max()
        print("torch ok")
    """)
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "torch ok" in proc.stdout, proc.stderr[-3000:]


def test_tensorflow_and_torch_share_one_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    script = textwrap.dedent("""
        import vae  # switches on TensorFlow memory growth
        import tensorflow as tf
        import torch
        gpus = tf.config.list_physical_devices("GPU")
        assert gpus
        with tf.device("/GPU:0"):
            tf.reduce_sum(tf.ones((256, 256))).numpy()
        free, total = torch.cuda.mem_get_info()
        assert free > 0.5 * total, (free, total)
        t = torch.ones((1024, 1024, 64), device="cuda")  # 256 MiB
        assert float(t.sum()) == 1024 * 1024 * 64
        print("gpu ok")
    """)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_FORCE_GPU_ALLOW_GROWTH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "gpu ok" in proc.stdout, proc.stderr[-3000:]


def _never_loaded():
    raise AssertionError("the dataset was loaded before the run folder was checked")


def test_run_folder_mistakes_fail_before_the_data_is_loaded(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, err = _exit_code(["--out", str(tmp_path / "run"), *_args("data.path=/no/such/folder")], capsys)
    assert code == 2 and "already exists" in err
    from vae.train import train

    cfg = load_config(None, TINY_SETS)
    with pytest.raises(UserError, match="already exists"):
        train(cfg, _never_loaded, tmp_path / "run")
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg, _never_loaded, tmp_path / "run", resume=True)
