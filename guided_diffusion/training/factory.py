"""Build the U-Net and the diffusion process from a `Config`."""

from __future__ import annotations

import logging

import torch

from guided_diffusion.diffusion import GaussianDiffusion
from guided_diffusion.machine import cpu_flags
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.schedules import get_betas
from guided_diffusion.unet import UNetModel
from guided_diffusion.winograd import MIN_CHANNELS, MIN_SIZE, available, set_winograd
from pipeline.common.config import Config, ModelConfig
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)
CONV_ALGORITHMS = ("auto", "direct", "winograd")
# Where conv_algorithm auto uses the Winograd kernels: measured faster than oneDNN's direct
# convolutions on an AVX2 CPU at 1 and 2 threads (single HP1 layers 0.46-0.76x), but their lead
# shrinks with threads (1 → 2 threads: direct 1.5-2.3x faster, Winograd 1.3-1.9x), and on an AVX-512
# Xeon at 16 threads they lost (1.6-3.1x slower; docs/bench/device-2026-11-27/bench_unet_cpu.json).
DIRECT_IS_FASTER_FLAGS = ("avx512f",)
WINOGRAD_MAX_THREADS = 4


def why_not_winograd(flags: set[str] | None = None, threads: int | None = None) -> str | None:
    """None where conv_algorithm auto uses Winograd on this CPU (`flags`, `threads`: default this
    machine's and torch's), else why not: AVX-512, or more than WINOGRAD_MAX_THREADS threads."""
    flags = cpu_flags() if flags is None else flags
    threads = torch.get_num_threads() if threads is None else threads
    if any(f in flags for f in DIRECT_IS_FASTER_FLAGS):
        return "a CPU with AVX-512, where oneDNN's direct kernels were measured faster"
    if threads > WINOGRAD_MAX_THREADS:
        return (f"{threads} threads, above the {WINOGRAD_MAX_THREADS} where the Winograd kernels were measured "
                "to pay")
    return None


def create_model(cfg: Config) -> UNetModel:
    """The U-Net of cfg.model for cfg.data's image size and channels (channels_last if asked).

    model.compile: the module's forward is compiled in place (`nn.Module.compile`, inductor, on the
    first call), so the model stays a UNetModel: the same parameters (EMA, optimizer, DDP see the
    plain tensors) and state_dict keys without torch.compile's `_orig_mod.` prefix. Inductor fuses
    GroupNorm + SiLU and GroupNorm·(1 + scale) + shift + SiLU into one kernel each by itself
    (checked in tests/test_unet_compile.py), so the network has no hand-fused variant.
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
        model.compile()
    return model


def resolve_conv_algorithm(m: ModelConfig) -> str:
    """direct | winograd for model.conv_algorithm, logged with why. winograd: the U-Net's 3x3
    convolutions run Winograd F(4x4, 3x3) C kernels where they pay (float32 on the CPU, no autocast,
    >= 64 channels in and out, maps >= 32 px; guided_diffusion/winograd.py), direct convolutions
    elsewhere, e.g. on a GPU. auto is winograd unless model.compile or model.channels_last asks for
    the direct path's compiler or layout, or the CPU has AVX-512 or torch more than 4 threads
    (`why_not_winograd`); its kernels are built on the first CPU step that uses them,
    and where they cannot be (no C compiler) it logs why and stays direct. winograd builds them now
    and fails clearly if it cannot."""
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
    why_not = why_not_winograd()
    if why_not is not None:
        log.info("convolutions: direct (model.conv_algorithm auto on %s)", why_not)
        return "direct"
    log.info("convolutions: Winograd F(4x4, 3x3) for %s, direct elsewhere (model.conv_algorithm auto)", rule)
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
