"""Respacing matches openai's `space_timesteps`; strength → t_start is "the kept step nearest s·T"."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from gaussian_oracle import GaussianOracle

from guided_diffusion.errors import DiffusionSettingError
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.samplers import sample, strength_to_t_start
from guided_diffusion.schedules import cosine_betas

# Printed by openai/guided-diffusion's respace.space_timesteps (run verbatim, outside this repo).
OPENAI = {
    (2000, "25"): [0, 83, 167, 250, 333, 416, 500, 583, 666, 750, 833, 916, 999, 1083, 1166, 1249, 1333, 1416,
                   1499, 1583, 1666, 1749, 1832, 1916, 1999],
    (50, "25"): [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49],
    (400, "5,10,15,20"): [0, 25, 50, 74, 99, 100, 111, 122, 133, 144, 155, 166, 177, 188, 199, 200, 207, 214, 221,
                          228, 235, 242, 249, 257, 264, 271, 278, 285, 292, 299, 300, 305, 310, 316, 321, 326, 331,
                          336, 342, 347, 352, 357, 363, 368, 373, 378, 383, 389, 394, 399],
}
OPENAI_MEMBERS = {(200, "99"): ({99}, {100}), (400, "99"): ({85, 257}, {86, 256}),
                  (4000, "99"): ({1999, 2040}, {2000})}  # (kept, not kept)


@pytest.mark.parametrize("case", list(OPENAI), ids=[f"{t}-{s}" for t, s in OPENAI])
def test_respacing_matches_openai_outputs(case):
    assert space_timesteps(*case) == OPENAI[case]


@pytest.mark.parametrize("case", list(OPENAI_MEMBERS), ids=[f"{t}-{s}" for t, s in OPENAI_MEMBERS])
def test_respacing_matches_openai_membership(case):
    kept, dropped = OPENAI_MEMBERS[case]
    steps = set(space_timesteps(*case))
    assert kept <= steps and not dropped & steps and len(steps) == int(case[1])


def _vectorised_openai(T: int, spec: str) -> list[int]:
    """openai's rule rebuilt with NumPy: positions are running sums of the float stride (np.cumsum
    adds left to right like openai's loop), rounded half to even (np.rint)."""
    counts = [int(c) for c in spec.split(",")]
    sizes = np.full(len(counts), T // len(counts)) + (np.arange(len(counts)) < T % len(counts))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out: set[int] = set()
    for start, size, count in zip(starts, sizes, counts, strict=True):
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        positions = np.concatenate([[0.0], np.cumsum(np.full(count - 1, stride))])
        out |= set((start + np.rint(positions)).astype(int).tolist())
    return sorted(out)


GRID = [(T, spec) for T in (50, 100, 200, 250, 300, 400, 500, 1000, 2000, 4000)
        for spec in ("7", "25", "33", "50", "99", "100", "10,20,30", "5,10,15,20", "1,3")
        if all(int(c) <= T // len(spec.split(",")) for c in spec.split(","))]


def test_respacing_grid_matches_a_second_implementation():
    for T, spec in GRID:
        assert space_timesteps(T, spec) == _vectorised_openai(T, spec), (T, spec)


def _nearest_kept(kept: list[int], strength: str, T: int) -> int:
    """Index of the kept step nearest strength·T in exact rational arithmetic, ties to the lower."""
    target = Fraction(strength) * T
    return min(range(len(kept)), key=lambda i: (abs(kept[i] - target), kept[i]))


@pytest.mark.parametrize("spec", ["ddim50", "ddim25", "50", "7,13"])
def test_strength_maps_to_the_kept_step_nearest_strength_times_T(spec):
    """Every strength 0.01 … 0.99 (and 1): T is the original T, not the last kept step + 1."""
    d = SpacedDiffusion(space_timesteps(1000, spec), cosine_betas(1000))
    for k in range(1, 101):
        strength = f"{k / 100:.2f}"
        assert strength_to_t_start(d, float(strength)) == _nearest_kept(d.timestep_map, strength, 1000), strength
    assert d.timestep_map[strength_to_t_start(d, 0.6)] == 600 or spec != "ddim50"
    assert strength_to_t_start(d, 0.0) == -1


def test_strength_nfe_by_counting_evaluations_and_the_diffusers_difference():
    """NFE = t_start + 1, counted on the model. diffusers img2img runs int(s·N) steps instead: at
    s = 0.5 with 50 steps, 25 against our 26 (we denoise from the kept step nearest 500, 510,
    through to the kept step 0 inclusive)."""
    betas = cosine_betas(1000)
    model = GaussianOracle(betas, 0.3, 0.4)
    x0 = torch.zeros(1, 1, 4, 4)
    for spec, strength, nfe, first_t in (("50", 0.5, 26, 510), ("ddim50", 0.5, 26, 500), ("ddim50", 0.6, 31, 600),
                                         ("50", 0.02, 2, 20), ("ddim50", 1.0, 50, 980)):
        d = SpacedDiffusion(space_timesteps(1000, spec), betas)
        model.calls, model.seen_t = 0, []
        sample(model, d, x0.shape, x_start=x0, t_start=strength_to_t_start(d, strength),
               generator=torch.Generator().manual_seed(0))
        assert model.calls == nfe and model.seen_t[0][0].item() == first_t, (spec, strength)
        assert model.calls - int(strength * 50) in (0, 1)  # at most one more than diffusers


def test_bad_strengths():
    d = SpacedDiffusion(space_timesteps(100, "10"), cosine_betas(100))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(DiffusionSettingError, match="strength"):
            strength_to_t_start(d, bad)
