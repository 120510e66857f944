"""Our ADM U-Net and schedule in diffusers' terms: the `UNet2DModel` and `DDPMScheduler` settings of
a run's config, and its weights under diffusers' parameter names. Pure: nothing here imports
diffusers (`pipeline.export` builds and writes the models).

The two networks are the same ADM U-Net, block for block:

    ours                                   diffusers UNet2DModel
    time_embed.0 / .2                      time_embedding.linear_1 / linear_2
    input_blocks.0 (3x3 conv)              conv_in
    input_blocks (per level: num_res_blocks × [ResBlock, Attention?], then a down-sampler)
                                           down_blocks[level].resnets[i] / attentions[i] / downsamplers[0]
    middle_block (ResBlock, Attention, ResBlock)
                                           mid_block.resnets[0], attentions[0], resnets[1]
    output_blocks (per level, deepest first: num_res_blocks + 1 × [ResBlock, Attention?], the last
                   with an up-sampler)     up_blocks[j].resnets[i] / attentions[i] / upsamplers[0]
    out (GroupNorm, SiLU, conv)            conv_norm_out, conv_act, conv_out

The timestep embedding is [cos(t·ω_k), sin(t·ω_k)], ω_k = 10000^(−k/half), of the original integer
t (no rescaling): diffusers' `Timesteps` with flip_sin_to_cos=True, downscale_freq_shift=0. Our
attention is a Linear qkv laid out [q | k | v], each head-major (not ADM's legacy per-head
interleave), so diffusers' to_q / to_k / to_v are its three row blocks as they stand.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guided_diffusion.unet import default_channel_mult
from pipeline.common.config import Config
from pipeline.common.errors import UserError

RESBLOCK_NAMES = {"in_norm": "norm1", "in_conv": "conv1", "emb_proj": "time_emb_proj", "out_norm": "norm2",
                  "out_conv": "conv2", "skip": "conv_shortcut"}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")  # the same names in DDPMScheduler


def _refuse(key: str, value: object, why: str) -> UserError:
    """The one-line error for a setting (`section.key`) that diffusers has no equivalent for."""
    return UserError(f"diffusers cannot represent {key}={value} ({why})")


def channel_mult(cfg: Config) -> tuple[int, ...]:
    """The U-Net's channel multipliers: model.channel_mult, or ADM's default for the image size."""
    return tuple(cfg.model.channel_mult) or default_channel_mult(cfg.data.image_size)


def _attention_levels(cfg: Config) -> list[bool]:
    """Per resolution level (finest first): whether it has attention (feature-map size listed)."""
    sizes = [cfg.data.image_size // 2**level for level in range(len(channel_mult(cfg)))]
    return [size in set(cfg.model.attention_resolutions) for size in sizes]


def _norm_groups(cfg: Config) -> list[int]:
    """The distinct GroupNorm group counts of the run's U-Net (built on the meta device: no memory)."""
    from guided_diffusion.training.factory import create_model

    with torch.device("meta"):
        model = create_model(cfg)
    return sorted({m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)})


def _attention_head_dim(cfg: Config) -> int | None:
    """diffusers' attention_head_dim (one for every block; None = one head of the block's width)."""
    m, mults = cfg.model, channel_mult(cfg)
    if m.num_head_channels > 0:
        return m.num_head_channels
    if m.num_heads == 1:
        return None
    widths = {m.model_channels * mult: None for mult, attn in zip(mults, _attention_levels(cfg), strict=True) if attn}
    widths[m.model_channels * mults[-1]] = None  # the middle block attends too
    heads = {c // m.num_heads for c in widths}
    if len(heads) > 1:
        per = ", ".join(f"{c // m.num_heads} at {c} channels" for c in widths)
        raise _refuse("model.num_heads", m.num_heads, f"without model.num_head_channels the head width differs by "
                      f"level ({per}); UNet2DModel has one attention_head_dim")
    return heads.pop()


def unet_config(cfg: Config) -> dict:
    """`UNet2DModel(**unet_config(cfg))` is the network of the run's config. UserError (before any
    file is written) naming the first setting diffusers cannot express."""
    m, mults = cfg.model, channel_mult(cfg)
    if mults[0] != 1:
        raise _refuse("model.channel_mult", list(mults), "diffusers embeds the timestep with block_out_channels[0] = "
                      "model_channels·channel_mult[0] features, ours with model_channels")
    groups = _norm_groups(cfg)
    if len(groups) > 1:
        raise _refuse("model.model_channels", m.model_channels, f"our GroupNorms have gcd(32, channels) groups, here "
                      f"{groups}; UNet2DModel has one norm_num_groups (a multiple of 32 gives 32 everywhere)")
    resnet = m.resblock_updown
    down, up = [], []
    for attn in _attention_levels(cfg):
        down.append("AttnDownBlock2D" if attn else "ResnetDownsampleBlock2D" if resnet else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if attn else "ResnetUpsampleBlock2D" if resnet else "UpBlock2D")
    return {
        "sample_size": cfg.data.image_size,
        "in_channels": cfg.data.channels,
        "out_channels": cfg.data.channels * (2 if m.learn_sigma else 1),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": tuple(down),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": tuple(up),
        "block_out_channels": tuple(m.model_channels * mult for mult in mults),
        "layers_per_block": m.num_res_blocks,
        "downsample_padding": 1,
        "downsample_type": "resnet" if resnet else "conv",
        "upsample_type": "resnet" if resnet else "conv",
        "dropout": m.dropout,
        "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(cfg),
        "norm_num_groups": groups[0],
        "attn_norm_num_groups": groups[0],  # else the middle attention has no GroupNorm under scale_shift
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if m.use_scale_shift_norm else "default",
        "add_attention": True,
    }


def _module_pairs(cfg: Config) -> list[tuple[str, str, str]]:
    """(our module, diffusers module, kind) for every module with weights; kind: plain | res | attn."""
    m, attn_levels = cfg.model, _attention_levels(cfg)
    levels = len(attn_levels)
    pairs = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain"),
             ("input_blocks.0.0", "conv_in", "plain")]
    k = 1
    for level, attn in enumerate(attn_levels):
        block = f"down_blocks.{level}"
        for i in range(m.num_res_blocks):
            pairs.append((f"input_blocks.{k}.0", f"{block}.resnets.{i}", "res"))
            if attn:
                pairs.append((f"input_blocks.{k}.1", f"{block}.attentions.{i}", "attn"))
            k += 1
        if level < levels - 1:
            pairs.append((f"input_blocks.{k}.0", f"{block}.downsamplers.0", "res") if m.resblock_updown
                         else (f"input_blocks.{k}.0.conv", f"{block}.downsamplers.0.conv", "plain"))
            k += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", "res"), ("middle_block.1", "mid_block.attentions.0", "attn"),
              ("middle_block.2", "mid_block.resnets.1", "res")]
    k = 0
    for j, level in enumerate(reversed(range(levels))):
        block = f"up_blocks.{j}"
        for i in range(m.num_res_blocks + 1):
            pairs.append((f"output_blocks.{k}.0", f"{block}.resnets.{i}", "res"))
            n = 1
            if attn_levels[level]:
                pairs.append((f"output_blocks.{k}.1", f"{block}.attentions.{i}", "attn"))
                n = 2
            if level > 0 and i == m.num_res_blocks:
                pairs.append((f"output_blocks.{k}.{n}", f"{block}.upsamplers.0", "res") if m.resblock_updown
                             else (f"output_blocks.{k}.{n}.conv", f"{block}.upsamplers.0.conv", "plain"))
            k += 1
    return pairs + [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]


def _rename(kind: str, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """One of our parameters (name relative to its module) → diffusers (name, tensor) pairs."""
    if kind == "plain":
        return [(name, tensor)]
    head, _, param = name.partition(".")
    if kind == "res":
        return [(f"{RESBLOCK_NAMES[head]}.{param}", tensor)]
    if head == "qkv":  # rows [q | k | v], each head-major, as diffusers' to_q / to_k / to_v
        return [(f"to_{part}.{param}", chunk.contiguous()) for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True)]
    return [({"norm": "group_norm", "proj": "to_out.0"}[head] + f".{param}", tensor)]


def unet_state_dict(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """Our U-Net's state dict under diffusers' UNet2DModel names (tensors shared where unchanged).
    ValueError if a parameter of ours has no place (the layouts disagree: a bug, not a user error)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for ours, theirs, kind in _module_pairs(cfg):
        for key in [k for k in state if k.startswith(ours + ".")]:
            for name, tensor in _rename(kind, key[len(ours) + 1:], state[key]):
                out[f"{theirs}.{name}"] = tensor
            used.add(key)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"no diffusers name for {len(left)} U-Net parameter(s), e.g. {left[:3]}")
    return out


def linear_beta_range(steps: int) -> tuple[float, float]:
    """(β_1, β_T) of our linear schedule: DDPM's 1e-4 and 0.02, both scaled by 1000/T, computed as
    guided_diffusion.schedules.linear_betas computes them (so the float64 linspace is the same)."""
    scale = 1000.0 / steps
    return scale * 1e-4, scale * 0.02


def scheduler_config(cfg: Config, clip_sample: bool) -> dict:
    """`DDPMScheduler(**scheduler_config(cfg, clip))`: the run's diffusion process.

    linear → beta_schedule "linear" over [1e-4, 0.02]·1000/T (the same float64 linspace as ours);
    cosine → "squaredcos_cap_v2" (Improved DDPM's ᾱ with s = 0.008 and β clipped at 0.999, as ours;
    `pipeline.export` checks the scheduler's betas against ours). clip_sample clamps x̂_0 to [−1, 1]
    like generate.clip_denoised. "leading" spacing with N steps takes t = 0, T/N, 2T/N, …, which
    is our "ddimN" respacing when N divides T.
    """
    d = cfg.diffusion
    if d.mean_type not in PREDICTION_TYPES:
        raise _refuse("diffusion.mean_type", d.mean_type, f"valid: {', '.join(PREDICTION_TYPES)}")
    if d.var_type not in VARIANCE_TYPES:
        raise _refuse("diffusion.var_type", d.var_type, f"valid: {', '.join(VARIANCE_TYPES)}")
    config: dict = {"num_train_timesteps": d.steps}
    if d.noise_schedule == "linear":
        start, end = linear_beta_range(d.steps)
        config.update(beta_schedule="linear", beta_start=start, beta_end=end)
    elif d.noise_schedule == "cosine":
        config.update(beta_schedule="squaredcos_cap_v2")
    else:
        raise _refuse("diffusion.noise_schedule", d.noise_schedule, "valid: linear, cosine")
    return {**config, "trained_betas": None, "variance_type": d.var_type,
            "prediction_type": PREDICTION_TYPES[d.mean_type], "clip_sample": bool(clip_sample),
            "clip_sample_range": 1.0, "thresholding": False, "timestep_spacing": "leading", "steps_offset": 0,
            "rescale_betas_zero_snr": False}
