"""Samplers driven by an exact Gaussian "denoiser" (tests/gaussian_oracle.py).

For Gaussian data every sampler step is an affine map of x plus Gaussian noise, so the law of
the output is N(m, v) with (m, v) computable step by step in scalar float64 (`_expected_law`);
samples must match that within sampling error, and match the data (μ, s) itself when the
steps are fine enough.
"""

import math

import numpy as np
import pytest
import torch
from gaussian_oracle import GaussianOracle

from guided_diffusion.diffusion import GaussianDiffusion
from guided_diffusion.errors import DiffusionSettingError
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.samplers import ddim_reverse, sample, strength_to_t_start
from guided_diffusion.schedules import cosine_betas, linear_betas

MU, S = 0.3, 0.4
SHAPE = (4, 1, 64, 64)  # 16384 independent pixels: standard error of the mean ≈ 0.003


def _expected_law(betas, kept, sampler, var, start_index, from_noise):
    """(mean, std) of the sampler's output for N(MU, S²) data, by propagating scalar moments."""
    abar_all = np.cumprod(1 - betas)
    a = abar_all[kept]
    if from_noise:
        m, v = 0.0, 1.0
    else:
        m, v = math.sqrt(a[start_index]) * MU, a[start_index] * S**2 + 1 - a[start_index]
    for i in range(start_index, -1, -1):
        ai, ap = a[i], (a[i - 1] if i > 0 else 1.0)
        beta = 1 - ai / ap
        tilde = beta * (1 - ap) / (1 - ai)
        k = math.sqrt(1 - ai) / (ai * S**2 + 1 - ai)  # ε̂ = k (x − √a μ)
        # x̂0 = (x − √(1−a) ε̂)/√a = p x + q
        p = (1 - math.sqrt(1 - ai) * k) / math.sqrt(ai)
        q = math.sqrt(1 - ai) * k * MU
        if sampler == "ddim":
            A = math.sqrt(ap) * p + math.sqrt(1 - ap) * k
            B = math.sqrt(ap) * q - math.sqrt(1 - ap) * k * math.sqrt(ai) * MU
            sigma2 = 0.0
        else:
            c1, c2 = beta * math.sqrt(ap) / (1 - ai), (1 - ap) * math.sqrt(1 - beta) / (1 - ai)
            A, B = c1 * p + c2, c1 * q
            sigma2 = 0.0 if i == 0 else {"small": tilde, "large": beta,
                                          "geo": math.sqrt(beta * tilde)}[var]
        m, v = A * m + B, A * A * v + sigma2
    return m, math.sqrt(v)


def _check(x, mean, std, tol_mean=0.01, tol_std=0.01):
    assert x.mean().item() == pytest.approx(mean, abs=tol_mean)
    assert x.std().item() == pytest.approx(std, abs=tol_std)


CASES = [  # (label, T, schedule, respacing, sampler, var_type)
    ("ddpm-full", 200, "linear", None, "ddpm", "fixed_small"),
    ("ddpm-50", 1000, "linear", "50", "ddpm", "fixed_small"),
    ("ddpm-large-50", 1000, "cosine", "50", "ddpm", "fixed_large"),
    ("ddpm-learned-50", 1000, "linear", "10,20,20", "ddpm", "learned_range"),
    ("ddim-50", 1000, "linear", "ddim50", "ddim", "fixed_small"),
    ("ddim-cosine-25", 400, "cosine", "ddim25", "ddim", "fixed_small"),
]


@pytest.mark.parametrize("label,T,schedule,respacing,sampler,var_type", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_oracle_samples_have_the_expected_law(label, T, schedule, respacing, sampler, var_type, strength):
    betas = linear_betas(T) if schedule == "linear" else cosine_betas(T)
    kept = space_timesteps(T, respacing) if respacing else list(range(T))
    d = SpacedDiffusion(kept, betas, var_type=var_type)
    model = GaussianOracle(betas, MU, S, learned_frac=0.5 if var_type == "learned_range" else None)
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(SHAPE, generator=g) if strength < 1 else None
    start = strength_to_t_start(d, strength)
    x = sample(model, d, SHAPE, sampler=sampler, generator=g, clip_denoised=False, x_start=x0, t_start=start)
    var = {"fixed_small": "small", "fixed_large": "large", "learned_range": "geo"}[var_type]
    mean, std = _expected_law(betas, kept, sampler, var, start, from_noise=strength == 1.0)
    _check(x, mean, std)
    assert mean == pytest.approx(MU, abs=0.01)  # every sampler keeps the mean
    if label == "ddpm-full":  # with all the steps the data law itself comes back
        _check(x, MU, S, tol_std=0.02)
    # the network always saw original timesteps, from t_start down to 0
    seen = [t[0].item() for t in model.seen_t]
    assert seen == [kept[i] for i in range(start, -1, -1)]


def test_fine_ddim_recovers_the_data_law():
    betas = linear_betas(1000)
    d = SpacedDiffusion(space_timesteps(1000, "ddim500"), betas)
    x = sample(GaussianOracle(betas, MU, S), d, SHAPE, generator=torch.Generator().manual_seed(1),
               clip_denoised=False)
    _check(x, MU, S)


def test_ddim_eta_one_equals_ddpm_fixed_small():
    """DDIM with η = 1 is the DDPM ancestral sampler (Song et al. sec. 4.1); same noise → same x."""
    betas = cosine_betas(300)
    d = SpacedDiffusion(space_timesteps(300, "30"), betas)
    model = GaussianOracle(betas, MU, S)
    a = sample(model, d, (2, 1, 16, 16), sampler="ddpm", generator=torch.Generator().manual_seed(5))
    b = sample(model, d, (2, 1, 16, 16), sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_same_seed_same_images(sampler, eta):
    betas = cosine_betas(100)
    d = SpacedDiffusion(space_timesteps(100, "10"), betas)
    model = GaussianOracle(betas, MU, S)
    runs = [sample(model, d, (2, 1, 8, 8), sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_ddim_reverse_then_forward_reconstructs():
    """Inversion is first order in the step size: the error is small and halves with twice the steps."""
    betas = linear_betas(1000)
    model = GaussianOracle(betas, MU, S)
    x0 = MU + S * torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    errors = []
    for spacing in ("ddim125", "ddim250"):
        d = SpacedDiffusion(space_timesteps(1000, spacing), betas)
        xT = ddim_reverse(model, d, x0)
        assert xT.std().item() == pytest.approx(1.0, abs=0.05)  # inverted latents look like noise
        back = sample(model, d, x0.shape, sampler="ddim", noise=xT, clip_denoised=False)
        errors.append((back - x0).abs().max().item())
    assert errors[1] < 0.03 and errors[1] < 0.6 * errors[0], errors
    other = sample(model, d, x0.shape, noise=torch.randn_like(x0), clip_denoised=False)
    assert (other - x0).abs().max() > 0.5  # unlike an unrelated noise


def test_t_start_semantics_and_nfe():
    """The caller owns the schedule: t_start −1 returns the prior, else t_start + 1 evaluations
    at the kept steps t_start … 0; pure noise starts at the last index."""
    betas = cosine_betas(1000)
    d = SpacedDiffusion(space_timesteps(1000, "ddim50"), betas)  # kept 0, 20, …, 980
    model = GaussianOracle(betas, MU, S)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    out = sample(model, d, x0.shape, x_start=x0, t_start=-1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x0) and model.calls == 0
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    a = sample(model, d, x0.shape, noise=noise, t_start=49)
    b = sample(model, d, x0.shape, noise=noise)
    assert torch.equal(a, b) and model.calls == 2 * 50
    model.calls, model.seen_t = 0, []
    x, steps = sample(model, d, x0.shape, x_start=x0, t_start=25, return_intermediates=True,
                      generator=torch.Generator().manual_seed(2))
    assert model.calls == 26 and [t[0].item() for t in model.seen_t] == list(range(500, -1, -20))
    assert len(steps) == 27 and torch.equal(steps[-1], x)
    with pytest.raises(DiffusionSettingError, match="ddim, ddpm, dpm"):
        sample(model, d, x0.shape, sampler="euler")
    with pytest.raises(DiffusionSettingError):
        sample(model, d, (3, 1, 8, 8), x_start=x0, t_start=10)
    for bad in (-2, 50):
        with pytest.raises(DiffusionSettingError, match="t_start"):
            sample(model, d, x0.shape, x_start=x0, t_start=bad)
    with pytest.raises(DiffusionSettingError, match="needs x_start"):
        sample(model, d, x0.shape, t_start=10)


def test_progress_bar_runs():
    betas = cosine_betas(50)
    d = GaussianDiffusion(betas)
    x = sample(GaussianOracle(betas, MU, S), d, (1, 1, 4, 4), progress=True, generator=torch.Generator())
    assert torch.isfinite(x).all()


def _ode_exact(x_t, abar):
    """Where the probability-flow ODE takes x_t for N(MU, S²) data: it keeps the standardised value,
    x_0 = MU + S (x_t − √ᾱ MU)/√(ᾱ S² + 1 − ᾱ) (the monotone map between two Gaussians)."""
    return MU + S * (x_t.double() - math.sqrt(abar) * MU) / math.sqrt(abar * S**2 + 1 - abar)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_2m_is_closer_to_the_ode_solution_than_ddim(schedule):
    """With the exact x̂_0 of Gaussian data, DPM-Solver++(2M) at 10-20 steps beats DDIM at the same
    steps, from noise and from a partial t_start, and converges at second order."""
    betas = linear_betas(1000) if schedule == "linear" else cosine_betas(1000)
    abar = np.cumprod(1 - betas)
    model = GaussianOracle(betas, MU, S)
    g = torch.Generator().manual_seed(0)
    x_T, x0, noise = (torch.randn(2, 1, 16, 16, generator=g) for _ in range(3))
    x0 = MU + S * x0
    errors = {}
    for steps in ("10", "20", "40"):
        d = SpacedDiffusion(space_timesteps(1000, steps), betas)
        k = len(d.timestep_map) // 2
        a_k = abar[d.timestep_map[k]]
        x_t = math.sqrt(a_k) * x0 + math.sqrt(1 - a_k) * noise
        for sampler in ("ddim", "dpm++2m"):
            full = sample(model, d, x_T.shape, sampler=sampler, noise=x_T, clip_denoised=False)
            part = sample(model, d, x0.shape, sampler=sampler, x_start=x0, t_start=k, noise=noise,
                          clip_denoised=False)
            errors[sampler, steps] = max((full - _ode_exact(x_T, abar[d.timestep_map[-1]])).abs().mean().item(),
                                         (part - _ode_exact(x_t, a_k)).abs().mean().item())
    for steps in ("10", "20", "40"):
        assert errors["dpm++2m", steps] < 0.9 * errors["ddim", steps], errors
    assert errors["dpm++2m", "40"] < errors["dpm++2m", "20"] / 3 < errors["dpm++2m", "10"] / 6, errors  # ≈ h²
    assert errors["ddim", "40"] > errors["ddim", "20"] / 2.5  # DDIM: first order, ≈ h


def test_dpmpp_2m_first_step_is_ddim_and_sees_each_step_once():
    betas = cosine_betas(400)
    d = SpacedDiffusion(space_timesteps(400, "ddim20"), betas)
    model = GaussianOracle(betas, MU, S)
    x0 = MU + S * torch.randn(2, 1, 8, 8)
    noise = torch.randn(2, 1, 8, 8)
    runs = {s: sample(model, d, x0.shape, sampler=s, x_start=x0, t_start=12, noise=noise, return_intermediates=True)
            for s in ("ddim", "dpm++2m")}
    torch.testing.assert_close(runs["dpm++2m"][1][1], runs["ddim"][1][1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(runs["dpm++2m"][1][3], runs["ddim"][1][3], atol=1e-4)  # then second order
    assert model.calls == 2 * 13
    # no randomness: a generator is never drawn from
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    sample(model, d, x0.shape, sampler="dpm++2m", x_start=x0, t_start=12, noise=noise, generator=g)
    assert torch.equal(g.get_state(), state)
