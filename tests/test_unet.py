"""The ADM U-Net and the factory."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from guided_diffusion.errors import DiffusionSettingError
from guided_diffusion.nn import timestep_embedding
from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.training.factory import (
    create_diffusion,
    create_model,
    create_model_and_diffusion,
)
from guided_diffusion.unet import AttentionBlock, UNetModel, default_channel_mult
from pipeline.common.config import load_config
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)


def tiny(**kw):
    args = {"image_size": 32, "in_channels": 1, "model_channels": 16, "out_channels": 1, "num_res_blocks": 1,
            "attention_resolutions": [8], "num_head_channels": 8}
    args.update(kw)
    return UNetModel(**args)


def randomise(model, seed=0):
    """Replace the zero initialisation by small random weights so outputs and gradients are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("size,channels,learn_sigma", [(32, 1, False), (32, 3, True), (64, 1, True), (64, 3, False)])
def test_output_shape_and_zero_init(size, channels, learn_sigma):
    m = tiny(image_size=size, in_channels=channels, out_channels=channels, learn_sigma=learn_sigma,
             attention_resolutions=[16, 8])
    x = torch.randn(2, channels, size, size)
    y = m(x, torch.tensor([0, 999]))
    assert y.shape == (2, channels * (2 if learn_sigma else 1), size, size)
    assert torch.count_nonzero(y) == 0  # the final conv starts at zero


def test_plain_resampling_and_additive_embedding_variant():
    m = randomise(tiny(resblock_updown=False, use_scale_shift_norm=False, num_res_blocks=2))
    x = torch.randn(2, 1, 32, 32)
    y0, y1 = m(x, torch.tensor([0, 0])), m(x, torch.tensor([0, 999]))
    assert y0.shape == (2, 1, 32, 32) and torch.isfinite(y1).all()
    assert not torch.allclose(y0[1], y1[1])  # the timestep reaches the output


def test_default_channel_mult_and_bad_configs():
    assert default_channel_mult(64) == (1, 2, 3, 4) and default_channel_mult(128) == (1, 1, 2, 3, 4)
    assert default_channel_mult(32) == (1, 2, 2) and default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert len(default_channel_mult(320)) == 6  # 320 → 10 at the bottom
    with pytest.raises(DiffusionSettingError, match="channel_mult"):
        default_channel_mult(100)
    with pytest.raises(DiffusionSettingError, match="feature-map sizes"):
        tiny(attention_resolutions=[4])  # 32 px with (1, 2, 2) has maps 32, 16, 8
    with pytest.raises(DiffusionSettingError, match="divisible"):
        tiny(image_size=36, channel_mult=[1, 2, 2, 2])
    with pytest.raises(DiffusionSettingError, match="heads"):
        tiny(num_head_channels=-1, num_heads=3)


def test_attention_at_the_requested_feature_map_sizes():
    m = tiny(image_size=64, attention_resolutions=[32, 16], num_res_blocks=2)  # levels 64, 32, 16, 8
    seen = []
    for mod in m.modules():
        if isinstance(mod, AttentionBlock):
            mod.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    m(torch.randn(1, 1, 64, 64), torch.tensor([5]))
    # per attended level: 2 down blocks + 3 up blocks; plus one in the middle (8x8)
    assert sorted(seen) == sorted([32] * 5 + [16] * 5 + [8])


def test_sdpa_attention_equals_explicit_softmax_attention():
    torch.manual_seed(1)
    block = randomise(AttentionBlock(32, num_head_channels=8), seed=1)
    x = torch.randn(2, 32, 6, 5)
    B, C, H, W = x.shape
    heads, d = 4, 8
    tokens = F.group_norm(x, 32, block.norm.weight, block.norm.bias, 1e-5).flatten(2).transpose(1, 2)
    qkv = tokens @ block.qkv.weight.T + block.qkv.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(w @ v[..., sl])
    att = torch.cat(outs, dim=-1) @ block.proj.weight.T + block.proj.bias
    expected = x + att.transpose(1, 2).reshape(B, C, H, W)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 3, 1000])
    emb = timestep_embedding(t, 6)
    freqs = [10000 ** (-k / 3) for k in range(3)]
    expected = [[math.cos(tt * f) for f in freqs] + [math.sin(tt * f) for f in freqs] for tt in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = randomise(tiny(use_checkpoint=ckpt, dropout=0.2, learn_sigma=True))
        m.train()
        torch.manual_seed(3)  # same dropout masks (checkpoint replays the RNG state)
        x = torch.randn(2, 1, 32, 32)
        m(x, torch.tensor([1, 500])).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_seeded_construction_is_deterministic_and_eval_forward_repeats():
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        m = tiny(dropout=0.1)
        with torch.no_grad():
            m.out[-1].weight.normal_()  # make the output depend on every layer
        m.eval()
        x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        outs.append(m(x, torch.tensor([3, 7])))
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0


def test_channels_last_and_bf16_autocast():
    m = randomise(tiny(), seed=4).eval()
    x = torch.randn(2, 1, 32, 32)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ref = m(x, t)
        m_cl = m.to(memory_format=torch.channels_last)
        out_cl = m_cl(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = m(x, t)
    assert torch.isfinite(out_bf).all()
    rel = (out_bf.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x, t).float().square().mean().backward()  # training under autocast works too
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def _analytic_param_count(size, mc, nres, mult, attn_sizes, in_ch=1, out_ch=1):
    """Parameters of the ADM U-Net counted from its layer list (independent of the module code)."""
    emb = 4 * mc

    def res(cin, cout):
        n = 2 * cin + 9 * cin * cout + cout + emb * 2 * cout + 2 * cout + 2 * cout + 9 * cout * cout + cout
        return n + (cin * cout + cout if cin != cout else 0)

    def attn(c):
        return 2 * c + 3 * c * c + 3 * c + c * c + c

    total = mc * emb + emb + emb * emb + emb  # time embedding MLP
    ch = mc * mult[0]
    total += 9 * in_ch * ch + ch
    skips, res_size = [ch], size
    for lvl, m in enumerate(mult):
        for _ in range(nres):
            total += res(ch, mc * m) + (attn(mc * m) if res_size in attn_sizes else 0)
            ch = mc * m
            skips.append(ch)
        if lvl < len(mult) - 1:
            total += res(ch, ch)  # BigGAN down block
            skips.append(ch)
            res_size //= 2
    total += 2 * res(ch, ch) + attn(ch)
    for lvl, m in reversed(list(enumerate(mult))):
        for i in range(nres + 1):
            total += res(ch + skips.pop(), mc * m) + (attn(mc * m) if res_size in attn_sizes else 0)
            ch = mc * m
            if lvl and i == nres:
                total += res(ch, ch)  # BigGAN up block
                res_size *= 2
    return total + 2 * ch + 9 * ch * out_ch + out_ch


@pytest.mark.parametrize("name,size,mc,nres,attn,head_ch", [
    ("HP1", 64, 128, 3, [16, 8], -1),
    ("HP2", 128, 192, 4, [32, 16, 8], 64),
])
def test_hp_parameter_counts(name, size, mc, nres, attn, head_ch, capsys):
    with torch.device("meta"):  # no memory allocated
        m = UNetModel(size, 1, mc, 1, nres, attn, num_head_channels=head_ch)
    n = sum(p.numel() for p in m.parameters())
    assert n == _analytic_param_count(size, mc, nres, default_channel_mult(size), set(attn))
    with capsys.disabled():
        print(f"\n{name} U-Net ({size}px, {mc} ch, {nres} blocks, attention {attn}): {n:,} parameters")


def test_factory_builds_from_config():
    cfg = load_config("configs/tiny-cpu.yaml")
    model, diffusion = create_model_and_diffusion(cfg)
    assert model.channel_mult == (1, 2, 2) and model.out_channels == 1
    assert diffusion.num_timesteps == 1000
    spaced = create_diffusion(cfg, "ddim20")
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 20
    cfg = load_config("configs/tiny-cpu.yaml", ["model.learn_sigma=true", "diffusion.var_type=learned_range",
                                                "model.channels_last=true", "data.channels=3",
                                                "model.channel_mult=[]"])
    model = create_model(cfg)
    assert model.out_channels == 6 and model.channel_mult == (1, 2, 2)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    for bad in (["diffusion.var_type=learned_range"], ["model.learn_sigma=true"]):
        with pytest.raises(UserError, match="learn_sigma"):
            create_diffusion(load_config("configs/tiny-cpu.yaml", bad))
    with pytest.raises(DiffusionSettingError, match="linear, cosine"):
        create_diffusion(load_config("configs/tiny-cpu.yaml", ["diffusion.noise_schedule=quad"]))
