"""modulated_group_norm: GN(x)·(1 + scale) + shift in one GroupNorm kernel (the batch folded into the
channels) equals the unfolded expression in value and gradient, rounds no worse in half precision,
keeps one activation fewer for backward, and falls back where the fold cannot apply."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.nn import GroupNorm, group_norm, modulated_group_norm
from guided_diffusion.unet import ResBlock


def norm_and_inputs(batch: int, channels: int, size: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    norm = group_norm(channels).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g))
        norm.bias.copy_(torch.randn(channels, generator=g))
    x = torch.randn(batch, channels, size, size, generator=g, dtype=dtype) * 2 + 0.5  # off-centre groups
    scale, shift = (torch.randn(batch, channels, 1, 1, generator=g, dtype=dtype) for _ in range(2))
    return norm, x, scale, shift


def unfolded(norm: nn.Module, x, scale, shift):
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps) * (1 + scale) + shift


@pytest.mark.parametrize("batch, channels, size", [(3, 64, 8), (2, 48, 5), (1, 16, 4)])
def test_values_and_gradients_equal_the_unfolded_expression(batch, channels, size):
    norm, x, scale, shift = norm_and_inputs(batch, channels, size, seed=channels)
    inputs = [x.requires_grad_(), scale.requires_grad_(), shift.requires_grad_(), norm.weight, norm.bias]
    ref, out = unfolded(norm, x, scale, shift), modulated_group_norm(norm, x, scale, shift)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=ref.dtype)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_half_and_rounds_no_worse_than_unfolded(dtype):
    norm, x, scale, shift = norm_and_inputs(4, 64, 16, seed=1, dtype=torch.float32)
    xh, sh, bh = x.to(dtype), (0.3 * scale).to(dtype), shift.to(dtype)
    with torch.no_grad():
        exact = unfolded(norm.double(), xh.double(), sh.double(), bh.double())  # the same rounded inputs, exactly
    norm.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = modulated_group_norm(norm, xh, sh, bh)
        before = norm(xh) * (1 + sh) + bh  # the unfolded expression, rounded at each step
    assert out.dtype == dtype

    def err(t):
        return float((t.detach().double() - exact).norm() / exact.norm())

    assert err(out) <= err(before) and err(out) < 2 ** -8


def test_channels_last_and_foreign_norms_take_the_unfolded_path():
    norm, x, scale, shift = norm_and_inputs(2, 32, 6, seed=3)
    ref = unfolded(norm, x, scale, shift)
    out = modulated_group_norm(norm, x.to(memory_format=torch.channels_last), scale, shift)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref)
    plain = nn.GroupNorm(norm.num_groups, 32).double()
    plain.load_state_dict(norm.state_dict())
    torch.testing.assert_close(modulated_group_norm(plain, x, scale, shift), ref)
    assert isinstance(norm, GroupNorm) and not isinstance(plain, GroupNorm)


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `fn()` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_a_residual_block_keeps_one_activation_fewer():
    """The unfolded product kept the normalised tensor for the gradient of `scale`; the folded kernel
    keeps only its input (which the norm kept anyway)."""
    torch.manual_seed(0)
    block = ResBlock(64, 32, out_channels=64)
    x, emb = torch.randn(2, 64, 16, 16), torch.randn(2, 32)
    folded = saved_bytes(lambda: block(x, emb))
    block.out_norm.__class__ = nn.GroupNorm  # torch's own norm: the unfolded path
    fewer = saved_bytes(lambda: block(x, emb)) - folded
    small = 8 * x.shape[0] * x.shape[1] * 4  # the folded kernel's per-sample weight and bias, (B, C) each
    assert x.numel() * 4 - small <= fewer <= x.numel() * 4
