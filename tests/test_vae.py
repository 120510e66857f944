"""Stage-1 VAE: loss terms, reparameterisation, model build/save/load, priors API (tiny 32 px models)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from pipeline.common.errors import UserError
from vae.losses import kl_per_dim, kl_warmup_weight, kl_with_free_bits, reconstruction_loss
from vae.model import GroupNormalization, IrisVAE, Sampling, build_vae, check_vae_matches
from vae.priors import (
    encode,
    fit_latent_gaussian,
    fit_prior,
    interpolate,
    load_vae,
    prior_latents,
    reconstruct,
    reset_prior,
    sample_priors,
    slerp,
    vae_image_shape,
)

TINY = dict(image_size=32, channels=1, latent_dim=6, base_channels=4, channel_mult=[1, 2], seed=3)


def np_(x) -> np.ndarray:
    return ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def tiny_vae() -> IrisVAE:
    return IrisVAE(**TINY)


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory, tiny_vae) -> str:
    path = tmp_path_factory.mktemp("vae") / "tiny.keras"
    tiny_vae.save(path)
    return str(path)


# --- loss terms -------------------------------------------------------------------------------

def test_kl_matches_closed_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 4)).astype(np.float32)
    logvar = rng.normal(scale=0.7, size=(3, 4)).astype(np.float32)
    kl = np_(kl_per_dim(mean, logvar))
    # Closed form of KL(N(μ1, σ1²) ‖ N(μ2, σ2²)) with μ2 = 0, σ2 = 1.
    s1, s2, m2 = np.exp(0.5 * logvar), 1.0, 0.0
    expected = np.log(s2 / s1) + (s1**2 + (mean - m2) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(kl, expected, rtol=1e-5, atol=1e-6)
    # Monte Carlo: E_q[log q(z) − log p(z)] for one (μ, σ).
    m, s = float(mean[0, 0]), float(s1[0, 0])
    z = rng.normal(m, s, size=400_000)
    log_q = -0.5 * ((z - m) / s) ** 2 - np.log(s)
    log_p = -0.5 * z**2
    assert abs(np.mean(log_q - log_p) - kl[0, 0]) < 0.02


def test_kl_is_zero_only_at_the_prior():
    zero = np.zeros((2, 5), np.float32)
    assert np.allclose(np_(kl_per_dim(zero, zero)), 0.0)
    assert np.all(np_(kl_per_dim(zero + 0.1, zero)) > 0)


def test_free_bits_clamps_each_dimension_of_the_batch_mean():
    kl = np.array([[0.1, 2.0, 0.5], [0.3, 4.0, 0.5]], np.float32)  # batch means 0.2, 3.0, 0.5
    assert float(np_(kl_with_free_bits(kl, 0.0))) == pytest.approx(3.7)
    assert float(np_(kl_with_free_bits(kl, 1.0))) == pytest.approx(1.0 + 3.0 + 1.0)


def test_reconstruction_loss_sums_over_pixels():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-1, 1, (2, 2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(np_(reconstruction_loss(x, y, "mse")), ((x - y) ** 2).reshape(2, -1).sum(1), rtol=1e-5)
    np.testing.assert_allclose(np_(reconstruction_loss(x, y, "l1")), np.abs(x - y).reshape(2, -1).sum(1), rtol=1e-5)


def test_kl_warmup_is_linear_then_flat():
    weights = [kl_warmup_weight(e, 0.5, 4) for e in range(6)]
    assert weights == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert kl_warmup_weight(0, 0.5, 0) == 0.5


# --- reparameterisation and model ---------------------------------------------------------------

def test_reparameterisation_has_the_posterior_mean_and_variance():
    n = 20_000
    mean = np.tile(np.array([[1.5, -0.5, 0.0]], np.float32), (n, 1))
    logvar = np.tile(np.array([[0.0, math.log(0.25), math.log(4.0)]], np.float32), (n, 1))
    z = np_(Sampling(seed=7)(mean, logvar))
    np.testing.assert_allclose(z.mean(0), mean[0], atol=0.05)
    np.testing.assert_allclose(z.var(0), np.exp(logvar[0]), rtol=0.05)
    np.testing.assert_array_equal(z, np_(Sampling(seed=7)(mean, logvar)))  # seeded
    assert not np.array_equal(z, np_(Sampling(seed=8)(mean, logvar)))


@pytest.mark.parametrize(("size", "channels", "mult"), [(32, 1, [1, 2, 2]), (64, 3, [1, 2, 4, 4]), (128, 1, [1, 1, 2, 2])])
def test_model_shapes_for_each_size(size, channels, mult):
    vae = IrisVAE(image_size=size, channels=channels, latent_dim=5, base_channels=4, channel_mult=mult)
    x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, channels)).astype(np.float32)
    recon, mean, logvar = (np_(t) for t in vae(x))
    assert recon.shape == x.shape and mean.shape == logvar.shape == (2, 5)
    assert np.all(np.abs(recon) <= 1.0)
    assert vae_image_shape(vae) == (channels, size, size)
    bottom = size // 2 ** len(mult)
    assert vae.encoder.get_layer("enc_nhwc").output.shape[1:3] == (bottom, bottom)


@pytest.mark.parametrize(("change", "message"), [
    ({"image_size": 40}, "not divisible"), ({"channels": 2}, "channels"), ({"norm": "layer"}, "vae.norm"),
    ({"recon_loss": "bce"}, "recon_loss"), ({"channel_mult": []}, "channel_mult"), ({"beta": -1.0}, "beta"),
])
def test_bad_model_settings_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        IrisVAE(**{**TINY, "channel_mult": [1, 2, 2, 2], **change})


def test_batch_norm_variant_trains_one_step():
    vae = IrisVAE(**{**TINY, "norm": "batch"})
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 1)).astype(np.float32)
    history = vae.fit(x, batch_size=8, epochs=1, verbose=0)
    assert set(history.history) >= {"loss", "recon", "kl", "elbo"}
    assert np.isfinite(history.history["loss"][0])


def test_save_load_gives_identical_outputs(tiny_vae, saved_vae):
    loaded = load_vae(saved_vae)
    x = np.random.default_rng(2).uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
    for a, b in zip(tiny_vae(x), loaded(x), strict=True):
        np.testing.assert_array_equal(np_(a), np_(b))
    assert loaded.get_config()["channel_mult"] == TINY["channel_mult"]


@pytest.mark.parametrize("axis", [1, -1])
def test_fused_group_norm_equals_keras_group_norm(axis):
    rng = np.random.default_rng(8)
    x = rng.normal(1.5, 2.0, (3, 16, 5, 7) if axis == 1 else (3, 5, 7, 16)).astype(np.float32)
    ours = GroupNormalization(groups=4, axis=axis, epsilon=1e-3)
    keras_gn = keras.layers.GroupNormalization(groups=4, axis=axis, epsilon=1e-3)
    ours.build(x.shape), keras_gn.build(x.shape)
    weights = [rng.normal(size=16).astype(np.float32) for _ in range(2)]  # gamma, beta
    ours.set_weights(weights), keras_gn.set_weights(weights)
    expected = np_(keras_gn(x))
    np.testing.assert_allclose(np_(ours(x)), expected, atol=1e-5)
    assert ours.get_config() == {**keras_gn.get_config(), "name": ours.name}
    if keras.backend.backend() == "torch" and axis == 1:  # NHWC memory in, NHWC memory out, same values
        import torch

        nhwc_memory = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        out = ours(nhwc_memory)
        assert out.is_contiguous(memory_format=torch.channels_last)
        np.testing.assert_allclose(np_(out), expected, atol=1e-5)


OTHER_BACKEND = "tensorflow" if keras.backend.backend() == "torch" else "torch"


@pytest.mark.skipif(importlib.util.find_spec(OTHER_BACKEND) is None, reason=f"{OTHER_BACKEND} not installed")
def test_a_vae_saved_under_one_backend_loads_under_the_other(tmp_path):
    """Each backend builds its own layout (channels-first on torch); the weights mean the same in both."""
    rng = np.random.default_rng(9)
    x = rng.uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
    z = rng.normal(size=(3, 6)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x, z=z)

    def outputs(vae: IrisVAE) -> list[np.ndarray]:
        return [*(np_(t) for t in vae.encoder(x)), np_(vae.decode(z))]

    def randomised() -> IrisVAE:  # random norm scales and biases too, not just their initial 1 and 0
        vae = IrisVAE(**TINY)
        for w in vae.trainable_weights:
            w.assign(np_(w) + 0.2 * rng.standard_normal(w.shape).astype(np.float32))
        return vae

    here = randomised()
    here.save(tmp_path / "here.keras")
    script = textwrap.dedent(f"""
        import numpy as np, keras
        from vae.model import IrisVAE
        from vae.priors import load_vae
        inputs = np.load({str(tmp_path / "inputs.npz")!r})
        def outputs(vae):
            return [*(keras.ops.convert_to_numpy(t) for t in vae.encoder(inputs["x"])),
                    keras.ops.convert_to_numpy(vae.decode(inputs["z"]))]
        np.savez({str(tmp_path / "loaded_there.npz")!r}, *outputs(load_vae({str(tmp_path / "here.keras")!r})))
        there = IrisVAE(**{TINY!r})
        rng = np.random.default_rng(10)
        for w in there.trainable_weights:
            w.assign(keras.ops.convert_to_numpy(w) + 0.2 * rng.standard_normal(w.shape).astype("float32"))
        there.save({str(tmp_path / "there.keras")!r})
        np.savez({str(tmp_path / "made_there.npz")!r}, *outputs(there))
        print(keras.backend.backend(), "ok")
    """)
    env = {**os.environ, "KERAS_BACKEND": OTHER_BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"{OTHER_BACKEND} ok" in proc.stdout, proc.stderr[-3000:]
    for name, vae in (("loaded_there", here), ("made_there", load_vae(tmp_path / "there.keras"))):
        theirs = np.load(tmp_path / f"{name}.npz")
        for i, ours in enumerate(outputs(vae)):  # mean, logvar, decoded image
            np.testing.assert_allclose(ours, theirs[f"arr_{i}"], atol=1e-5, err_msg=name)


def test_config_check_names_the_mismatch(tiny_vae):
    from pipeline.common.config import load_config

    cfg = load_config(None, ["data.image_size=64", "vae.latent_dim=6"])
    with pytest.raises(UserError, match="data.image_size"):
        check_vae_matches(tiny_vae, cfg)
    cfg = load_config(None, ["data.image_size=32", "vae.latent_dim=7"])
    with pytest.raises(UserError, match="latent_dim"):
        check_vae_matches(tiny_vae, cfg)
    cfg = load_config(None, ["data.image_size=32", "vae.latent_dim=6", "vae.base_channels=4",
                             "vae.channel_mult=[1, 2]"])
    check_vae_matches(build_vae(cfg), cfg)


# --- loading bad files ----------------------------------------------------------------------------

def test_missing_corrupt_and_foreign_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_vae(tmp_path / "none.keras")
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match="corrupt"):
        load_vae(garbage)
    empty_zip = tmp_path / "empty.keras"
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(UserError, match="cannot load VAE"):
        load_vae(empty_zip)
    other = tmp_path / "other.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(other)
    with pytest.raises(UserError, match="not a VAE"):
        load_vae(other)
    with pytest.raises(UserError, match=r"\.keras"):
        load_vae(garbage.rename(tmp_path / "model.h5"))


# --- priors -------------------------------------------------------------------------------------

def test_priors_contract_and_seeding(tiny_vae):
    priors = sample_priors(tiny_vae, 5, seed=11, batch_size=2)
    assert priors.shape == (5, 1, 32, 32) and priors.dtype == np.float32
    assert priors.min() >= -1.0 and priors.max() <= 1.0
    np.testing.assert_array_equal(priors, sample_priors(tiny_vae, 5, seed=11, batch_size=2))
    # Other batch sizes may pick other convolution kernels: equal up to float rounding.
    np.testing.assert_allclose(priors, sample_priors(tiny_vae, 5, seed=11, batch_size=4), atol=1e-5)
    assert not np.array_equal(priors, sample_priors(tiny_vae, 5, seed=12))
    # Batched decoding equals decoding each latent through the decoder directly.
    z = np.random.default_rng(11).standard_normal((5, 6)).astype(np.float32)
    direct = np_(tiny_vae.decoder(z)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(priors, np.clip(direct, -1, 1), atol=1e-5)


def test_temperature_scales_the_latents():
    np.testing.assert_allclose(prior_latents(4, 3, 5, temperature=0.5), 0.5 * prior_latents(4, 3, 5), rtol=1e-6)


@pytest.mark.parametrize(("n", "temperature", "message"), [(0, 1.0, "positive"), (-3, 1.0, "positive"),
                                                           (2, 0.0, "temperature"), (2, -1.0, "temperature")])
def test_bad_prior_requests_are_user_errors(tiny_vae, n, temperature, message):
    with pytest.raises(UserError, match=message):
        sample_priors(tiny_vae, n, 0, temperature=temperature)


def test_reconstruct_keeps_the_format_and_checks_the_shape(tiny_vae):
    images = np.random.default_rng(4).uniform(-1, 1, (3, 1, 32, 32)).astype(np.float32)
    out = reconstruct(tiny_vae, images, batch_size=2)
    assert out.shape == images.shape and out.dtype == np.float32
    mean = np_(tiny_vae.encoder(images.transpose(0, 2, 3, 1))[0])
    np.testing.assert_allclose(out, np_(tiny_vae.decoder(mean)).transpose(0, 3, 1, 2), atol=1e-5)
    with pytest.raises(UserError, match="do not fit"):
        reconstruct(tiny_vae, images[:, :, :16, :16])


def test_slerp_endpoints_norm_and_constant_angular_speed():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(2, 16))
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-12)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-12)
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    total = math.acos(np.dot(ua, ub))
    for t in np.linspace(0, 1, 7):
        p = slerp(ua, ub, t)
        assert np.linalg.norm(p) == pytest.approx(1.0, abs=1e-12)
        assert math.acos(np.clip(np.dot(ua, p), -1, 1)) == pytest.approx(t * total, abs=1e-7)
    np.testing.assert_allclose(slerp(ua, ua, 0.3), ua)  # parallel: no division by sin 0


def test_interpolate_runs_between_the_two_seeds_priors(tiny_vae):
    path = interpolate(tiny_vae, 1, 2, steps=4)
    assert path.shape == (4, 1, 32, 32)
    np.testing.assert_allclose(path[0], sample_priors(tiny_vae, 1, 1)[0], atol=1e-5)
    np.testing.assert_allclose(path[-1], sample_priors(tiny_vae, 1, 2)[0], atol=1e-5)
    with pytest.raises(UserError):
        interpolate(tiny_vae, 1, 2, steps=1)


# --- fitted prior ---------------------------------------------------------------------------------

def test_fitted_gaussian_matches_the_sampled_aggregate_posterior():
    rng = np.random.default_rng(6)
    means = rng.normal(size=(40, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 2.0]])
    logvars = rng.normal(-1.0, 0.5, size=(40, 3))
    mean, chol = fit_latent_gaussian(means, logvars)
    assert np.allclose(chol, np.tril(chol)) and np.all(np.diag(chol) > 0)
    # Brute force: draw from the mixture (1/N) Σ N(μ_i, diag σ_i²) and measure it.
    z = (means[:, None, :] + np.exp(0.5 * logvars)[:, None, :] * rng.standard_normal((40, 5000, 3))).reshape(-1, 3)
    np.testing.assert_allclose(mean, z.mean(0), atol=0.02)
    np.testing.assert_allclose(chol @ chol.T, np.cov(z, rowvar=False), atol=0.03)


def test_fitted_prior_drives_sampling_and_survives_saving(tmp_path):
    vae = IrisVAE(**TINY)
    images = np.random.default_rng(7).uniform(-1, 1, (12, 1, 32, 32)).astype(np.float32)
    fit_prior(vae, images)
    means, logvars = encode(vae, images)
    mean, chol = fit_latent_gaussian(means, logvars)
    np.testing.assert_allclose(np_(vae.prior_mean), mean, atol=1e-6)
    np.testing.assert_allclose(np_(vae.prior_scale), chol, atol=1e-6)
    eps = prior_latents(6, 3, seed=4, temperature=0.7)
    expected = np_(vae.decoder((mean + eps @ chol.T).astype(np.float32))).transpose(0, 3, 1, 2)
    priors = sample_priors(vae, 3, seed=4, temperature=0.7)
    np.testing.assert_allclose(priors, expected, atol=1e-5)
    path = interpolate(vae, 4, 5, steps=3)
    np.testing.assert_allclose(path[0], sample_priors(vae, 1, 4)[0], atol=1e-5)
    vae.save(tmp_path / "fitted.keras")
    np.testing.assert_array_equal(sample_priors(load_vae(tmp_path / "fitted.keras"), 3, seed=4, temperature=0.7), priors)
    reset_prior(vae)
    plain = np_(vae.decoder(prior_latents(6, 3, seed=4))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(sample_priors(vae, 3, seed=4), plain, atol=1e-5)


def test_validation_elbo_is_a_sampled_estimate():
    """evaluate()'s elbo (what fit logs as val_elbo) decodes z = mean + σ·ε with ε from the fixed
    validation seed, as training samples z; it is not the posterior-mean reconstruction's value."""
    from pipeline.data.synthetic import generate_irises
    from vae.model import VALIDATION_NOISE_SEED

    vae = IrisVAE(**TINY)
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    logvar_bias = vae.encoder.get_layer("z_logvar").bias  # wide posteriors, so that sampling matters
    logvar_bias.assign(np.full(logvar_bias.shape, 3.0, np.float32))
    images, _ = generate_irises(32, 32, seed=5)
    x = np.moveaxis(images, 1, -1)
    logged = vae.evaluate(x, batch_size=32, return_dict=True, verbose=0)["elbo"]
    mean, logvar = encode(vae, images)
    kl = np_(kl_per_dim(mean, logvar)).sum(axis=-1)

    def elbo(z: np.ndarray) -> float:  # batch mean of the squared error summed over pixels + KL
        return float((((x - np_(vae.decode(z.astype(np.float32)))) ** 2).sum(axis=(1, 2, 3)) + kl).mean())

    eps = np_(keras.random.normal(mean.shape, seed=VALIDATION_NOISE_SEED))
    assert logged == pytest.approx(elbo(mean + np.exp(0.5 * logvar) * eps), rel=1e-5)
    assert logged != pytest.approx(elbo(mean), rel=1e-3)
