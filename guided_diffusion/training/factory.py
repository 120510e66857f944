"""Build the U-Net and the diffusion process from a `Config`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from guided_diffusion.diffusion import GaussianDiffusion
from guided_diffusion.machine import cache_root, cpu_model
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.schedules import get_betas
from guided_diffusion.speed_verdicts import MIN_SPEEDUP, cached_verdict, machine_key
from guided_diffusion.unet import UNetModel
from guided_diffusion.winograd import (
    MIN_CHANNELS,
    MIN_SIZE,
    available,
    measure_speedup,
    set_winograd,
)
from pipeline.common.config import Config, ModelConfig
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)
CONV_ALGORITHMS = ("auto", "direct", "winograd")
WINOGRAD_CACHE = "cpu_winograd.json"  # conv_algorithm auto's verdicts (guided_diffusion/speed_verdicts.py)


def auto_winograd(measure: Callable[[], float] | None = None) -> tuple[bool, str]:
    """Whether conv_algorithm auto uses the Winograd kernels on this machine, and why, for the log.
    Decided by timing one 3x3 layer both ways at torch's thread count (`winograd.measure_speedup`,
    or `measure`), once per machine: the kernels won on 2-core EPYCs with AVX2 and with AVX-512 (the
    HP1 step 0.79x on the latter) and lost on a 16-core AVX-512 Xeon
    (docs/bench/device-2026-11-27/bench_unet_cpu.json), so neither flags nor thread counts tell."""
    ok, why = available()
    if not ok:
        return False, f"no Winograd kernels here: {why}"
    key = machine_key(cpu_model(), "winograd F(4x4, 3x3) vs direct")
    verdict = cached_verdict(cache_root() / WINOGRAD_CACHE, key, measure or measure_speedup)
    if verdict.faster:
        return True, f"self-check {verdict.speedup:.2f}x faster than direct, {verdict.where()}"
    return False, (f"the self-check ran Winograd at {verdict.speedup:.2f}x the speed of oneDNN's direct "
                   f"convolutions, below {MIN_SPEEDUP}x; {verdict.where()}")


def create_model(cfg: Config) -> UNetModel:
    """The U-Net of cfg.model for cfg.data's image size and channels (channels_last if asked).

    model.compile: every residual and attention block is compiled in place (`UNetModel.compile_blocks`,
    inductor, on the first call), so the model stays a UNetModel: the same parameters (EMA, optimizer,
    DDP see the plain tensors) and state_dict keys without torch.compile's `_orig_mod.` prefix. Eagerly,
    GroupNorm·(1 + scale) + shift is already one GroupNorm kernel (`modulated_group_norm`); inductor
    also fuses each norm with the SiLU after it (checked in tests/test_unet_compile.py).
    `torch.compiler.set_stance("force_eager")` runs a compiled model eagerly where needed.
    model.conv_algorithm: see `resolve_conv_algorithm`.
    """
    m = cfg.model
    model = UNetModel(
        image_size=cfg.data.image_size,
        in_channels=cfg.data.channels,
        model_channels=m.model_channels,
        out_channels=cfg.data.channels,
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=m.attention_resolutions,
        dropout=m.dropout,
        channel_mult=m.channel_mult or None,
        num_heads=m.num_heads,
        num_head_channels=m.num_head_channels,
        use_scale_shift_norm=m.use_scale_shift_norm,
        resblock_updown=m.resblock_updown,
        use_checkpoint=m.use_checkpoint,
        learn_sigma=m.learn_sigma,
    )
    set_winograd(model, resolve_conv_algorithm(m) == "winograd")
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if m.compile:
        model.compile_blocks()
    return model


def resolve_conv_algorithm(m: ModelConfig) -> str:
    """direct | winograd for model.conv_algorithm, logged with why. winograd: the U-Net's 3x3
    convolutions run Winograd F(4x4, 3x3) C kernels where they pay (float32 on the CPU, no autocast,
    >= 64 channels in and out, maps >= 32 px; guided_diffusion/winograd.py), direct convolutions
    elsewhere, e.g. on a GPU. auto is winograd unless model.compile or model.channels_last asks for
    the direct path's compiler or layout, or a self-check timed once per machine finds them no faster
    (`auto_winograd`; it builds the kernels, and where they cannot be, e.g. with no C compiler, it
    logs why and stays direct). winograd builds them now and fails clearly if it cannot."""
    if m.conv_algorithm not in CONV_ALGORITHMS:
        raise UserError(f"unknown model.conv_algorithm '{m.conv_algorithm}'; valid: {', '.join(CONV_ALGORITHMS)}")
    rule = f"3x3 layers with >= {MIN_CHANNELS} channels on maps >= {MIN_SIZE} px, float32 on the CPU"
    if m.conv_algorithm == "direct":
        return "direct"
    if m.conv_algorithm == "winograd":
        if m.compile:
            raise UserError("model.conv_algorithm winograd cannot run under model.compile (torch.compile cannot "
                            "trace its C kernels); use conv_algorithm auto or direct")
        ok, why = available()
        if not ok:
            raise UserError(f"model.conv_algorithm winograd: its C kernels cannot be built here ({why}); "
                            "use conv_algorithm auto or direct")
        log.info("convolutions: Winograd F(4x4, 3x3) for %s (model.conv_algorithm winograd)", rule)
        return "winograd"
    if m.compile or m.channels_last:
        log.info("convolutions: direct (model.conv_algorithm auto with model.%s)",
                 "compile" if m.compile else "channels_last")
        return "direct"
    probe = torch.empty(0)
    if type(probe) is not torch.Tensor or probe.device.type != "cpu":  # on the meta device or fake tensors
        return "direct"  # a network built to be counted, never run: nothing to time (the C kernels would read no memory)
    use, why = auto_winograd()
    if not use:
        log.info("convolutions: direct (model.conv_algorithm auto: %s)", why)
        return "direct"
    log.info("convolutions: Winograd F(4x4, 3x3) for %s, direct elsewhere (model.conv_algorithm auto: %s)",
             rule, why)
    return "winograd"


def create_diffusion(cfg: Config, respacing: str | None = None) -> GaussianDiffusion:
    """The diffusion of cfg.diffusion; `respacing` ("50", "ddim50", "10,20,20") keeps a subset of steps."""
    d = cfg.diffusion
    learned = d.var_type == "learned_range"
    if learned != cfg.model.learn_sigma:
        raise UserError(
            f"diffusion.var_type '{d.var_type}' and model.learn_sigma {cfg.model.learn_sigma} disagree: "
            "learned_range needs learn_sigma true, and learn_sigma true needs learned_range")
    betas = get_betas(d.noise_schedule, d.steps)
    kwargs = {"mean_type": d.mean_type, "var_type": d.var_type, "loss_type": d.loss_type,
              "hybrid_lambda": d.hybrid_lambda}
    if respacing in (None, ""):
        return GaussianDiffusion(betas, **kwargs)
    return SpacedDiffusion(space_timesteps(d.steps, respacing), betas, **kwargs)


def create_model_and_diffusion(cfg: Config) -> tuple[UNetModel, GaussianDiffusion]:
    """Both, for training (full-length diffusion)."""
    return create_model(cfg), create_diffusion(cfg)
