"""How the strength sweep scores a set of images: circularity pass rates with Wilson 95 % intervals,
bleed and pupil circularity, KID against held-out images, and pixel/feature diversity.
(Used by `strength_sweep.py` and `bench_generate.py`.)"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from pipeline.check.stats import wilson_interval
from pipeline.common.config import Config

if TYPE_CHECKING:
    from pipeline.check.inception import InceptionFeatures

HELDOUT_SEED_OFFSET = 100_003  # held-out images: a seed far from the training data's


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows of x (N, D), from the Gram matrix."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    if len(x) < 2:
        return float("nan")
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    iu = np.triu_indices(len(x), k=1)
    return float(np.sqrt(d2[iu]).mean())


class Evaluator:
    """Circularity rules, KID against held-out images and diversity for one set of images."""

    def __init__(self, cfg: Config, heldout: np.ndarray, seed: int, inception: InceptionFeatures | None = None):
        """KID on `inception`'s features when given (`--metrics inception`), else on the proxy features."""
        from pipeline.check.metrics import PROXY_NOTE, proxy_features

        self.cfg, self.seed = cfg, seed
        if inception is not None:
            self.features, self.feature_kind = inception, inception.label
        else:
            self.features, self.feature_kind = proxy_features, PROXY_NOTE
        self.heldout_features = self.features(heldout)

    def per_image(self, images: np.ndarray) -> dict:
        """Each image's circularity rows, pass and round-pupil flags, bleed_fraction and features."""
        from pipeline.check.analyze import analyze_batch
        from pipeline.check.rules import round_pupil_without_bleed

        rows = analyze_batch(images, self.cfg.circularity)
        return {"rows": rows, "pass": np.array([bool(r["pass"]) for r in rows]),
                "pupil_ok": np.array([round_pupil_without_bleed(r, self.cfg.circularity) for r in rows]),
                "bleed": np.array([r["bleed_fraction"] for r in rows], np.float64),
                "features": self.features(images)}

    def __call__(self, images: np.ndarray) -> dict:
        from pipeline.check.metrics import kid
        from pipeline.check.summary import failure_key

        scored = self.per_image(images)
        rows, feats = scored["rows"], scored["features"]
        n = len(rows)
        passed, pupil_ok = int(scored["pass"].sum()), int(scored["pupil_ok"].sum())
        reasons: dict[str, int] = {}
        for r in rows:
            key = "pass" if r["pass"] else failure_key(r["reason"])
            reasons[key] = reasons.get(key, 0) + 1
        kid_mean, kid_std = kid(feats, self.heldout_features, subsets=50, subset_size=min(100, n), seed=self.seed)

        def mean_of(key: str) -> float:
            values = np.array([r[key] for r in rows], np.float64)
            values = values[np.isfinite(values)]
            return float(values.mean()) if values.size else float("nan")

        return {
            "n": n, "pass_rate": passed / n, "pass_ci95": wilson_interval(passed, n),
            "pupil_ok_rate": pupil_ok / n, "pupil_ok_ci95": wilson_interval(pupil_ok, n),
            "bleed_mean": mean_of("bleed_fraction"), "pupil_circularity_mean": mean_of("pupil_circularity"),
            "kid": kid_mean, "kid_std": kid_std,
            "diversity_pixel_rms": mean_pairwise_distance(images) / math.sqrt(images[0].size),
            "diversity_feature": mean_pairwise_distance(feats),
            "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        }


def heldout_images(cfg: Config, n: int) -> np.ndarray:
    """n clean synthetic images from a seed the training data never used."""
    from pipeline.data.synthetic import generate_irises

    images, _ = generate_irises(n, cfg.data.image_size, cfg.data.seed + HELDOUT_SEED_OFFSET, cfg.data.channels)
    return images
