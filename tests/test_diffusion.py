"""Gaussian diffusion maths checked against independent computations."""

import math

import numpy as np
import pytest
import torch
from gaussian_oracle import GaussianOracle
from torch import nn

from guided_diffusion.diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from guided_diffusion.errors import DiffusionSettingError
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.schedules import cosine_betas, linear_betas
from guided_diffusion.timestep_sampler import create_timestep_sampler


def _t(*vals):
    return torch.tensor(vals, dtype=torch.long)


# ----- forward process and posterior -------------------------------------------------------

def test_q_sample_closed_form():
    betas = linear_betas(100)
    d = GaussianDiffusion(betas)
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = _t(0, 50, 99)
    abar = np.prod(1 - betas[None, :] * (np.arange(100)[None, :] <= np.array([0, 50, 99])[:, None]), axis=1)
    expected = torch.from_numpy(np.sqrt(abar)).float().view(3, 1, 1, 1) * x0 + \
        torch.from_numpy(np.sqrt(1 - abar)).float().view(3, 1, 1, 1) * noise
    torch.testing.assert_close(d.q_sample(x0, t, noise), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("betas", [linear_betas(200), cosine_betas(200)])
def test_posterior_matches_gaussian_conditioning(betas):
    """q(x_{t−1} | x_t, x_0) from the joint covariance of (x_{t−1}, x_t) and the Schur complement."""
    d = GaussianDiffusion(betas)
    ts = np.array([1, 7, 100, 199])
    x0, xt = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    mean, var, _ = d.q_posterior_mean_variance(x0.float(), xt.float(), torch.from_numpy(ts))
    for k, t in enumerate(ts):
        abar_prev = np.prod(1 - betas[:t])  # ᾱ_{t−1}
        alpha = 1 - betas[t]
        # x_{t−1} = √ᾱ_{t−1} x0 + √(1−ᾱ_{t−1}) ε₁ ;  x_t = √α x_{t−1} + √β ε₂
        cov = np.array([[1 - abar_prev, math.sqrt(alpha) * (1 - abar_prev)],
                        [math.sqrt(alpha) * (1 - abar_prev), alpha * (1 - abar_prev) + betas[t]]])
        m_prev = math.sqrt(abar_prev) * x0[k]
        m_t = math.sqrt(alpha * abar_prev) * x0[k]
        cond_mean = m_prev + cov[0, 1] / cov[1, 1] * (xt[k] - m_t)
        cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
        torch.testing.assert_close(mean[k].double(), cond_mean, rtol=1e-4, atol=1e-5)
        assert var[k].flatten()[0].item() == pytest.approx(cond_var, rel=1e-5)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_parameterisations_recover_x0_and_eps(mean_type):
    """A network that outputs the exact target gives back x_0 and ε."""
    betas = cosine_betas(100)
    abar = np.cumprod(1 - betas)
    d = GaussianDiffusion(betas, mean_type=mean_type)
    x0, noise = torch.rand(4, 2, 5, 5) * 2 - 1, torch.randn(4, 2, 5, 5)
    t = _t(0, 10, 60, 99)
    a = torch.from_numpy(abar[t.numpy()]).float().view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[mean_type]
    out = d.p_mean_variance(lambda x, tt: target, xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out["eps"][1:], noise[1:], rtol=1e-3, atol=2e-3)  # t=0: ε barely visible
    # the training loss of this perfect network is 0
    losses = d.training_losses(lambda x, tt: target, x0, t, noise=noise)
    assert losses["loss"].abs().max() < 1e-8


def test_variance_types():
    betas = linear_betas(100)
    small = GaussianDiffusion(betas, var_type="fixed_small")
    large = GaussianDiffusion(betas, var_type="fixed_large")
    learned = GaussianDiffusion(betas, var_type="learned_range")
    x, t = torch.zeros(3, 1, 2, 2), _t(0, 1, 99)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    tilde = betas * (1 - abar_prev) / (1 - abar)  # β̃_t
    v_small = small.p_mean_variance(lambda x, t: x, x, t)["variance"][:, 0, 0, 0].double().numpy()
    v_large = large.p_mean_variance(lambda x, t: x, x, t)["variance"][:, 0, 0, 0].double().numpy()
    np.testing.assert_allclose(v_small, tilde[[0, 1, 99]], rtol=1e-5)
    np.testing.assert_allclose(v_large, [tilde[1], betas[1], betas[99]], rtol=1e-5)
    # learned: frac = 0.5 → geometric mean of β_t and β̃_t (β̃ clipped to β̃_1 at t = 0)
    oracle = GaussianOracle(betas, 0.0, 0.5, learned_frac=0.5)
    v_learned = learned.p_mean_variance(oracle, x, t)["variance"][:, 0, 0, 0].double().numpy()
    tilde_clipped = np.append(tilde[1], tilde[1:])
    np.testing.assert_allclose(v_learned, np.sqrt(betas * tilde_clipped)[[0, 1, 99]], rtol=1e-5)
    for frac, expected in ((0.0, tilde_clipped), (1.0, betas)):
        o = GaussianOracle(betas, 0.0, 0.5, learned_frac=frac)
        v = learned.p_mean_variance(o, x, t)["variance"][:, 0, 0, 0].double().numpy()
        np.testing.assert_allclose(v, expected[[0, 1, 99]], rtol=1e-5)


def test_bad_names_are_user_errors():
    for kw in ({"mean_type": "score"}, {"var_type": "learned"}, {"loss_type": "l1"},
               {"loss_type": "hybrid", "var_type": "fixed_small"}):
        with pytest.raises(DiffusionSettingError):
            GaussianDiffusion(cosine_betas(10), **kw)


# ----- KL, likelihood, bits/dim ------------------------------------------------------------

def test_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    x = m1 + math.exp(0.5 * lv1) * torch.randn(400_000, generator=g, dtype=torch.float64)
    p = torch.distributions.Normal(m1, math.exp(0.5 * lv1))
    q = torch.distributions.Normal(m2, math.exp(0.5 * lv2))
    mc = (p.log_prob(x) - q.log_prob(x)).mean().item()
    kl = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item()
    assert kl == pytest.approx(mc, abs=5e-3)
    assert normal_kl(torch.tensor(0.1), torch.tensor(0.2), torch.tensor(0.1), torch.tensor(0.2)) == 0


@pytest.mark.parametrize("mean,sigma", [(0.0, 0.01), (0.37, 0.2), (-0.9, 0.05), (0.999, 0.3), (0.5, 3.0)])
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean, sigma):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    ll = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(sigma)))
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # an interior bin equals Φ((x+1/255−μ)/σ) − Φ((x−1/255−μ)/σ) computed with math.erf

    def cdf(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    k = 128
    xv = x[k].item()
    expected = cdf((xv + 1 / 255 - mean) / sigma) - cdf((xv - 1 / 255 - mean) / sigma)
    assert ll[k].exp().item() == pytest.approx(expected, rel=1e-6, abs=1e-11)  # log is floored at 1e-12


def test_calc_bpd_loop_oracle_beats_zero_model():
    betas = linear_betas(50)
    d = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (4, 1, 8, 8), generator=g).float() / 127.5 - 1).clamp(-1, 1) * 0.3
    mu, s = 0.0, x0.std().item()
    torch.manual_seed(0)
    good = d.calc_bpd_loop(GaussianOracle(betas, mu, s), x0, clip_denoised=False)
    torch.manual_seed(0)
    bad = d.calc_bpd_loop(lambda x, t: torch.zeros_like(x), x0, clip_denoised=False)
    assert good["vb"].shape == (4, 50) and good["total_bpd"].shape == (4,)
    torch.testing.assert_close(good["total_bpd"], good["vb"].sum(1) + good["prior_bpd"])
    # prior term: KL(N(√ᾱ_T x0, 1−ᾱ_T) ‖ N(0, 1)) averaged over pixels, in bits
    abar = np.prod(1 - betas)
    x = x0.double().flatten(1)
    prior = (0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * x**2)).mean(1) / math.log(2)
    torch.testing.assert_close(good["prior_bpd"].double(), prior, rtol=1e-4, atol=1e-6)
    assert (good["total_bpd"] > 0).all()
    assert (good["total_bpd"] < bad["total_bpd"]).all()


def test_vb_term_at_t0_is_the_decoder_nll_and_kl_elsewhere():
    betas = cosine_betas(100)
    d = GaussianDiffusion(betas, var_type="fixed_large")
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 256, (3, 1, 4, 4), generator=g).double() / 127.5 - 1  # on the 8-bit grid
    model = GaussianOracle(betas, 0.0, 0.5)
    t = _t(0, 0, 40)
    xt = d.q_sample(x0.float(), t, torch.randn(x0.shape, generator=g))
    out = d.vb_terms_bpd(model, x0.float(), xt, t, clip_denoised=False)["output"]
    p = d.p_mean_variance(model, xt, t, clip_denoised=False)
    # t = 0: −log of the Gaussian mass of each pixel's bin, edge bins open, in bits/dim
    law = torch.distributions.Normal(p["mean"].double(), p["variance"].double().sqrt())
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), law.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), law.cdf(x0 - 1 / 255))
    nll = -torch.log(upper - lower).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(out[:2].double(), nll[:2], rtol=1e-4, atol=1e-5)
    # t > 0: KL between the true posterior and p_θ, in bits/dim
    mean, _, log_var = d.q_posterior_mean_variance(x0.float(), xt, t)
    kl = normal_kl(mean, log_var, p["mean"], p["log_variance"]).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(out[2], kl[2])


# ----- training losses ---------------------------------------------------------------------

class _TwoHeads(nn.Module):
    """Output = [a·x_t (mean head), b·x_t (variance head)] with separate parameters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.b = nn.Parameter(torch.tensor(0.2))

    def forward(self, x, t):
        return torch.cat([self.a * x, torch.tanh(self.b * x)], dim=1)


def test_hybrid_vb_term_does_not_train_the_mean():
    d = GaussianDiffusion(linear_betas(100), var_type="learned_range", loss_type="hybrid", hybrid_lambda=0.001)
    model = _TwoHeads()
    x0, t = torch.rand(4, 2, 4, 4) * 2 - 1, _t(0, 3, 50, 99)
    terms = d.training_losses(model, x0, t, noise=torch.randn_like(x0))
    assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (4,) for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * 100 * terms["vb"])
    ga, gb = torch.autograd.grad(terms["vb"].sum(), [model.a, model.b], allow_unused=True, retain_graph=True)
    assert ga is None or ga.abs().item() == 0.0
    assert gb.abs().item() > 0
    ga, gb = torch.autograd.grad(terms["mse"].sum(), [model.a, model.b], allow_unused=True)
    assert ga.abs().item() > 0 and (gb is None or gb.abs().item() == 0.0)


def test_loss_types_weight_the_vb_term():
    model, x0, t = _TwoHeads(), torch.rand(2, 2, 4, 4) * 2 - 1, _t(5, 80)
    noise = torch.randn_like(x0)
    out = {}
    for lt in ("mse", "rescaled_mse", "hybrid"):
        d = GaussianDiffusion(linear_betas(4000), var_type="learned_range", loss_type=lt, hybrid_lambda=0.002)
        out[lt] = d.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(out["mse"]["loss"], out["mse"]["mse"] + out["mse"]["vb"])
    torch.testing.assert_close(out["rescaled_mse"]["loss"], out["mse"]["mse"] + 4.0 * out["mse"]["vb"])
    torch.testing.assert_close(out["hybrid"]["loss"], out["mse"]["mse"] + 8.0 * out["mse"]["vb"])
    fixed = GaussianDiffusion(linear_betas(100)).training_losses(lambda x, t: x[:, :2] * 0, x0, _t(1, 2))
    assert set(fixed) == {"loss", "mse"}
    torch.testing.assert_close(fixed["loss"], x0.new_ones(2), atol=0.5, rtol=0)  # E[ε²] = 1


def test_training_losses_are_fp32_under_autocast():
    d = GaussianDiffusion(linear_betas(50), var_type="learned_range", loss_type="hybrid")
    conv = nn.Conv2d(1, 2, 3, padding=1)
    x0, t = torch.rand(2, 1, 8, 8), _t(0, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x0).dtype == torch.bfloat16
        terms = d.training_losses(lambda x, tt: conv(x), x0, t)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in terms.values())


# ----- respacing ---------------------------------------------------------------------------

def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(4000, "ddim50") == list(range(0, 4000, 80))
    assert space_timesteps(100, "100") == list(range(100))
    kept = space_timesteps(300, "10,20,20")
    assert len(kept) == 50
    assert sum(k < 100 for k in kept) == 10 and sum(100 <= k < 200 for k in kept) == 20
    assert {0, 99, 100, 199, 200, 299} <= set(kept)
    s250 = space_timesteps(4000, 250)
    assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 3999
    assert max(np.diff(s250)) - min(np.diff(s250)) <= 1  # evenly spread
    for bad in ("ddimx", "ten", "0", "5000", "ddim7000"):
        with pytest.raises(DiffusionSettingError):
            space_timesteps(4000, bad)


def test_spaced_diffusion_keeps_alphas_cumprod_and_maps_timesteps():
    betas = cosine_betas(1000)
    base = GaussianDiffusion(betas)
    use = space_timesteps(1000, "10,15")
    sd = SpacedDiffusion(use, betas)
    assert sd.num_timesteps == len(use) and sd.timestep_map == use
    np.testing.assert_allclose(sd.alphas_cumprod, base.alphas_cumprod[use], rtol=1e-9)
    oracle = GaussianOracle(betas, 0.0, 0.5)
    sd.p_mean_variance(oracle, torch.zeros(2, 1, 2, 2), _t(0, len(use) - 1))
    assert oracle.seen_t[-1].tolist() == [use[0], use[-1]]
    # the same ᾱ at a kept step gives the same x̂_0 as the base process
    x, i = torch.randn(1, 1, 4, 4), 7
    a = sd.p_mean_variance(oracle, x, _t(i), clip_denoised=False)["pred_xstart"]
    b = base.p_mean_variance(oracle, x, _t(use[i]), clip_denoised=False)["pred_xstart"]
    torch.testing.assert_close(a, b)


# ----- timestep samplers -------------------------------------------------------------------

def test_uniform_sampler_seeded():
    d = GaussianDiffusion(cosine_betas(10))
    s = create_timestep_sampler("uniform", d)
    t1, w1 = s.sample(500, "cpu", torch.Generator().manual_seed(3))
    t2, _ = s.sample(500, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.dtype == torch.long and (w1 == 1).all()
    assert set(t1.tolist()) == set(range(10))
    with pytest.raises(DiffusionSettingError, match="uniform, loss_aware"):
        create_timestep_sampler("importance", d)


def test_loss_aware_sampler_importance_weights_are_unbiased():
    T = 20
    d = GaussianDiffusion(cosine_betas(T))
    s = create_timestep_sampler("loss_aware", d)
    true_loss = np.linspace(0.1, 2.0, T) ** 2
    g = torch.Generator().manual_seed(0)
    while not s.warmed_up():
        t, w = s.sample(64, "cpu", g)
        assert (w == 1).all()  # uniform until every t has its history
        s.update_with_losses(t, torch.from_numpy(true_loss[t.numpy()]))
    p = s.probabilities()
    expected = true_loss / true_loss.sum()  # constant losses → RMS = the loss
    np.testing.assert_allclose(p, 0.999 * expected + 0.001 / T, rtol=1e-9)
    t, w = s.sample(200_000, "cpu", g)
    estimate = (w.double() * torch.from_numpy(true_loss[t.numpy()])).mean().item()
    assert estimate == pytest.approx(true_loss.mean(), rel=0.01)
    s2 = create_timestep_sampler("loss_aware", d)
    s2.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(s2.probabilities(), p)
    with pytest.raises(DiffusionSettingError):
        create_timestep_sampler("loss_aware", GaussianDiffusion(cosine_betas(5))).load_state_dict(s.state_dict())
