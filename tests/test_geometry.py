"""Geometry-controlled priors (issue 23): the geometry vector, the CVAE (build, train, save/load on
both backends, control of the decoder), generate's geometry options and their one-line errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.cli import generate as gen_cli
from pipeline.common.config import load_config
from pipeline.common.errors import UserError
from pipeline.data.folders import load_image_array
from pipeline.data.geometry import (
    GEOMETRY_KEYS,
    geometry_vector,
    load_geometry,
    measured_geometry,
    mirror,
)
from pipeline.data.synthetic import generate_irises
from pipeline.geometry_targets import (
    GeometryRequest,
    control_error,
    parse_offset,
    parse_span,
    read_targets_csv,
    request_from_options,
)
from vae import train as vae_train
from vae.conditioning import ConditionInput
from vae.model import IrisVAE
from vae.priors import decode_draws, encode, is_conditional, load_vae

TINY = ["data.image_size=32", "data.synthetic_count=40", "vae.latent_dim=6", "vae.base_channels=4",
        "vae.channel_mult=[1,2]", "vae.epochs=1", "vae.batch_size=16", "vae.kl_warmup_epochs=1"]
ROOT = Path(__file__).resolve().parents[1]


def np_(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def cvae(tmp_path_factory) -> Path:
    """A tiny geometry VAE trained one epoch through `vae.train.train`, as train-vae does."""
    cfg = load_config(None, [*TINY, "vae.condition=geometry", "vae.condition_dropout=0.2"])
    out = tmp_path_factory.mktemp("cvae") / "run"
    vae_train.train(cfg, partial(load_image_array, cfg.data), out, verbose=0,
                    conditions=vae_train.ConditionSource(partial(load_geometry, cfg.data), mirror))
    return out / "vae.keras"


@pytest.fixture(scope="module")
def plain_vae(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plain") / "vae.keras"
    IrisVAE(image_size=32, channels=1, latent_dim=6, base_channels=4, channel_mult=[1, 2]).save(path)
    return path


# --- the geometry vector ------------------------------------------------------------------------

def test_geometry_vector_closed_form_for_every_label_kind():
    synthetic = {"pupil_cx": 33.0, "pupil_cy": 30.0, "pupil_r": 9.0, "iris_cx": 32.0, "iris_cy": 32.0, "iris_r": 20.0}
    expected = [9 / 20, 20 / 64, 1 / 20, -2 / 20]
    np.testing.assert_allclose(geometry_vector(synthetic, 64), expected)
    prepared = {"pupil": [66.0, 60.0, 18.0], "iris": [64.0, 64.0, 40.0]}  # the same eye in a 128 px crop
    np.testing.assert_allclose(geometry_vector(prepared, 128), expected)
    metrics = {**synthetic, "pupil_found": True, "iris_found": True}
    assert measured_geometry(metrics, 64) == pytest.approx(dict(zip(GEOMETRY_KEYS, expected, strict=True)))
    assert all(math.isnan(v) for v in measured_geometry({**metrics, "iris_found": False}, 64).values())
    np.testing.assert_allclose(mirror(np.array([expected]))[0], [9 / 20, 20 / 64, -1 / 20, -2 / 20], rtol=1e-6)
    with pytest.raises(UserError, match="pupil_cx"):
        geometry_vector({"pupil_r": 3}, 64)


def test_synthetic_geometry_matches_the_generator_records():
    cfg = load_config(None, ["data.image_size=32", "data.synthetic_count=6", "data.seed=4"])
    _, records = generate_irises(6, 32, 4)
    c = load_geometry(cfg.data)
    assert c.shape == (6, 4) and c.dtype == np.float32
    np.testing.assert_allclose(c[:, 0], [r["pupil_iris_ratio"] for r in records], rtol=1e-5)
    np.testing.assert_allclose(c[:, 1], [r["iris_r"] / 32 for r in records], rtol=1e-5)
    np.testing.assert_allclose(np.hypot(c[:, 2], c[:, 3]), [r["concentricity"] for r in records], atol=1e-6)


def test_folder_and_prepared_cache_geometry_follow_the_image_order(tmp_path):
    from pipeline.data.prepared import write_cache
    from pipeline.data.synthetic import write_dataset

    folder = write_dataset(tmp_path / "eyes", 5, size=32, seed=2)
    (folder / "notes.txt").write_text("not an image")
    cfg = load_config(None, [f"data.path={folder}", "data.image_size=16"])
    _, records = generate_irises(5, 32, 2)
    expected = np.array([geometry_vector(r, 32) for r in records], np.float32)
    np.testing.assert_allclose(load_geometry(cfg.data), expected, rtol=1e-6)
    assert len(load_image_array(cfg.data)) == 5
    labels = [{"pupil": [r["pupil_cx"] * 2, r["pupil_cy"] * 2, r["pupil_r"] * 2],
               "iris": [r["iris_cx"] * 2, r["iris_cy"] * 2, r["iris_r"] * 2]} for r in records]  # 64 px crops
    write_cache(tmp_path / "dataset.npz", np.zeros((5, 1, 64, 64), np.uint8), labels, {})
    cfg = load_config(None, [f"data.path={tmp_path / 'dataset.npz'}", "data.image_size=32"])
    np.testing.assert_allclose(load_geometry(cfg.data), expected, rtol=1e-5)
    (folder / "labels.json").unlink()
    with pytest.raises(UserError, match="labels.json not found"):
        load_geometry(load_config(None, [f"data.path={folder}"]).data)


def test_condition_normalisation_round_trip_and_null_condition():
    mean, std = [0.45, 0.35, 0.0, 0.0], [0.14, 0.04, 0.03, 0.03]
    layer = ConditionInput(mean, std, dropout=0.5, seed=1)
    c = np.array([[0.25, 0.3, 0.01, -0.02], [0.65, 0.4, 0.0, 0.0], [np.nan] * 4], np.float32)
    out = np_(layer(c))
    np.testing.assert_allclose(out[:2, :4] * std + np.array(mean), c[:2], atol=1e-6)
    np.testing.assert_array_equal(out[:, 4], [1, 1, 0])
    np.testing.assert_array_equal(out[2], 0)
    restored = ConditionInput.from_config(layer.get_config())
    np.testing.assert_array_equal(np_(restored(c)), out)
    dropped = np_(layer(np.repeat(c[:1], 400, axis=0), training=True))[:, 4]
    assert 0.35 < dropped.mean() < 0.65  # about half the rows dropped in training


# --- the CVAE -------------------------------------------------------------------------------------

def test_cvae_trains_saves_and_loads_with_safe_mode(cvae):
    vae = load_vae(cvae)  # safe_mode=True
    assert is_conditional(vae) and vae.condition == "geometry"
    config = vae.get_config()
    assert len(config["condition_mean"]) == 4 and config["condition_dropout"] == 0.2
    bank = np_(vae.condition_bank)
    assert bank.shape == (config["condition_bank_size"], 4) and 0.15 < bank[:, 0].min() < bank[:, 0].max() < 0.75
    eps = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    c = np.array([[0.3, 0.35, 0, 0], [0.5, 0.35, 0, 0], [0.6, 0.3, 0.02, 0]], np.float32)
    priors = decode_draws(vae, eps, conditions=c)
    assert priors.shape == (3, 1, 32, 32) and np.isfinite(priors).all()
    assert decode_draws(vae, eps).shape == (3, 1, 32, 32)  # unconditional: the bank's geometry
    means, _ = encode(vae, priors, conditions=c)
    assert means.shape == (3, 6)
    with pytest.raises(UserError, match="conditions"):
        encode(vae, priors)
    with pytest.raises(UserError, match="shape"):
        decode_draws(vae, eps, conditions=c[:, :2])


def test_a_plain_vae_keeps_its_config_and_refuses_conditions(plain_vae):
    vae = load_vae(plain_vae)
    assert not is_conditional(vae) and not any(k.startswith("condition") for k in vae.get_config())
    with pytest.raises(UserError, match="unconditional"):
        decode_draws(vae, np.zeros((1, 6), np.float32), conditions=np.zeros((1, 4), np.float32))


def test_the_condition_controls_the_decoder(cvae):
    vae = load_vae(cvae)
    eps = np.zeros((2, 6), np.float32)
    small, large = decode_draws(vae, eps, conditions=np.array([[0.25, 0.35, 0, 0], [0.65, 0.35, 0, 0]], np.float32))
    assert np.abs(small - large).mean() > 1e-3


OTHER_BACKEND = "tensorflow" if keras.backend.backend() == "torch" else "torch"


@pytest.mark.slow  # a second Keras backend in a subprocess: about 35 s on 2 shared cores
@pytest.mark.skipif(importlib.util.find_spec(OTHER_BACKEND) is None, reason=f"{OTHER_BACKEND} not installed")
def test_cvae_loads_and_decodes_alike_on_the_other_backend(cvae, tmp_path):
    c = np.array([[0.3, 0.35, 0, 0], [0.6, 0.3, 0.02, -0.01]], np.float32)
    eps = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", c=c, eps=eps)
    script = textwrap.dedent(f"""
        import numpy as np, keras
        from vae.priors import decode_draws, load_vae
        inputs = np.load({str(tmp_path / "inputs.npz")!r})
        np.save({str(tmp_path / "there.npy")!r}, decode_draws(load_vae({str(cvae)!r}), inputs["eps"], conditions=inputs["c"]))
        print(keras.backend.backend(), "ok")
    """)
    env = {**os.environ, "KERAS_BACKEND": OTHER_BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"{OTHER_BACKEND} ok" in proc.stdout, proc.stderr[-3000:]
    here = decode_draws(load_vae(cvae), eps, conditions=c)
    np.testing.assert_allclose(np.load(tmp_path / "there.npy"), here, atol=1e-5)


def test_mirrored_training_images_get_mirrored_conditions():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    conditions = np.column_stack([np.arange(12) / 20 + 0.1, np.full(12, 0.3), rng.uniform(0.01, 0.05, (12, 2))])
    batches = vae_train.make_batches(images, 4, seed=3, hflip=True, start_epoch=0, conditions=conditions, mirror=mirror)
    flipped = 0
    for k in range(6):  # two epochs
        ((x, c),) = batches[k]
        for img, row in zip(x, c, strict=True):
            i = int(np.argmin(np.abs(conditions[:, 0] - row[0])))  # the ratio names the image
            is_flipped = not np.array_equal(img[..., 0], images[i, 0])
            np.testing.assert_array_equal(img[..., 0], images[i, 0][:, ::-1] if is_flipped else images[i, 0])
            assert row[2] == pytest.approx(-conditions[i, 2] if is_flipped else conditions[i, 2])
            flipped += is_flipped
    assert 0 < flipped < 24


# --- targets ---------------------------------------------------------------------------------------

def test_spans_offsets_and_sweeps():
    assert parse_span("0.45", "--pupil-ratio") == (0.45, 0.45)
    assert parse_span("0.25:0.65", "--pupil-ratio") == (0.25, 0.65)
    for bad in ("1.2", "0", "0.2:1", "a", "0.1:0.2:0.3", "nan"):
        with pytest.raises(UserError, match="--pupil-ratio"):
            parse_span(bad, "--pupil-ratio")
    assert parse_offset("0.05,-0.02") == (0.05, -0.02)
    with pytest.raises(UserError, match="--offset"):
        parse_offset("0.05")
    bank = np.array([[0.4, 0.33, 0.01, 0.02], [0.5, 0.36, -0.01, 0.0]], np.float32)
    request = request_from_options("0.25:0.65", "0.38", "0,0")
    t = request.targets(9, bank, seed=0)
    np.testing.assert_allclose(t[:, 0], np.linspace(0.25, 0.65, 9), rtol=1e-6)
    np.testing.assert_allclose(t[:, 1:], [[0.38, 0, 0]] * 9, rtol=1e-6)
    free = GeometryRequest(pupil_ratio=(0.3, 0.3)).targets(4, bank, seed=0)
    assert all(any(np.allclose(row[1:], b[1:]) for b in bank) for row in free)  # the rest from the bank
    np.testing.assert_array_equal(free, GeometryRequest(pupil_ratio=(0.3, 0.3)).targets(4, bank, seed=0))
    assert request_from_options() is None


def test_targets_csv_reads_circularity_results_and_names_missing_columns(tmp_path):
    results = tmp_path / "results.csv"
    results.write_text("file,width,height,pass,reason,pupil_iris_ratio,iris_r\n"
                       "a.png,64,64,True,,0.4,22.4\nb.png,64,64,False,no iris,,\nc.png,64,64,True,,0.55,19.2\n")
    rows = read_targets_csv(results)
    np.testing.assert_allclose(rows["pupil_ratio"], [0.4, 0.55])
    np.testing.assert_allclose(rows["iris_radius"], [0.35, 0.3])
    t = GeometryRequest(rows=rows).targets(3, np.array([[0.5, 0.3, 0, 0]], np.float32), seed=0)
    np.testing.assert_allclose(t[:, 0], [0.4, 0.55, 0.4], rtol=1e-6)  # cycling
    plain = tmp_path / "plain.csv"
    plain.write_text("pupil_ratio\n0.3\n")
    assert list(read_targets_csv(plain)) == ["pupil_ratio"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,radius\na.png,3\n")
    with pytest.raises(UserError, match="lacks the columns pupil_ratio .* it has: file, radius"):
        read_targets_csv(bad)
    out_of_range = tmp_path / "range.csv"
    out_of_range.write_text("pupil_ratio\n1.5\n")
    with pytest.raises(UserError, match=r"\(0, 1\)"):
        read_targets_csv(out_of_range)


def test_control_error():
    targets = np.array([[0.3, 0.3, 0, 0], [0.5, 0.3, 0, 0], [0.6, 0.3, 0, 0], [0.4, 0.3, 0, 0]])
    measured = [{"pupil_ratio": v} for v in (0.32, 0.48, 0.61, math.nan)]
    err = control_error(targets, measured)
    assert err["mae"] == pytest.approx(0.05 / 3) and err["measured"] == 3 and err["corr"] > 0.99


# --- generate's one-line errors --------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--pupil-ratio", "1.2"], "(0, 1)"),
    (["--pupil-ratio", "0.3:0"], "(0, 1)"),
    (["--iris-radius", "x"], "--iris-radius"),
    (["--offset", "0.1"], "--offset"),
    (["--geometry-csv", "missing.csv"], "not found"),
    (["--geometry-csv", "{bad_csv}"], "lacks the columns"),
    (["--pupil-ratio", "0.4"], "unconditional (train it with vae.condition=geometry)"),
])
def test_bad_geometry_options_exit_2_and_write_nothing(plain_vae, tmp_path, capsys, extra, message):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,width\na.png,64\n")
    out = tmp_path / "out"
    extra = [e.format(bad_csv=bad_csv) for e in extra]
    with pytest.raises(SystemExit) as exc:  # the diffusion dir is never read: the geometry check comes first
        gen_cli.main(["--from-vae", str(plain_vae), "--diffusion", str(tmp_path / "no-diffusion"), "--device", "cpu",
                      "--out", str(out), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_geometry_options_need_from_vae(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gen_cli.main(["--from-noise", "--diffusion", str(tmp_path), "--pupil-ratio", "0.4", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--from-vae" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_generate_sweep_writes_targets_and_measurements(cvae, tmp_path):
    from pipeline.cli import train_diffusion

    tiny = ["data.image_size=32", "data.synthetic_count=16", "model.model_channels=16", "model.num_res_blocks=1",
            "model.channel_mult=[1,2,2]", "model.attention_resolutions=[8]", "model.num_head_channels=16",
            "diffusion.steps=100", "train.batch_size=8", "train.max_steps=2", "train.save_every=2",
            "train.sample_every=1000", "train.ema_rates=[0.9]"]
    train_diffusion.main.__wrapped__([*sum((["--set", s] for s in tiny), []), "--out", str(tmp_path / "d"),
                                      "--device", "cpu"])
    out = tmp_path / "gen"
    gen_cli.main.__wrapped__(["--from-vae", str(cvae), "--diffusion", str(tmp_path / "d"), "--device", "cpu",
                              "--out", str(out), "--n", "5", "--steps", "5", "--pupil-ratio", "0.25:0.65",
                              "--iris-radius", "0.35", "--offset", "0,0"])
    geometry = json.loads((out / "metadata.json").read_text())["prior"]["geometry"]
    np.testing.assert_allclose([t[0] for t in geometry["targets"]], np.linspace(0.25, 0.65, 5), rtol=1e-6)
    assert len(geometry["measured_prior"]) == len(geometry["measured_result"]) == 5
    assert set(geometry["control_result"]) == {"pupil_ratio", "iris_radius"}
    assert "--pupil-ratio 0.25:0.65" in geometry["request"]
