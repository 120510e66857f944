"""Shape priors from a trained VAE, as plain NumPy arrays (N, C, H, W) float32 in [-1, 1].

Latents are z = m + S·(temperature·ε) with ε ~ N(0, I) drawn by `np.random.default_rng(seed)`,
so the same seed gives the same latents on every backend; the only framework hand-over is NumPy.
(m, S) are the VAE's prior weights: N(0, I) (m = 0, S = I) for a plain VAE, or, after
`fit_prior`, the mean and Cholesky factor of the aggregate posterior of the training images
("ex-post" Gaussian prior). The aggregate posterior of a trained VAE is never quite N(0, I): some
directions are wider, some narrower, some correlated, and N(0, I) samples that land where no
training image was encoded decode to malformed eyes. A Gaussian fitted to where the images
really are removes most of those holes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline.common.errors import UserError
from pipeline.common.images import nchw_to_nhwc, nhwc_to_nchw


def load_vae(path: str | Path):
    """Load a `.keras` VAE written by `train-vae` (safe_mode on); UserError if missing, corrupt or not a VAE."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"VAE file not found: {path}")
    if path.suffix != ".keras":
        raise UserError(f"VAE file must be a .keras file written by train-vae, got {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"VAE file {path} is corrupt (not a .keras zip archive)")
    import keras  # only now: importing TensorFlow is slow and noisy

    from vae.model import IrisVAE

    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for damaged or foreign files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load VAE from {path}: {reason}") from None
    if not isinstance(model, IrisVAE):
        raise UserError(f"{path} holds a {type(model).__name__}, not a VAE written by train-vae")
    return model


def vae_image_shape(vae) -> tuple[int, int, int]:
    """(C, H, W) of the images the VAE makes."""
    return tuple(vae.image_shape)


def is_conditional(vae) -> bool:
    """Whether the VAE is a CVAE (trained with vae.condition other than none)."""
    return bool(getattr(vae, "conditional", False))


def condition_bank(vae) -> np.ndarray:
    """A CVAE's condition bank (its training set's raw geometry, one row per training image) as NumPy."""
    from keras import ops

    return ops.convert_to_numpy(vae.condition_bank)


def _check_conditions(vae, conditions: np.ndarray | None, n: int) -> np.ndarray | None:
    """Raw conditions (n, K) float32 for a CVAE (None: its own defaults); UserError for a plain VAE given some."""
    if conditions is None:
        return None
    if not is_conditional(vae):
        raise UserError("this VAE is unconditional: it takes no conditions (train it with vae.condition=geometry)")
    conditions = np.asarray(conditions, np.float32)
    k = len(vae.condition_mean)
    if conditions.shape != (n, k):
        raise UserError(f"expected conditions of shape ({n}, {k}), got {conditions.shape}")
    return conditions


def _decode(vae, z: np.ndarray, batch_size: int, conditions: np.ndarray | None = None) -> np.ndarray:
    """Latents (N, D) → images (N, C, H, W) float32 in [-1, 1], decoded `batch_size` at a time (a CVAE's
    under the raw `conditions` (N, K), by default under its condition bank's rows 0, 1, …)."""
    from keras import ops

    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    conditions = _check_conditions(vae, conditions, len(z))
    if conditions is None and is_conditional(vae):
        bank = condition_bank(vae)
        conditions = bank[np.arange(len(z)) % len(bank)]
    out = np.empty((len(z), *vae_image_shape(vae)), np.float32)
    for lo in range(0, len(z), batch_size):
        zs = z[lo : lo + batch_size].astype(np.float32)
        decoded = vae.decode(zs) if conditions is None else vae.decode(zs, conditions[lo : lo + batch_size])
        out[lo : lo + batch_size] = nhwc_to_nchw(ops.convert_to_numpy(decoded))
    return np.clip(out, -1.0, 1.0)


def prior_latents(latent_dim: int, n: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """(n, latent_dim) float32 latents temperature · N(0, I) from `np.random.default_rng(seed)`."""
    if n <= 0:
        raise UserError(f"number of priors must be positive, got {n}")
    if temperature <= 0:
        raise UserError(f"temperature must be positive, got {temperature}")
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, latent_dim)) * temperature).astype(np.float32)


def to_prior(vae, eps: np.ndarray) -> np.ndarray:
    """Standard-normal draws (N, D) → latents m + S·ε of the VAE's prior, float32."""
    from keras import ops

    mean = ops.convert_to_numpy(vae.prior_mean).astype(np.float64)
    scale = ops.convert_to_numpy(vae.prior_scale).astype(np.float64)
    return (mean + np.asarray(eps, np.float64) @ scale.T).astype(np.float32)


def decode_draws(vae, eps: np.ndarray, batch_size: int = 64, conditions: np.ndarray | None = None) -> np.ndarray:
    """Standard-normal (temperature-scaled) draws ε (N, D) → priors (N, C, H, W) float32 in [-1, 1]
    (a CVAE's under the raw `conditions` (N, K); see `_decode` for the default)."""
    z = to_prior(vae, eps)
    return _decode(vae, z, batch_size) if conditions is None else _decode(vae, z, batch_size, conditions)


def sample_priors(vae, n: int, seed: int, temperature: float = 1.0, batch_size: int = 64,
                  conditions: np.ndarray | None = None) -> np.ndarray:
    """n priors decoded from prior latents (temperature-scaled ε drawn with `seed`): (n, C, H, W) float32 in [-1, 1]."""
    return decode_draws(vae, prior_latents(vae.latent_dim, n, seed, temperature), batch_size, conditions)


def encode(vae, images: np.ndarray, batch_size: int = 256,
           conditions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and log-variances (N, D) of (N, C, H, W) [-1, 1] images (a CVAE needs their
    raw `conditions` (N, K))."""
    from keras import ops

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or tuple(images.shape[1:]) != vae_image_shape(vae):
        raise UserError(f"images of shape {images.shape} do not fit the VAE; expected (N, "
                        f"{', '.join(map(str, vae_image_shape(vae)))})")
    if len(images) == 0:
        raise UserError("no images to encode")
    conditions = _check_conditions(vae, conditions, len(images))
    if is_conditional(vae) and conditions is None:
        raise UserError("a conditional VAE encodes images together with their conditions")
    means, logvars = [], []
    for lo in range(0, len(images), batch_size):
        batch = nchw_to_nhwc(images[lo : lo + batch_size])
        if conditions is None:
            mean, logvar = vae.encoder(batch, training=False)
        else:
            cond = vae.condition_input(conditions[lo : lo + batch_size], training=False)
            mean, logvar = vae.encoder([ops.convert_to_tensor(batch), cond], training=False)
        means.append(ops.convert_to_numpy(mean))
        logvars.append(ops.convert_to_numpy(logvar))
    return np.concatenate(means), np.concatenate(logvars)


def fit_latent_gaussian(means: np.ndarray, logvars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and lower Cholesky factor of the aggregate posterior (1/N) Σ_i N(μ_i, diag σ_i²).

    Its covariance is the spread of the means plus the average posterior variance:
    Cov = Cov_i(μ_i) + diag(mean_i σ_i²) (law of total variance), always positive definite.
    """
    means = np.asarray(means, np.float64)
    centred = means - means.mean(axis=0)
    cov = centred.T @ centred / len(means) + np.diag(np.exp(np.asarray(logvars, np.float64)).mean(axis=0))
    return means.mean(axis=0), np.linalg.cholesky(cov)


def fit_prior(vae, images: np.ndarray, batch_size: int = 256, conditions: np.ndarray | None = None) -> None:
    """Replace the VAE's prior by the Gaussian fitted to the aggregate posterior of `images` (NCHW)
    (a CVAE's: of the images encoded with their raw `conditions`)."""
    mean, chol = fit_latent_gaussian(*encode(vae, images, batch_size, conditions))
    vae.prior_mean.assign(mean.astype(np.float32))
    vae.prior_scale.assign(chol.astype(np.float32))


def reset_prior(vae) -> None:
    """Back to the standard VAE prior N(0, I)."""
    vae.prior_mean.assign(np.zeros(vae.latent_dim, np.float32))
    vae.prior_scale.assign(np.eye(vae.latent_dim, dtype=np.float32))


def reconstruct(vae, images: np.ndarray, batch_size: int = 64, conditions: np.ndarray | None = None) -> np.ndarray:
    """Encode (N, C, H, W) [-1, 1] images to their posterior means and decode them again (same format)."""
    return _decode(vae, encode(vae, images, batch_size, conditions)[0], batch_size, conditions)


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation from a (t=0) to b (t=1) along the great circle of their directions.

    slerp = sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, Ω the angle between a and b; nearly
    parallel vectors fall back to linear interpolation.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos_omega = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = np.arccos(np.clip(cos_omega, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1.0 - t) * a + t * b
    return (np.sin((1.0 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def interpolate(vae, seed_a: int, seed_b: int, steps: int, batch_size: int = 64) -> np.ndarray:
    """`steps` priors between the prior samples of seeds a and b: (steps, C, H, W).

    The slerp runs between the standard-normal draws ε_a, ε_b, which are then mapped into the prior.
    """
    if steps < 2:
        raise UserError(f"interpolation needs at least 2 steps, got {steps}")
    ea = prior_latents(vae.latent_dim, 1, seed_a)[0]
    eb = prior_latents(vae.latent_dim, 1, seed_b)[0]
    return decode_draws(vae, np.stack([slerp(ea, eb, t) for t in np.linspace(0.0, 1.0, steps)]), batch_size)
