"""benchmarks/bench_winograd_bf16.py: its Toom-Cook transforms are Lavin & Gray's on the usual points,
its float64 Winograd convolution is a convolution on every point set, and bf16 rounding shows."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_winograd_bf16 as study  # noqa: E402

from guided_diffusion import winograd  # noqa: E402

# B^T of F(4, 3) on 0, ±1, ±2 (Lavin & Gray 2016, eq. 9), written out by hand
LAVIN_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
LAVIN_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def test_the_usual_points_give_lavin_and_grays_matrices_and_the_projects_g():
    at, g, bt = study.toom_cook((0, 1, -1, 2, -2))
    assert torch.allclose(at, torch.tensor(LAVIN_AT, dtype=torch.float64))
    assert torch.allclose(g, torch.tensor(winograd.G, dtype=torch.float64))
    assert torch.allclose(bt, torch.tensor(LAVIN_BT, dtype=torch.float64), atol=1e-12)


def test_repeated_points_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        study.toom_cook((0, 1, 1, 2, -2))


@pytest.mark.parametrize("points", study.POINTS)
@pytest.mark.parametrize("h, w", [(8, 8), (7, 10)])
def test_unrounded_winograd_is_the_convolution_on_every_point_set(points, h, w):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, h, w, generator=gen, dtype=torch.float64)
    k = torch.randn(3, 5, 3, 3, generator=gen, dtype=torch.float64)
    got = study.winograd_float64(x, k, points, rounded=False)
    assert torch.allclose(got, F.conv2d(x, k, padding=1), atol=1e-11)


def test_bf16_rounding_is_applied_and_costs_accuracy():
    errors = study.layer_accuracy(16, 8)
    assert 1e-4 < errors["direct bf16"] < 1e-2
    for name, err in errors.items():
        if name.startswith("winograd bf16"):
            assert err > 2 * errors["direct bf16"]  # the finding the benchmark reports (~9x at HP1)
    if "winograd float32" in errors:
        assert errors["winograd float32"] < 1e-5


def test_layer_speed_reports_every_variant_and_the_estimate():
    if not winograd.available()[0]:
        pytest.skip(winograd.available()[1])
    ms = study.layer_speed(64, 8, repeats=1)
    assert set(ms) == {"direct bf16", "winograd float32", "products float32", "products bf16", "winograd bf16 (estimate)"}
    assert ms["winograd bf16 (estimate)"] == pytest.approx(
        ms["winograd float32"] - ms["products float32"] + ms["products bf16"], abs=0.02)


@pytest.mark.parametrize("shapes, taken", [
    ([[4, 128, 64, 64], [128, 128, 3, 3], [128]], True),  # a forward: input, weight, bias
    ([[4, 256, 32, 32], [4, 512, 32, 32], [256, 512, 3, 3], []], True),  # a backward: grad out, input, weight
    ([[4, 384, 16, 16], [384, 384, 3, 3], [384]], False),  # maps under winograd.MIN_SIZE
    ([[4, 1, 64, 64], [128, 1, 3, 3], [128]], False),  # the first layer: one channel in
    ([[4, 256, 64, 64], [128, 256, 1, 1], [128]], False),  # a 1x1 skip connection
])
def test_which_profiled_convolutions_winograd_would_take(shapes, taken):
    assert study.takes_winograd(shapes) is taken
