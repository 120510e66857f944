"""Distribution metrics for generated images: FID, KID, IS, and the features they are computed on.

The maths works on any feature vectors:
  * Fréchet distance (Heusel et al., 2017): ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½.
    The square root is taken of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ through `eigh`, so it is
    exact, real and stable (no scipy `sqrtm`, no complex round-off to discard).
  * KID (Bińkowski et al., 2018): the unbiased estimate of MMD² with the cubic polynomial kernel
    k(x, y) = (x·y/d + 1)³, averaged over random subsets (mean ± std).
  * Inception Score (Salimans et al., 2016): exp E_x KL(p(y|x) ‖ p(y)), mean ± std over splits.

Features:
  * `load_inception_features(path)` — real FID/KID need Inception-v3 pool features. Nothing is
    downloaded: pass a local TorchScript file (see its docstring for the format and how to make
    one).
  * `proxy_features(images)` — NOT Inception. A fixed, seeded random projection of 32×32
    thumbnails plus gradient and intensity histograms, for comparing folders when no Inception
    weights are at hand (e.g. the strength sweep). Distances on them are reported as
    "proxy_fd"/"proxy_kid" and are not comparable with published FID/KID values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.errors import UserError

INCEPTION_HELP = (
    "expected a TorchScript file mapping (N, 3, 299, 299) float images in [0, 1] to (N, 2048) "
    "Inception-v3 pool features; make one once from torchvision's inception_v3 weights "
    "(see pipeline/check/metrics.py, load_inception_features) — nothing is downloaded"
)
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
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D)."""
    f1, f2 = _check_features(f1, "first"), _check_features(f2, "second")
    if f1.shape[1] != f2.shape[1]:
        raise UserError(f"feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


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


def load_inception_features(weights_path: str | Path, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A feature extractor from a local TorchScript Inception-v3: images (N, C, H, W) in [-1, 1]
    (C = 1 or 3, any size) → (N, 2048) float64.

    Expected file: `torch.jit.save`d module taking (N, 3, 299, 299) float32 in [0, 1] and returning
    the 2048-d pool features ((N, 2048) or (N, 2048, 1, 1)), normalisation included. One way to make
    it, with torchvision and its Inception-v3 ImageNet weights file already on disk:

        import torch, torchvision
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        net.load_state_dict(torch.load("inception_v3_google-0cc3c7bd.pth"))
        net.fc = torch.nn.Identity(); net.eval()
        class Features(torch.nn.Module):
            def __init__(self, net): super().__init__(); self.net = net
            def forward(self, x):  # [0, 1] → ImageNet normalisation → pool features
                m = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
                s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
                return self.net((x - m) / s)
        torch.jit.trace(Features(net), torch.rand(2, 3, 299, 299)).save("inception_features.pt")

    (The torchvision weights differ slightly from the TF graph behind published FIDs; use the same
    file for every number you compare.)
    """
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path} ({INCEPTION_HELP})")
    import torch

    try:
        module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
        raise UserError(f"cannot load {path} as TorchScript: {type(exc).__name__} ({INCEPTION_HELP})") from None

    def extract(images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        x = np.asarray(images, np.float32)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"images must be (N, 1|3, H, W), got shape {x.shape}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                b = torch.from_numpy((x[i : i + batch_size] + 1.0) * 0.5).clamp(0, 1).to(device)
                b = torch.nn.functional.interpolate(b, size=(299, 299), mode="bilinear", align_corners=False)
                feats = module(b.expand(-1, 3, -1, -1))
                out.append(feats.reshape(len(b), -1).double().cpu().numpy())
        feats = np.concatenate(out) if out else np.zeros((0, 2048))
        if feats.shape[1] != 2048:
            raise UserError(f"{path} returned {feats.shape[1]}-d features, expected 2048 ({INCEPTION_HELP})")
        return feats

    return extract


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
