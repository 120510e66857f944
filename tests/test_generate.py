"""generate: the two-stage contracts on tiny models trained here (a few steps; quality is not the point)."""

import json
from functools import partial

import numpy as np
import pytest

from guided_diffusion.samplers import strength_to_t_start
from guided_diffusion.training.checkpoint import load_for_inference
from guided_diffusion.training.factory import create_diffusion
from pipeline import generate as gen_mod
from pipeline.cli import train_diffusion
from pipeline.common.config import load_config
from pipeline.data.folders import load_image_array
from vae import train as vae_train

TINY = ["data.image_size=32", "data.synthetic_count=32", "model.model_channels=16", "model.num_res_blocks=1",
        "model.channel_mult=[1,2,2]", "model.attention_resolutions=[8]", "model.num_head_channels=16",
        "diffusion.steps=100", "diffusion.noise_schedule=cosine", "train.batch_size=8", "train.max_steps=2",
        "train.save_every=2", "train.sample_every=1000", "train.ema_rates=[0.9]", "vae.latent_dim=8",
        "vae.base_channels=8", "vae.channel_mult=[1,2]", "vae.epochs=1", "vae.batch_size=16"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text("{}\n")
    train_diffusion.main.__wrapped__(["--config", str(cfg_path), *sum((["--set", s] for s in TINY), []),
                                      "--out", str(root / "diffusion"), "--device", "cpu"])
    cfg = load_config(cfg_path, TINY)
    vae_train.train(cfg, partial(load_image_array, cfg.data), root / "vae", verbose=0)
    return root, cfg


def _run(models, source="vae", **overrides):
    root, cfg = models
    cfg = load_config(None, [*TINY, "generate.n=3", "generate.steps=10", "generate.batch_size=2",
                             *(f"generate.{k}={v}" for k, v in overrides.items())])
    return gen_mod.generate(cfg, root / "diffusion", source=source, vae_path=root / "vae" / "vae.keras",
                            device="cpu", progress=False)


def test_strength_zero_returns_priors_unchanged(models):
    result = _run(models, strength=0.0)
    assert result.metadata["nfe_per_image"] == 0
    np.testing.assert_array_equal(result.images, np.clip(result.priors, -1, 1))


def test_strength_one_equals_from_noise(models):
    seeded = _run(models, strength=1.0)
    noise = _run(models, source="noise")
    np.testing.assert_array_equal(seeded.images, noise.images)
    assert seeded.metadata["nfe_per_image"] == noise.metadata["nfe_per_image"] == 10


def test_intermediate_strength_starts_at_recorded_t_start(models):
    root, _ = models
    result = _run(models, strength=0.5)
    meta = result.metadata
    _, train_cfg, _ = load_for_inference(root / "diffusion")
    spaced = create_diffusion(train_cfg, respacing="10")
    index = strength_to_t_start(spaced, 0.5)
    assert meta["t_start_index"] == index and meta["t_start"] == spaced.timestep_map[index]
    assert abs(meta["t_start"] - 50) <= 100 / 10  # nearest kept step to 0.5 · T
    assert meta["nfe_per_image"] == index + 1
    assert not np.array_equal(result.images, np.clip(result.priors, -1, 1))


def test_cli_writes_reproducible_outputs(models, tmp_path):
    root, _ = models
    args = ["--from-vae", str(root / "vae" / "vae.keras"), "--diffusion", str(root / "diffusion"), "--n", "3",
            "--steps", "5", "--strength", "0.6", "--seed", "7", "--device", "cpu", "--save-priors",
            *sum((["--set", s] for s in TINY), [])]
    with pytest.raises(SystemExit) as first:
        gen_mod.main([*args, "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit) as second:
        gen_mod.main([*args, "--out", str(tmp_path / "b")])
    assert first.value.code == second.value.code == 0
    for name in ("000000.png", "000002.png", "grid.png", "priors/000001.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    for key in ("config", "train_config", "seeds", "strength", "t_start", "sampler", "steps", "nfe_per_image",
                "timings_s", "versions", "diffusion_checkpoint", "prior"):
        assert key in meta
    assert len(meta["prior"]["sha256"]) == 64 and len(meta["diffusion_checkpoint"]["sha256"]) == 64
    assert meta["seeds"]["noise"] == [7, 8, 9]


def test_batching_does_not_change_ddim_images(models):
    one = _run(models, strength=0.7, batch_size=1)
    three = _run(models, strength=0.7, batch_size=3)
    np.testing.assert_allclose(one.images, three.images, atol=1e-5)


def test_size_mismatch_between_vae_and_diffusion(models, tmp_path):
    root, cfg = models
    small = load_config(None, [*TINY, "data.image_size=16"])
    vae_train.train(small, partial(load_image_array, small.data), tmp_path / "vae16", verbose=0)
    cfg16 = load_config(None, [*TINY, "generate.n=2", "generate.steps=5"])
    with pytest.raises(gen_mod.UserError, match="expects"):
        gen_mod.generate(cfg16, root / "diffusion", source="vae", vae_path=tmp_path / "vae16" / "vae.keras",
                         device="cpu", progress=False)


@pytest.mark.parametrize("extra, message", [
    (["--strength", "1.5"], "strength"),
    (["--steps", "0"], "steps"),
    (["--steps", "101"], "steps"),
    (["--sampler", "euler"], "sampler"),
    (["--n", "0"], "--n"),
])
def test_bad_arguments_exit_2_and_write_nothing(models, tmp_path, capsys, extra, message):
    root, _ = models
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        gen_mod.main(["--from-noise", "--diffusion", str(root / "diffusion"), "--device", "cpu",
                      "--out", str(out), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]
    assert not out.exists()


def test_missing_inputs_and_existing_out(models, tmp_path, capsys):
    root, _ = models
    cases = [
        ["--from-noise", "--diffusion", str(tmp_path / "nope")],
        ["--from-vae", str(tmp_path / "missing.keras"), "--diffusion", str(root / "diffusion")],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as exc:
            gen_mod.main([*argv, "--device", "cpu", "--out", str(tmp_path / "o")])
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith("error:")
        assert not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        gen_mod.main(["--from-noise", "--diffusion", str(root / "diffusion"), "--out", str(tmp_path / "exists")])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"


def test_ddim_is_deterministic_given_seed(models):
    a = _run(models, strength=0.8, seed=3)
    b = _run(models, strength=0.8, seed=3)
    c = _run(models, strength=0.8, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
