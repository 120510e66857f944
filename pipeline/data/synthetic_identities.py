"""Synthetic eyes with identities: several captures of each eye, so that genuine (same eye) and
impostor (different eyes) comparisons can be tested on ground truth we control.

An eye (an identity) is its iris: a rubber-sheet texture (`iris_texture`: rows = angle from +x
towards +y, columns = pupil edge → limbus) and its base grey level, drawn from a generator keyed by
(seed, identity) alone. Everything else belongs to the capture, drawn from a generator keyed by
(seed, identity, capture): pupil dilation (pupil/iris radius ratio 0.25–0.55), eye position (iris
centre within ±4 % of the side from the image centre), iris radius (0.35·size ± 4 %), the pupil's
offset from the iris centre (≤ 0.02 iris radii), rotation (up to ±10°, in whole texture rows: the
texture's rows are rolled), sclera, skin and pupil grey, lids and lashes, glints, blur,
gain/offset and sensor noise. No defects. As on the built-in eyes, the texture spans the annulus
from the pupil's radius to the limbus about the iris centre, so a dilated pupil stretches it
radially the way Daugman's rubber-sheet model assumes; the pupil sits within 0.02 iris radii of that
centre, so unwrapping from the true pupil and iris circles (Daugman's way) meets the texture within
0.02 iris radii (under a pixel at 128 px). The texture is drawn at the image's size: one identity
is one eye at one size.

Records: those of `pipeline.data.synthetic` (defect None), led by identity, capture and
rotation_deg (the turn of the texture, degrees from +x towards +y: what lies at angle θ in the
eye's texture appears at θ + rotation_deg in the image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.common.errors import UserError
from pipeline.common.images import write_image
from pipeline.data.synthetic import (
    GOOD_LIDS,
    Eye,
    background,
    check_size_and_seed,
    draw_levels,
    expose,
    paint_eye,
    write_labelled,
)
from pipeline.data.synthetic_layers import TAU, Draws, iris_texture, pupil_shape

MAX_ROTATION_DEG = 10.0
# Trailing tags of the two generators' seeds: NumPy seeds equal up to trailing zeros give the same
# stream, and [seed, i] is already `generate_irises`' image i.
_EYE_STREAM, _CAPTURE_STREAM = 1, 2


def _check(size: int, seed: int, counts: dict[str, int]) -> None:
    """UserError on a bad size or seed, or a negative count (by name)."""
    check_size_and_seed(size, seed)
    for name, value in counts.items():
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")


def _iris(identity: int, size: int, seed: int) -> tuple[np.ndarray, float]:
    """Eye `identity`'s rubber-sheet texture and its base grey level, from (seed, identity) alone."""
    rng = np.random.default_rng([seed, identity, _EYE_STREAM])
    d = Draws(rng, 16)
    base = d.uniform(0.36, 0.5)
    return iris_texture(rng, d, size, base), base


def _turned(texture: np.ndarray, rows: int) -> np.ndarray:
    """The texture turned by `rows` rows (of its len − 1: the last row repeats the first)."""
    turned = np.roll(texture[:-1], rows, axis=0)
    return np.concatenate([turned, turned[:1]])


def _capture(texture: np.ndarray, base: float, identity: int, capture: int, size: int,
             seed: int) -> tuple[np.ndarray, dict]:
    """One capture of the eye whose iris is (texture, base); the rest from (seed, identity, capture)."""
    rng = np.random.default_rng([seed, identity, capture, _CAPTURE_STREAM])
    d = Draws(rng)
    ir = 0.35 * size * d.uniform(0.96, 1.04)
    centre = (size - 1) / 2
    icx, icy = centre + d.uniform(-0.04, 0.04) * size, centre + d.uniform(-0.04, 0.04) * size
    eye = Eye.around(size, icx, icy, ir, d.uniform(0.25, 0.55), d.uniform(0.0, 0.02) * ir, d.uniform(0.0, TAU),
                     size / 128.0)
    rows = texture.shape[0] - 1
    most = int(MAX_ROTATION_DEG * rows / 360.0)
    turn = d.integer(-most, most + 1)
    levels = dataclasses.replace(draw_levels(d), iris=base)
    img = background(d, size, levels.sclera)
    shape = pupil_shape(d, None, eye.pr, eye.ir)
    drawn = paint_eye(img, rng, d, eye, shape, _turned(texture, turn), levels, GOOD_LIDS)
    image, record = expose(img, d, eye, shape, drawn, levels, 1, None)
    return image, {"identity": identity, "capture": capture, "rotation_deg": turn * 360.0 / rows, **record}


def render_capture(identity: int, capture: int, size: int = 128, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Capture `capture` of eye `identity`: a (1, size, size) float32 image in [-1, 1] and its record."""
    _check(size, seed, {"identity": identity, "capture": capture})
    return _capture(*_iris(identity, size, seed), identity, capture, size, seed)


def iter_identities(n_identities: int, captures: int, size: int = 128,
                    seed: int = 0) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (image, record) for identities 0…n_identities−1, captures 0…captures−1 of each
    (identity-major); each the same as `render_capture` draws. Arguments are checked first."""
    _check(size, seed, {"number of identities": n_identities, "captures per identity": captures})

    def draw() -> Iterator[tuple[np.ndarray, dict]]:
        for identity in range(n_identities):
            iris = _iris(identity, size, seed)
            for capture in range(captures):
                yield _capture(*iris, identity, capture, size, seed)

    return draw()


def write_identities(out: str | Path, n_identities: int, captures: int, size: int = 128, seed: int = 0,
                     overwrite: bool = False) -> Path:
    """Write `OUT/000000.png …` (identity-major) and `OUT/labels.json` (records with a `file` key), atomically."""
    items = iter_identities(n_identities, captures, size, seed)  # checks the arguments before touching disk
    return write_labelled(out, items, n_identities * captures, "png", write_image, overwrite)
