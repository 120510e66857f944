"""Distribution metrics for generated images: FID, KID, IS, and the features they are computed on.

The maths works on any feature vectors:
  * Fréchet distance (Heusel et al., 2017): ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½.
    The square root is taken of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ through `eigh`, so it is
    exact, real and stable (no scipy `sqrtm`, no complex round-off to discard).
  * KID (Bińkowski et al., 2018): the unbiased estimate of MMD² with the cubic polynomial kernel
    k(x, y) = (x·y/d + 1)³, averaged over random subsets (mean ± std).
  * Inception Score (Salimans et al., 2016): exp E_x KL(p(y|x) ‖ p(y)), mean ± std over splits.

Features:
  * `proxy_features(images)` (the default, offline, used in CI) — NOT Inception. A fixed, seeded
    random projection of 32×32 thumbnails plus gradient and intensity histograms, for comparing
    folders when no Inception weights are at hand (e.g. the strength sweep). Distances on them are
    reported as "proxy_fd"/"proxy_kid" and are not comparable with published FID/KID values.
  * Real FID/KID need Inception-v3 pool features: `pipeline.check.inception` (`--metrics
    inception`, the optional extra `metrics`; clean-fid's Inception, nothing downloaded).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from pipeline.common.errors import UserError

PROXY_NOTE = "proxy features (random projection + histograms), not Inception: values are not FID/KID"


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh(0.5 * (m + m.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _check_features(f: np.ndarray, name: str) -> np.ndarray:
    f = np.asarray(f, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UserError(f"{name} features must be (N, D) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise UserError(f"{name} features contain NaN or Inf")
    return f


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D).

    With fewer images than dimensions (e.g. 200 images, 2048-d Inception features) it avoids the
    D × D matrices: write Σ₁ = AᵀA, Σ₂ = BᵀB (A, B the centred features / √(N − 1)); the non-zero
    eigenvalues of Σ₁^½ Σ₂ Σ₁^½ are those of (BAᵀ)(BAᵀ)ᵀ, so tr (Σ₁^½ Σ₂ Σ₁^½)^½ = ‖BAᵀ‖_* (the
    sum of singular values of an N₂ × N₁ matrix) and tr Σ₁ = ‖A‖²_F — the same value, exactly.
    """
    f1, f2 = _check_features(f1, "first"), _check_features(f2, "second")
    if f1.shape[1] != f2.shape[1]:
        raise UserError(f"feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
    if max(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    a = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    b = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    diff = f1.mean(0) - f2.mean(0)
    nuclear = np.linalg.svd(b @ a.T, compute_uv=False).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * nuclear)


def _kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's polynomial kernel k(a, b) = (a·b/d + 1)³ between the rows of x and y."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with KID's kernel."""
    kxx, kyy, kxy = _kernel(x, x), _kernel(y, y), _kernel(x, y)
    off = len(x) * (len(x) - 1)
    return float((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2.0 * kxy.mean())


def mmd2_to_reference(x: np.ndarray, ref: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """MMD² (KID's kernel) of x's rows, re-weighted, against a fixed reference set, for bootstraps.

    Returns f(counts): counts (B, N) are how often each row of x is drawn in B resamples (all ones =
    x itself); f gives each resample's unbiased MMD² to `ref`, where the within-x term leaves out
    pairs of draws of the same row (as the unbiased estimator leaves out i = j), so all ones equals
    the unbiased MMD² of x and ref exactly."""
    x, ref = _check_features(x, "first"), _check_features(ref, "reference")
    kxx, kxr = _kernel(x, x), _kernel(x, ref).mean(axis=1)
    kr = _kernel(ref, ref)
    ref_term = (kr.sum() - np.trace(kr)) / (len(ref) * (len(ref) - 1))
    diag = np.diag(kxx)

    def of(counts: np.ndarray) -> np.ndarray:
        c = np.atleast_2d(np.asarray(counts, np.float64))
        m = c.sum(axis=1)
        within = (np.einsum("bi,ij,bj->b", c, kxx, c) - (c * c) @ diag) / (m * m - (c * c).sum(axis=1))
        return within + ref_term - 2.0 * (c @ kxr) / m

    return of


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD² over `subsets` random subsets
    of `subset_size` (capped at the smaller set) drawn without replacement from each set."""
    f1, f2 = _check_features(f1, "first"), _check_features(f2, "second")
    if f1.shape[1] != f2.shape[1]:
        raise UserError(f"feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
    m = min(subset_size, len(f1), len(f2))
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score from class logits (N, classes): mean and std of exp(E KL(p(y|x) ‖ p(y)))
    over `splits` consecutive chunks."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < splits or splits < 1:
        raise UserError(f"need (N, classes) logits with N >= splits={splits}, got shape {logits.shape}")
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, splits):
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def proxy_features(images: np.ndarray, dim: int = 128, seed: int = 0) -> np.ndarray:
    """NOT Inception (see `PROXY_NOTE`): per image (N, C, H, W) in [-1, 1], a fixed seeded Gaussian
    random projection (to `dim`) of the 32×32 grey thumbnail, a 16-bin intensity histogram and an
    8-bin gradient-orientation histogram weighted by magnitude (texture). Same seed → same features."""
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise UserError(f"images must be (N, C, H, W), got shape {x.shape}")
    grey = x.mean(axis=1)
    proj = np.random.default_rng(seed).standard_normal((32 * 32, dim)) / 32.0
    out = np.empty((len(x), dim + 16 + 8))
    for i, img in enumerate(grey):
        thumb = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA).ravel()
        hist = np.histogram(img, bins=16, range=(-1.0, 1.0))[0] / img.size
        gx, gy = cv2.Sobel(img, cv2.CV_32F, 1, 0), cv2.Sobel(img, cv2.CV_32F, 0, 1)
        mag, ang = cv2.cartToPolar(gx, gy)
        orient = np.histogram(ang % np.pi, bins=8, range=(0.0, np.pi), weights=mag)[0] / img.size
        out[i] = np.concatenate([thumb @ proj, hist, orient])
    return out
