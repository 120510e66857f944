"""generate: the two-stage contracts on tiny models trained here (a few steps; quality is not the point)."""

import json
from functools import partial

import numpy as np
import pytest
import torch

from guided_diffusion.samplers import strength_to_t_start
from guided_diffusion.training.checkpoint import load_for_inference
from guided_diffusion.training.factory import create_diffusion
from guided_diffusion.training.step import resolve_precision
from pipeline import generate as gen_mod
from pipeline.cli import generate as gen_cli
from pipeline.common.config import load_config
from pipeline.data.folders import load_image_array
from pipeline.prior_sources import vae_priors
from vae import train as vae_train

TINY = ["data.image_size=32", "data.synthetic_count=32", "model.model_channels=16", "model.num_res_blocks=1",
        "model.channel_mult=[1,2,2]", "model.attention_resolutions=[8]", "model.num_head_channels=16",
        "diffusion.steps=100", "diffusion.noise_schedule=cosine", "train.batch_size=8", "train.max_steps=2",
        "train.save_every=2", "train.sample_every=1000", "train.ema_rates=[0.9]", "vae.latent_dim=8",
        "vae.base_channels=8", "vae.channel_mult=[1,2]", "vae.epochs=1", "vae.batch_size=16"]


@pytest.fixture(scope="module")
def models(trained_pair):
    """The session's tiny VAE + diffusion pair (tests/conftest.py); these tests only read it."""
    vae, diffusion = trained_pair
    assert vae.parent.parent == diffusion.parent
    return diffusion.parent, load_config(None, TINY)


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
    for out, extra in (("a", []), ("b", []), ("one", ["--index", "2"])):
        with pytest.raises(SystemExit) as exc:
            gen_cli.main([*args, "--out", str(tmp_path / out), *extra])
        assert exc.value.code == 0
    for name in ("000000.png", "000002.png", "grid.png", "priors/000001.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # --index re-makes image 2 of the run alone, bit for bit (its VAE latent and noise are its own)
    assert sorted(p.name for p in (tmp_path / "one").glob("0*.png")) == ["000002.png"]
    for name in ("000002.png", "priors/000002.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    for key in ("config", "train_config", "seeds", "strength", "t_start", "sampler", "steps", "nfe_per_image",
                "timings_s", "versions", "diffusion_checkpoint", "prior", "precision", "indices"):
        assert key in meta
    assert len(meta["prior"]["sha256"]) == 64 and len(meta["diffusion_checkpoint"]["sha256"]) == 64
    assert meta["seeds"]["seed"] == 7 and "SeedSequence" in meta["seeds"]["scheme"]
    assert meta["seeds"]["purposes"] == {"start": 0, "step": 1, "vae": 2}
    assert meta["precision"] == resolve_precision("auto", torch.device("cpu"))  # this CPU's choice: bf16 or fp32
    assert json.loads((tmp_path / "one" / "metadata.json").read_text())["indices"] == [2]


def test_batching_does_not_change_ddim_images(models):
    one = _run(models, strength=0.7, batch_size=1)
    three = _run(models, strength=0.7, batch_size=3)
    np.testing.assert_allclose(one.images, three.images, atol=1e-5)


def test_a_smaller_vae_seeds_the_model_through_fit_priors(models, tmp_path):
    """Issue 18: a 16 px VAE seeds the 32 px model; at strength 0 the result is its priors, enlarged."""
    import cv2

    from pipeline.common.resize import fit_priors

    root, cfg = models
    small = load_config(None, [*TINY, "data.image_size=16"])
    vae_train.train(small, partial(load_image_array, small.data), tmp_path / "vae16", verbose=0)
    cfg16 = load_config(None, [*TINY, "generate.n=2", "generate.steps=5", "generate.strength=0"])
    result = gen_mod.generate(cfg16, root / "diffusion", source="vae", vae_path=tmp_path / "vae16" / "vae.keras",
                              device="cpu", progress=False)
    native, _, _ = vae_priors(str(tmp_path / "vae16" / "vae.keras"), cfg16.generate, [0, 1], False, "auto")
    assert native.shape == (2, 1, 16, 16) and result.images.shape == (2, 1, 32, 32)
    np.testing.assert_array_equal(result.images, fit_priors(native, (1, 32, 32))[0])
    by_cv2 = [np.clip(cv2.resize(p[0], (32, 32), interpolation=cv2.INTER_CUBIC), -1, 1) for p in native]
    np.testing.assert_allclose(result.images[:, 0], np.stack(by_cv2), atol=1e-6)
    assert result.metadata["prior"]["resized"] == {"from": [1, 16, 16], "to": [1, 32, 32], "method": "cubic",
                                                   "channels": "kept"}


@pytest.mark.parametrize("extra, message", [
    (["--strength", "1.5"], "strength"),
    (["--steps", "0"], "steps"),
    (["--steps", "101"], "steps"),
    (["--sampler", "euler"], "sampler"),
    (["--n", "0"], "--n"),
    (["--strength", "-0.1"], "strength"),
    (["--precision", "fp8"], "precision"),
    (["--precision", "fp16"], "fp16 needs a CUDA"),
    (["--seed", "-1"], "seed"),
    (["--n", "3", "--index", "3"], "--index"),
])
def test_bad_arguments_exit_2_and_write_nothing(models, tmp_path, capsys, extra, message):
    root, _ = models
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        gen_cli.main(["--from-noise", "--diffusion", str(root / "diffusion"), "--device", "cpu",
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
            gen_cli.main([*argv, "--device", "cpu", "--out", str(tmp_path / "o")])
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith("error:")
        assert not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        gen_cli.main(["--from-noise", "--diffusion", str(root / "diffusion"), "--out", str(tmp_path / "exists")])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"


def test_ddim_is_deterministic_given_seed(models):
    a = _run(models, strength=0.8, seed=3)
    b = _run(models, strength=0.8, seed=3)
    c = _run(models, strength=0.8, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def _noise_run(models, **overrides):
    return _run(models, source="noise", **{"steps": 3, **overrides})


def test_step_noise_is_independent_of_the_starting_noise(models, monkeypatch):
    """Defect 1: the first DDPM step of each batch used to draw its own x_T again."""
    import torch

    from guided_diffusion import samplers

    starts, draws = [], []
    real_sample, real_randn = samplers.sample, samplers._randn

    def spy_randn(shape, generator, device):
        z = real_randn(shape, generator, device)
        if len(shape) == 4:
            draws.append(z)
        return z

    def spy_sample(*args, **kwargs):
        starts.append(kwargs["noise"])
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(samplers, "_randn", spy_randn)
    monkeypatch.setattr(samplers, "sample", spy_sample)
    _noise_run(models, sampler="ddpm")
    start, step = torch.cat(starts).flatten(1), torch.cat(draws).flatten(1)
    assert len(start) == 3 and len(step) == 3 * 3
    corr = torch.corrcoef(torch.cat([start, step]))[: len(start), len(start):]
    assert corr.abs().max() < 0.2, corr


def test_adjacent_seeds_share_no_image(models):
    """Defect 2: image i of seed s used to be image i − 1 of seed s + 1."""
    a, b = (_noise_run(models, seed=s).images for s in (5, 6))
    for x in a:
        assert not any(np.array_equal(x, y) for y in b)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.7)])
def test_stochastic_samplers_do_not_depend_on_the_batch_size(models, sampler, eta):
    runs = [_run(models, source="noise", n=5, steps=3, sampler=sampler, eta=eta, batch_size=b).images
            for b in (1, 4, 16)]
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)
    np.testing.assert_allclose(runs[0], runs[2], atol=1e-6)


def test_t_start_is_computed_once_and_nfe_counted_on_the_model(models, monkeypatch):
    """Defect 4: one strength → t_start conversion; the recorded NFE is what the network did."""
    from guided_diffusion import samplers
    from guided_diffusion.training import checkpoint

    conversions, rows = [], []
    real_convert, real_load = samplers.strength_to_t_start, checkpoint.load_for_inference

    def convert(*args):
        conversions.append(args)
        return real_convert(*args)

    def load(*args, **kwargs):
        model, *rest = real_load(*args, **kwargs)
        return (lambda x, t: rows.append(len(x)) or model(x, t)), *rest

    monkeypatch.setattr(samplers, "strength_to_t_start", convert)
    monkeypatch.setattr(checkpoint, "load_for_inference", load)
    meta = _noise_run(models, strength=0.5).metadata  # source noise: strength 1, all 3 steps
    assert len(conversions) == 1 and sum(rows) == 3 * meta["nfe_per_image"] == 3 * 3


def test_interpolation_shares_diffusion_noise_and_uses_the_temperature(models, monkeypatch):
    """Defect 5: frames differ only through their priors, and --temperature scales the latents."""
    import vae.priors as priors_mod

    root, _ = models
    decoded = []

    def fake_decode(vae, z, batch_size):  # record the latents, decode every frame to one image
        decoded.append(np.asarray(z))
        return np.full((len(z), *priors_mod.vae_image_shape(vae)), 0.2, np.float32)

    monkeypatch.setattr(priors_mod, "_decode", fake_decode)

    def run(temperature, interpolate):
        cfg = load_config(None, [*TINY, "generate.n=3", "generate.steps=4", "generate.strength=0.5",
                                 "generate.sampler=ddpm", f"generate.temperature={temperature}"])
        return gen_mod.generate(cfg, root / "diffusion", source="vae", vae_path=root / "vae" / "vae.keras",
                                device="cpu", progress=False, interpolate=interpolate).images

    frames = run(0.5, True)
    np.testing.assert_array_equal(frames[0], frames[1])
    np.testing.assert_array_equal(frames[0], frames[2])
    run(1.0, True)
    run(0.5, False)
    half, full, plain = decoded
    assert not np.allclose(half, full)
    np.testing.assert_allclose(half[[0, 2]], plain[:2], rtol=1e-6)  # the ends are images 0 and 1 of the run


def test_bf16_autocast_on_cpu_is_close_to_fp32(models):
    fp32 = _noise_run(models, n=2, precision="fp32")
    bf16 = _noise_run(models, n=2, precision="bf16")
    assert bf16.metadata["precision"] == "bf16" and fp32.metadata["precision"] == "fp32"
    assert np.abs(bf16.images - fp32.images).mean() < 0.02
    assert not np.array_equal(bf16.images, fp32.images)  # autocast really ran


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA")
def test_cuda_mixed_precision_is_close_to_fp32(models):
    root, _ = models
    images = {}
    for precision in ("fp32", "auto"):
        cfg = load_config(None, [*TINY, "generate.n=4", "generate.steps=10", f"generate.precision={precision}"])
        result = gen_mod.generate(cfg, root / "diffusion", source="noise", device="cuda", progress=False)
        images[precision] = result.images
        assert result.metadata["batch_size"] == 64
    assert np.abs(images["auto"] - images["fp32"]).mean() < 0.02


def test_image_priors_and_index(models, tmp_path):
    from pipeline.common.images import write_image

    for i in range(3):
        write_image(tmp_path / f"p{i}.png", np.full((1, 32, 32), 0.3 * i - 0.3, np.float32))
    root, _ = models
    cfg = load_config(None, [*TINY, "generate.n=5", "generate.steps=3", "generate.sampler=ddpm"])
    runs = [gen_mod.generate(cfg, root / "diffusion", source="images", images_dir=tmp_path, device="cpu",
                             progress=False, indices=indices) for indices in (None, [1])]
    assert runs[0].metadata["n"] == 3 and runs[0].metadata["prior"]["folder"] == str(tmp_path)
    assert runs[1].indices == [1]
    np.testing.assert_allclose(runs[1].images[0], runs[0].images[1], atol=1e-5)  # batch of 1 vs 3: float rounding
    np.testing.assert_array_equal(runs[1].priors[0], runs[0].priors[1])
    for run in runs:  # per image: the images this call made, not the run's n
        timings = run.metadata["timings_s"]
        assert timings["sampling_per_image"] == pytest.approx(timings["sampling"] / len(run.indices))
