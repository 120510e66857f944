"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", sec. 3 and app. A).

Residual blocks with adaptive GroupNorm (the timestep embedding gives a per-channel scale and
shift), BigGAN-style up/down-sampling residual blocks, multi-head self-attention at chosen
feature-map sizes (through `scaled_dot_product_attention`), SiLU everywhere, zero-initialised
last layers so each residual branch starts as the identity and the network's output as zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from guided_diffusion.errors import DiffusionSettingError
from guided_diffusion.nn import (
    NearestUpsample,
    group_norm,
    modulated_group_norm,
    timestep_embedding,
    zero_module,
)
from guided_diffusion.winograd import Conv3x3

# Channel multiplier per resolution level, by image size. 320 px uses six levels
# (320, 160, 80, 40, 20, 10) with the 256-px multipliers.
DEFAULT_CHANNEL_MULT = {
    32: (1, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
    320: (1, 1, 2, 2, 4, 4),
}


def default_channel_mult(image_size: int) -> tuple[int, ...]:
    """ADM's channel multipliers for a given image size (see DEFAULT_CHANNEL_MULT)."""
    if image_size not in DEFAULT_CHANNEL_MULT:
        sizes = ", ".join(map(str, DEFAULT_CHANNEL_MULT))
        raise DiffusionSettingError(f"no default channel_mult for image size {image_size} (have {sizes}); "
                        "set model.channel_mult")
    return DEFAULT_CHANNEL_MULT[image_size]


class ResBlock(nn.Module):
    """GroupNorm → SiLU → [resample] → conv → AdaGN(emb) → SiLU → dropout → zero conv, plus skip.

    With `use_scale_shift_norm` the embedding gives (scale, shift) and the second norm becomes
    GN(h)·(1 + scale) + shift; otherwise the embedding is added before it. `up`/`down` make it a
    BigGAN-style resampling block (nearest ×2 / average pool on both branches). `emb` must be
    the SiLU-activated timestep embedding (the U-Net applies SiLU once for all blocks).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_scale_shift_norm: bool = True, up: bool = False, down: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_norm = group_norm(channels)
        self.resample = NearestUpsample() if up else nn.AvgPool2d(2) if down else None
        self.in_conv = Conv3x3(channels, out_channels)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(Conv3x3(out_channels, out_channels))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_conv(h)
        e = self.emb_proj(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = modulated_group_norm(self.out_norm, h, scale, shift)  # out_norm(h)·(1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, pre-GroupNorm, zero-initialised output."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False):
        super().__init__()
        heads = channels // num_head_channels if num_head_channels > 0 else num_heads
        if heads < 1 or channels % heads:
            raise DiffusionSettingError(f"attention: {channels} channels cannot be split into "
                            f"{'heads of ' + str(num_head_channels) if num_head_channels > 0 else str(num_heads) + ' heads'}")
        self.num_heads = heads
        self.use_checkpoint = use_checkpoint
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        L, heads = H * W, self.num_heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, L, C)  # free for channels_last input
        q, k, v = self.qkv(tokens).view(B, L, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ/√d) v, (B, heads, L, d)
        out = self.proj(out.transpose(1, 2).reshape(B, L, C))
        return x + out.view(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Strided 3x3 convolution (used when resblock_updown is off)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3x3 convolution (used when resblock_updown is off)."""

    def __init__(self, channels: int):
        super().__init__()
        self.up = NearestUpsample()
        self.conv = Conv3x3(channels, channels)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(self.up(x))


class InputConv(nn.Conv2d):
    """The first convolution, taking (x, emb) like every other stage layer."""

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return super().forward(x)


class Stage(nn.ModuleList):
    """Layers applied in order, each given the timestep embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


class UNetModel(nn.Module):
    """ADM U-Net: x_t (B, in_channels, S, S) and timesteps (B,) → (B, out_channels[·2], S, S).

    attention_resolutions are feature-map sizes (e.g. [16, 8]: attend where the map is 16x16
    and 8x8). With learn_sigma the output has twice out_channels (mean part, variance part).
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions, dropout: float = 0.0, channel_mult=None,
                 num_heads: int = 4, num_head_channels: int = -1, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = True, use_checkpoint: bool = False, learn_sigma: bool = False):
        super().__init__()
        channel_mult = tuple(channel_mult) if channel_mult else default_channel_mult(image_size)
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise DiffusionSettingError(f"image size {image_size} is not divisible by 2^{levels - 1} "
                            f"(channel_mult has {levels} levels)")
        sizes = [image_size // 2**i for i in range(levels)]
        attention_resolutions = set(attention_resolutions)
        if not attention_resolutions <= set(sizes):
            raise DiffusionSettingError(f"attention_resolutions {sorted(attention_resolutions)} must be feature-map sizes "
                            f"of this U-Net: {sizes}")
        self.image_size, self.in_channels = image_size, in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels * (2 if learn_sigma else 1)
        self.channel_mult = channel_mult

        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def res(cin, cout, **kw):
            return ResBlock(cin, emb_ch, dropout, cout, use_scale_shift_norm, use_checkpoint=use_checkpoint, **kw)

        def attn(c):
            return AttentionBlock(c, num_heads, num_head_channels, use_checkpoint)

        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([Stage([InputConv(in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if sizes[level] in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(Stage(layers))
                skip_channels.append(ch)
            if level < levels - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(Stage([down]))
                skip_channels.append(ch)

        self.middle_block = Stage([res(ch, ch), attn(ch), res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if sizes[level] in attention_resolutions:
                    layers.append(attn(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                self.output_blocks.append(Stage(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    def compile_blocks(self) -> None:
        """torch.compile (inductor) every residual and attention block in place, one graph per distinct
        block (its shapes and branches), reused by the blocks that share them; the skip concatenations
        between blocks stay eager. Compiling block by block rather than the whole network keeps each
        graph small, so compile time grows with the number of distinct blocks, not the network's depth.
        Dynamo keeps all the graphs of a block class on its forward's code object, so its recompile limit
        is raised to cover them (beyond it a block would silently run eagerly; older torch
        names it `cache_size_limit`)."""
        blocks = [m for m in self.modules() if isinstance(m, (ResBlock, AttentionBlock))]
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 2 * len(blocks)))
        for block in blocks:
            block.compile()

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        emb = F.silu(self.time_embed(timestep_embedding(timesteps, self.model_channels)))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

