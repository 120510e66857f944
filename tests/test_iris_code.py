"""Iris codes: the rubber sheet samples where Daugman's model says, the code turns with the eye, the
Hamming distances equal a brute-force count, and the statistics equal hand-computed values."""

import math

import cv2
import numpy as np
import pytest

from pipeline.check.hamming import (
    degrees_of_freedom,
    equal_error_rate,
    hamming_distance,
    pairwise_hamming,
    rescaled_hd,
)
from pipeline.check.iris_code import IrisCode, code_image, encode, rubber_sheet
from pipeline.common.config import CircularityConfig
from pipeline.common.images import to_unit
from pipeline.data.synthetic import generate_irises


def bilinear(g: np.ndarray, x: float, y: float) -> float:
    """g at (x, y), interpolated bilinearly, the border replicated."""
    h, w = g.shape
    x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
    x0, y0 = min(int(math.floor(x)), w - 2), min(int(math.floor(y)), h - 2)
    fx, fy = x - x0, y - y0
    top = (1 - fx) * float(g[y0, x0]) + fx * float(g[y0, x0 + 1])
    bottom = (1 - fx) * float(g[y0 + 1, x0]) + fx * float(g[y0 + 1, x0 + 1])
    return (1 - fy) * top + fy * bottom


@pytest.mark.parametrize("pupil, iris", [
    ((40.0, 30.0, 8.0), (40.0, 30.0, 25.0)),  # concentric
    ((43.3, 27.8, 10.5), (39.6, 31.2, 27.9)),  # non-concentric
    ((12.0, 50.0, 6.0), (15.0, 47.0, 30.0)),  # reaching past the image's edges
])
def test_rubber_sheet_samples_daugmans_points(pupil, iris):
    g = np.random.default_rng(0).random((64, 80)).astype(np.float32)
    n_rings, n_angles = 6, 40
    polar, xs, ys = rubber_sheet(g, pupil, iris, (n_rings, n_angles))
    assert polar.shape == xs.shape == ys.shape == (n_rings, n_angles)
    assert polar.dtype == xs.dtype == ys.dtype == np.float32
    (px, py, pr), (ix, iy, ir) = pupil, iris
    for i in range(n_rings):
        rho = (i + 0.5) / n_rings
        for j in range(n_angles):
            theta = 2 * math.pi * j / n_angles
            x = (1 - rho) * (px + pr * math.cos(theta)) + rho * (ix + ir * math.cos(theta))
            y = (1 - rho) * (py + pr * math.sin(theta)) + rho * (iy + ir * math.sin(theta))
            assert xs[i, j] == pytest.approx(x, abs=1e-4) and ys[i, j] == pytest.approx(y, abs=1e-4)
            assert polar[i, j] == pytest.approx(bilinear(g, x, y), abs=1e-4)


def test_rubber_sheet_unrolls_an_angular_pattern():
    cx, cy, k = 50.3, 47.6, 5
    x, y = np.meshgrid(np.arange(100.0), np.arange(96.0))
    g = (0.5 + 0.4 * np.cos(k * np.arctan2(y - cy, x - cx))).astype(np.float32)  # θ from +x towards +y
    polar, _, _ = rubber_sheet(g, (cx, cy, 12.0), (cx, cy, 40.0), (8, 128))
    expected = 0.5 + 0.4 * np.cos(k * 2 * np.pi * np.arange(128) / 128)
    assert np.abs(polar - expected).max() < 0.01


def texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random polar pattern, circular along the angle."""
    noise = np.tile(np.random.default_rng(seed).random(shape).astype(np.float32), (1, 3))
    return cv2.GaussianBlur(noise, (0, 0), 1.5)[:, shape[1] : 2 * shape[1]]


@pytest.mark.parametrize("s", [-9, -1, 3, 7])
def test_a_circular_shift_of_the_polar_image_shifts_the_code(s):
    polar = texture((16, 256), seed=s + 100)
    valid = np.ones(polar.shape, bool)
    valid[:, 40:70] = False  # an eyelid
    a = encode(polar, valid)
    b = encode(np.roll(polar, s, axis=1), np.roll(valid, s, axis=1))
    hd, bits, shift = hamming_distance(a, b, 10)
    assert (hd, shift) == (0.0, s)
    assert bits == 2 * np.count_nonzero(a.mask) > 0.9 * 2 * np.count_nonzero(valid)


@pytest.mark.parametrize("seed", range(5))
def test_occluders_do_not_ring_into_the_code(seed):
    polar = texture((16, 256), seed)
    lid, lashes = polar.copy(), polar.copy()
    valid_lid, valid_lashes = np.ones(polar.shape, bool), np.ones(polar.shape, bool)
    lid[:, 40:70], valid_lid[:, 40:70] = 1.0, False  # bright skin here, dark lashes there
    lashes[:, 100:140], valid_lashes[:, 100:140] = 0.0, False
    hd, bits, _ = hamming_distance(encode(lid, valid_lid), encode(lashes, valid_lashes), 0)
    assert hd < 0.05 and bits > 0.6 * 2 * polar.size


def test_the_bits_are_the_quadrant_of_the_phase():
    n_angles, cycles = 256, 16  # the default wavelength A/16: a sinusoid at the filter's centre
    phase = 2 * np.pi * cycles * np.arange(n_angles) / n_angles + 0.3
    code = encode(np.tile(0.5 + 0.2 * np.cos(phase), (3, 1)), np.ones((3, n_angles), bool))
    assert code.bits.shape == (3, n_angles, 2) and code.bits.dtype == bool and code.mask.all()
    assert np.array_equal(code.bits[..., 0], np.tile(np.cos(phase) > 0, (3, 1)))
    assert np.array_equal(code.bits[..., 1], np.tile(np.sin(phase) > 0, (3, 1)))


def random_code(rng: np.random.Generator, shape: tuple[int, int]) -> IrisCode:
    """Random bits under a random mask (now and then a sparse or an empty one)."""
    density = rng.choice([0.0, 0.05, 0.5, 0.9, 1.0])
    return IrisCode(rng.random((*shape, 2)) < 0.5, rng.random(shape) < density)


def brute_hamming(a: IrisCode, b: IrisCode, max_shift: int) -> tuple[float, int, int]:
    """Count bit by bit; the least HD, then the most bits, then the smallest |s|, negative first."""
    n_rings, n_angles = a.mask.shape
    best = None
    for s in sorted(range(-max_shift, max_shift + 1), key=lambda s: (abs(s), s)):
        wrong = compared = 0
        for i in range(n_rings):
            for j in range(n_angles):
                jb = (j + s) % n_angles
                if a.mask[i, j] and b.mask[i, jb]:
                    compared += 2
                    wrong += int(a.bits[i, j, 0] != b.bits[i, jb, 0]) + int(a.bits[i, j, 1] != b.bits[i, jb, 1])
        if compared and (best is None or (wrong / compared, -compared) < (best[0], -best[1])):
            best = (wrong / compared, compared, s)
    return best or (math.nan, 0, 0)


@pytest.mark.parametrize("shape", [(4, 32), (3, 20)])
def test_hamming_distance_counts_bit_by_bit(shape):
    rng = np.random.default_rng(shape[1])
    for _ in range(30):
        a, b = random_code(rng, shape), random_code(rng, shape)
        if rng.random() < 0.3:  # near matches: b is a turned and a little corrupted
            b = IrisCode(np.roll(a.bits, rng.integers(-5, 6), axis=1) ^ (rng.random((*shape, 2)) < 0.1), b.mask)
        max_shift = int(rng.integers(0, 6))
        assert hamming_distance(a, b, max_shift) == pytest.approx(brute_hamming(a, b, max_shift), nan_ok=True, abs=0)


@pytest.mark.parametrize("shape", [(4, 32), (3, 20)])
def test_pairwise_hamming_counts_bit_by_bit(shape):
    rng = np.random.default_rng(7)
    codes_a = [random_code(rng, shape) for _ in range(9)]
    codes_b = [random_code(rng, shape) for _ in range(6)]
    codes_b[1] = IrisCode(np.roll(codes_a[2].bits, 2, axis=1), codes_a[2].mask)
    hd, bits = pairwise_hamming(codes_a, codes_b, 3, block=4)
    assert hd.shape == bits.shape == (9, 6)
    for i, a in enumerate(codes_a):
        for j, b in enumerate(codes_b):
            expected_hd, expected_bits, _ = brute_hamming(a, b, 3)
            assert bits[i, j] == expected_bits
            assert hd[i, j] == expected_hd or (math.isnan(hd[i, j]) and math.isnan(expected_hd))

    hd, bits = pairwise_hamming(codes_a, None, 3, block=4)
    assert np.isnan(np.diag(hd)).all() and not np.diag(bits).any()
    for i, a in enumerate(codes_a):
        for j, b in enumerate(codes_a):
            if i != j:
                expected_hd, expected_bits, _ = brute_hamming(a, b, 3)
                assert bits[i, j] == expected_bits
                assert hd[i, j] == expected_hd or (math.isnan(hd[i, j]) and math.isnan(expected_hd))


def test_rescaled_hd_by_hand():
    assert rescaled_hd(0.3, 911) == pytest.approx(0.3)
    assert rescaled_hd(0.3, 4 * 911) == pytest.approx(0.5 - 0.2 * 2)
    assert rescaled_hd(0.3, 400, typical_bits=100.0) == pytest.approx(0.1)
    np.testing.assert_allclose(rescaled_hd(np.array([0.5, 0.1]), np.array([911, 911 / 4])), [0.5, 0.3])


def test_degrees_of_freedom_by_hand_and_of_a_binomial():
    assert degrees_of_freedom(np.array([0.4, 0.6, np.nan])) == pytest.approx(0.25 / 0.01)
    n = 250
    hds = np.random.default_rng(0).binomial(n, 0.5, size=40_000) / n
    assert degrees_of_freedom(hds) == pytest.approx(n, rel=0.03)


def brute_eer(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """(FMR + FNMR)/2 where |FMR − FNMR| is least over a fine sweep of thresholds."""
    best = (2.0, 0.0)
    for t in np.linspace(-0.01, 1.01, 20_001):
        fmr, fnmr = np.mean(impostor <= t), np.mean(genuine > t)
        best = min(best, (abs(fmr - fnmr), (fmr + fnmr) / 2))
    return best[1]


def test_equal_error_rate_of_separated_and_overlapping_scores():
    rng = np.random.default_rng(3)
    genuine, impostor = rng.uniform(0.05, 0.3, 200), rng.uniform(0.4, 0.55, 300)
    assert equal_error_rate(genuine, impostor) == (0.0, pytest.approx(genuine.max()))
    genuine, impostor = rng.normal(0.35, 0.05, 300).round(3), rng.normal(0.45, 0.03, 500).round(3)
    eer, threshold = equal_error_rate(genuine, impostor)
    assert 0.05 < eer < 0.3 and 0.35 < threshold < 0.45
    assert eer == pytest.approx(brute_eer(genuine, impostor), abs=1e-12)
    assert eer == pytest.approx((np.mean(impostor <= threshold) + np.mean(genuine > threshold)) / 2)


def rotated(img: np.ndarray, centre: tuple[float, float], degrees: float) -> np.ndarray:
    """The image turned about a point (cv2: positive = anticlockwise on screen, θ decreasing)."""
    matrix = cv2.getRotationMatrix2D(centre, degrees, 1.0)
    return cv2.warpAffine(img, matrix, img.shape[::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def test_code_image_tells_eyes_apart_and_turned_eyes_alike():
    images, records = generate_irises(6, seed=5)
    cfg = CircularityConfig()
    eyes = [to_unit(img)[0] for img in images]
    codes = []
    for eye in eyes:
        code, reason = code_image(eye, cfg)
        assert reason == "" and code.mask.mean() >= 0.5
        codes.append(code)
    for a, b in zip(codes[:-1], codes[1:], strict=True):
        assert 0.4 < hamming_distance(a, b, 10)[0] < 0.6
    for eye, record, code in zip(eyes, records, codes, strict=True):
        turned, reason = code_image(rotated(eye, (record["iris_cx"], record["iris_cy"]), 7.0), cfg)
        assert reason == ""
        hd, bits, shift = hamming_distance(code, turned, 10)
        assert hd < 0.3 and abs(shift - round(-7 / 360 * 256)) <= 1 and bits > 4000


def wedge_of_texture(eye: np.ndarray, record: dict, half_width: float) -> np.ndarray:
    """The eye with its iris texture flattened (to the iris's median) outside |θ| < half_width."""
    x, y = np.meshgrid(np.arange(eye.shape[1]) - record["iris_cx"], np.arange(eye.shape[0]) - record["iris_cy"])
    r = np.hypot(x, y)
    ring = (r > record["pupil_r"] + 2) & (r < record["iris_r"] - 2)
    out = eye.copy()
    out[ring & (np.abs(np.arctan2(y, x)) > half_width)] = np.median(eye[ring])
    return out


def test_the_mask_follows_the_visible_iris():
    images, records = generate_irises(3, seed=5)
    cfg = CircularityConfig()
    for image, record in zip(images, records, strict=True):
        eye = to_unit(image)[0]
        code, reason = code_image(wedge_of_texture(eye, record, 0.5 * np.pi), cfg)
        theta = 2 * np.pi * np.arange(code.mask.shape[1]) / code.mask.shape[1]
        flat = np.abs(np.angle(np.exp(1j * theta))) > 0.6 * np.pi
        assert reason == "" and 0.3 < code.mask.mean() < 0.55 and code.mask[2:-2, flat].mean() < 0.05
        assert code_image(wedge_of_texture(eye, record, 0.15 * np.pi), cfg) == (None, "too little iris visible")


def test_code_image_says_why_not():
    cfg = CircularityConfig()
    assert code_image(np.full((128, 128), 0.6, np.float32), cfg) == (None, "no pupil")
    x, y = np.meshgrid(np.arange(128.0), np.arange(128.0))
    disk = np.where(np.hypot(x - 64, y - 64) < 15, 0.1, 0.6).astype(np.float32)
    assert code_image(disk, cfg) == (None, "no iris boundary")
