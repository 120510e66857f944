"""Gaussian diffusion maths (DDPM, Ho et al. 2020; Improved DDPM, Nichol & Dhariwal 2021).

Notation: β_t the schedule, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, x_0 the data, x_t the noised
image, ε the noise. Index t runs 0..T−1 (paper's t = 1..T). Tables are float64 NumPy; every
lookup becomes float32 on the input's device, and all maths after the model call is float32
even under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from guided_diffusion.errors import DiffusionSettingError

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "hybrid")


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise DiffusionSettingError(f"unknown {kind} '{value}'; valid: {', '.join(valid)}")


def fp32(x: Tensor) -> torch.autocast:
    """Context in which autocast is off for x's device, so the maths stays float32."""
    return torch.autocast(x.device.type, enabled=False)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) elementwise, in nats:
    ½(−1 + log σ₂² − log σ₁² + σ₁²/σ₂² + (μ₁ − μ₂)²/σ₂²)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of 8-bit data scaled to [−1, 1] under N(mean, σ²) integrated over each pixel's bin
    (DDPM eq. 13): bins of width 2/255, the edge bins extend to ±∞. Elementwise, in nats."""
    inv_sigma = torch.exp(-log_scales)
    centred = x - means
    upper = inv_sigma * (centred + 1.0 / 255)
    lower = inv_sigma * (centred - 1.0 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper), for the x = −1 bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log(1 − Φ(lower)), for the x = +1 bin
    # Φ(upper) − Φ(lower) without cancellation: use the tail that is small.
    delta = torch.where(
        centred > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_delta = torch.log(delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


class GaussianDiffusion:
    """The forward process q and the learned reverse process p_θ of a discrete diffusion.

    mean_type: what the network predicts — "eps" (ε), "x0" (x_0) or "v" (v = √ᾱ ε − √(1−ᾱ) x_0).
    var_type: Σ_θ — "fixed_small" (β̃_t), "fixed_large" (β_t) or "learned_range"
    (Improved DDPM eq. 15: exp(v log β_t + (1−v) log β̃_t), v from the network's extra channels).
    loss_type: "mse" (L_simple, plus the VLB term with weight 1 when the variance is learned),
    "rescaled_mse" (VLB weight T/1000) or "hybrid" (L_simple + λ·L_vlb, L_vlb ≈ T·L_t).
    """

    def __init__(
        self,
        betas: np.ndarray,
        mean_type: str = "eps",
        var_type: str = "fixed_small",
        loss_type: str = "mse",
        hybrid_lambda: float = 0.001,
    ):
        _check_choice("mean_type", mean_type, MEAN_TYPES)
        _check_choice("var_type", var_type, VAR_TYPES)
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        if loss_type == "hybrid" and var_type != "learned_range":
            raise DiffusionSettingError("loss_type 'hybrid' trains the variance: it needs var_type 'learned_range'")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1)")
        if len(betas) < 2:
            raise DiffusionSettingError(f"a diffusion needs at least 2 steps, got {len(betas)}")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.hybrid_lambda = float(hybrid_lambda)
        self.num_timesteps = T = len(betas)
        self.timestep_map: list[int] = list(range(T))  # respaced index → original t (identity here)

        self.betas = betas  # β_t
        alphas = 1.0 - betas  # α_t
        self.alphas_cumprod = np.cumprod(alphas)  # ᾱ_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # ᾱ_{t−1}, ᾱ_{−1} = 1
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)  # ᾱ_{t+1}
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev

        self.sqrt_alphas_cumprod = np.sqrt(abar)  # √ᾱ_t
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - abar)  # √(1−ᾱ_t)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - abar)  # log(1−ᾱ_t)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)  # 1/√ᾱ_t
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1.0)  # √(1/ᾱ_t − 1)

        # q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I)  (DDPM eqs. 6-7)
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)  # β̃_t
        # β̃_0 = 0; its log is clipped to log β̃_1 so the learned interpolation stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)  # coefficient of x_0
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)  # of x_t
        # "fixed_large" uses β_t, with β̃_1 at t = 0 so the decoder's likelihood is not too wide.
        self.large_variance = np.append(self.posterior_variance[1], betas[1:])
        self._tables: dict[tuple[str, torch.device], Tensor] = {}

    # ----- lookups -------------------------------------------------------------------------

    def table(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """Table `name` at timesteps t, float32 on t's device, shaped (B, 1, …, 1) to broadcast."""
        key = (name, t.device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(getattr(self, name)).float().to(t.device)
        return self._tables[key][t].view(-1, *([1] * (ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timesteps the network sees (original ones; identity here, remapped when respaced)."""
        return t

    def call_model(self, model: Callable, x: Tensor, t: Tensor, model_kwargs: dict | None = None) -> Tensor:
        """Run the network on (x_t, t) and return its output as float32."""
        return model(x, self.model_timesteps(t), **(model_kwargs or {})).float()

    # ----- forward process q ---------------------------------------------------------------

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I): (mean, variance, log variance)."""
        n = x_start.ndim
        mean = self.table("sqrt_alphas_cumprod", t, n) * x_start
        var = (1.0 - self.table("alphas_cumprod", t, n)).expand_as(x_start)
        return mean, var, self.table("log_one_minus_alphas_cumprod", t, n).expand_as(x_start)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε  (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        n = x_start.ndim
        return (self.table("sqrt_alphas_cumprod", t, n) * x_start
                + self.table("sqrt_one_minus_alphas_cumprod", t, n) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """μ̃_t = β_t√ᾱ_{t−1}/(1−ᾱ_t) x_0 + (1−ᾱ_{t−1})√α_t/(1−ᾱ_t) x_t and β̃_t (DDPM eq. 7):
        (mean, variance, clipped log variance)."""
        n = x_t.ndim
        mean = self.table("posterior_mean_coef1", t, n) * x_start + self.table("posterior_mean_coef2", t, n) * x_t
        var = self.table("posterior_variance", t, n).expand_as(x_t)
        log_var = self.table("posterior_log_variance_clipped", t, n).expand_as(x_t)
        return mean, var, log_var

    # ----- conversions between parameterisations -------------------------------------------

    def pred_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε."""
        n = x_t.ndim
        return self.table("sqrt_recip_alphas_cumprod", t, n) * x_t - self.table("sqrt_recipm1_alphas_cumprod", t, n) * eps

    def eps_from_pred_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """ε = (x_t/√ᾱ_t − x̂_0)/√(1/ᾱ_t − 1)."""
        n = x_t.ndim
        return ((self.table("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart)
                / self.table("sqrt_recipm1_alphas_cumprod", t, n))

    def pred_xstart_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v  (Salimans & Ho 2022)."""
        n = x_t.ndim
        return self.table("sqrt_alphas_cumprod", t, n) * x_t - self.table("sqrt_one_minus_alphas_cumprod", t, n) * v

    def v_target(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = √ᾱ_t ε − √(1−ᾱ_t) x_0."""
        n = x_start.ndim
        return self.table("sqrt_alphas_cumprod", t, n) * noise - self.table("sqrt_one_minus_alphas_cumprod", t, n) * x_start

    # ----- reverse process p_θ -------------------------------------------------------------

    def p_mean_variance(self, model: Callable, x: Tensor, t: Tensor, clip_denoised: bool = True,
                        model_kwargs: dict | None = None) -> dict[str, Tensor]:
        """p_θ(x_{t−1} | x_t) = N(μ_θ, Σ_θ): dict with mean, variance, log_variance, pred_xstart
        (x̂_0, clipped to [−1, 1] if asked) and eps (the ε̂ consistent with that x̂_0)."""
        output = self.call_model(model, x, t, model_kwargs)
        with fp32(x):
            return self.p_mean_variance_from_output(output, x.float(), t, clip_denoised)

    def p_mean_variance_from_output(self, output: Tensor, x: Tensor, t: Tensor,
                                    clip_denoised: bool = True) -> dict[str, Tensor]:
        """As `p_mean_variance`, given the network's (float32) output."""
        C = x.shape[1]
        n = x.ndim
        if self.var_type == "learned_range":
            if output.shape[1] != 2 * C:
                raise ValueError(f"learned_range needs {2 * C} output channels, got {output.shape[1]}")
            output, v = output[:, :C], output[:, C:]
            frac = (v + 1) / 2  # network output in [−1, 1] → interpolation weight in [0, 1]
            log_var = (frac * torch.log(self.table("betas", t, n))  # log Σ = v log β_t + (1−v) log β̃_t
                       + (1 - frac) * self.table("posterior_log_variance_clipped", t, n))
            var = torch.exp(log_var)
        else:
            table = "posterior_variance" if self.var_type == "fixed_small" else "large_variance"
            var = self.table(table, t, n).expand_as(x)
            if self.var_type == "fixed_small":
                log_var = self.table("posterior_log_variance_clipped", t, n).expand_as(x)
            else:
                log_var = torch.log(var)

        if self.mean_type == "eps":
            pred_xstart = self.pred_xstart_from_eps(x, t, output)
        elif self.mean_type == "x0":
            pred_xstart = output
        else:
            pred_xstart = self.pred_xstart_from_v(x, t, output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        if self.mean_type == "eps" and not clip_denoised:
            eps = output
        else:
            eps = self.eps_from_pred_xstart(x, t, pred_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)  # μ_θ = μ̃_t(x̂_0, x_t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

    # ----- variational bound ---------------------------------------------------------------

    def _vb_from_output(self, output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor,
                        clip_denoised: bool) -> dict[str, Tensor]:
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(output, x_t, t, clip_denoised)
        # L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)), in bits per dimension
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        # L_0 = −log p_θ(x_0|x_1), the discretised decoder (DDPM eq. 13), in bits per dimension
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def vb_terms_bpd(self, model: Callable, x_start: Tensor, x_t: Tensor, t: Tensor,
                     clip_denoised: bool = True, model_kwargs: dict | None = None) -> dict[str, Tensor]:
        """One term of the VLB per image in bits/dim: L_0 (decoder NLL) where t == 0, else L_{t−1}.
        Returns {"output": (B,), "pred_xstart": x̂_0}."""
        output = self.call_model(model, x_t, t, model_kwargs)
        with fp32(x_t):
            return self._vb_from_output(output, x_start.float(), x_t.float(), t, clip_denoised)

    def prior_bpd(self, x_start: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per image in bits/dim (no learnable part)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        zero = torch.zeros_like(mean)
        return mean_flat(normal_kl(mean, log_var, zero, zero)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model: Callable, x_start: Tensor, clip_denoised: bool = True,
                      model_kwargs: dict | None = None, progress: bool = False) -> dict[str, Tensor]:
        """Full VLB per image in bits/dim: total_bpd (B,), prior_bpd (B,), vb (B, T),
        xstart_mse (B, T), mse (B, T) — each term on a fresh noising of x_start."""
        B = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="bpd"):
            t = torch.full((B,), i, dtype=torch.long, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise)
            out = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((self.eps_from_pred_xstart(x_t, t, out["pred_xstart"]) - noise) ** 2))
        vb_t = torch.stack(vb[::-1], dim=1)
        prior = self.prior_bpd(x_start)
        return {"total_bpd": vb_t.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb_t,
                "xstart_mse": torch.stack(xstart_mse[::-1], dim=1), "mse": torch.stack(mse[::-1], dim=1)}

    # ----- training objective --------------------------------------------------------------

    def vb_weight(self) -> float:
        """Weight of the per-step VLB term L_t in the loss: λ·T estimates λ·L_vlb = λ·Σ_t L_t."""
        if self.loss_type == "hybrid":
            return self.hybrid_lambda * self.num_timesteps
        if self.loss_type == "rescaled_mse":
            return self.num_timesteps / 1000.0
        return 1.0

    def training_losses(self, model: Callable, x_start: Tensor, t: Tensor, noise: Tensor | None = None,
                        model_kwargs: dict | None = None) -> dict[str, Tensor]:
        """Per-image losses (B,): "loss" always, "mse", and "vb" when the variance is learned.
        The VLB term sees the predicted mean detached (Improved DDPM sec. 3.1) so it trains Σ_θ only."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = self.call_model(model, x_t, t, model_kwargs)
        with fp32(x_t):
            x_start, x_t, noise = x_start.float(), x_t.float(), noise.float()
            terms: dict[str, Tensor] = {}
            C = x_start.shape[1]
            if self.var_type == "learned_range":
                mean_out, var_out = output[:, :C], output[:, C:]
                frozen = torch.cat([mean_out.detach(), var_out], dim=1)  # stop-grad on μ for L_vlb
                terms["vb"] = self._vb_from_output(frozen, x_start, x_t, t, clip_denoised=False)["output"]
                output = mean_out
            target = {"eps": noise, "x0": x_start}.get(self.mean_type)
            if target is None:
                target = self.v_target(x_start, t, noise)
            terms["mse"] = mean_flat((target - output) ** 2)  # L_simple
            terms["loss"] = terms["mse"] + self.vb_weight() * terms["vb"] if "vb" in terms else terms["mse"]
            return terms
