"""model.compile: the U-Net compiled in place gives the eager outputs and keeps the plain module's
parameters and state_dict keys; inductor fuses the norm, scale-shift and SiLU by itself."""

import re

import pytest
import torch

from guided_diffusion.training import memory_plan
from guided_diffusion.training.factory import create_model
from guided_diffusion.unet import AttentionBlock, ResBlock, UNetModel
from pipeline.common.config import config_from_dict, load_config


def tiny_cfg(compile_: bool):
    return config_from_dict({"data": {"image_size": 32}, "model": {
        "model_channels": 16, "num_res_blocks": 1, "attention_resolutions": [8], "num_head_channels": 8,
        "compile": compile_}})


def pair():
    torch.manual_seed(0)
    eager = create_model(tiny_cfg(False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero output layers, so outputs and gradients are non-trivial
        for p in eager.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    compiled = create_model(tiny_cfg(True))
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def test_every_block_is_compiled_in_place_and_the_recompile_limit_covers_them():
    with torch._dynamo.config.patch(recompile_limit=8):  # (pytest's monkeypatch breaks torch's config module)
        _, compiled = pair()
        blocks = [m for m in compiled.modules() if isinstance(m, (ResBlock, AttentionBlock))]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
        assert compiled._compiled_call_impl is None  # the network between blocks (skips, concatenations) stays eager
        assert torch._dynamo.config.recompile_limit >= 2 * len(blocks) > 8


def test_compiled_model_keeps_its_class_parameters_and_keys():
    eager, compiled = pair()
    assert type(compiled) is UNetModel
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_memory_plan_counts_the_eager_network(monkeypatch):
    compiled_calls = []
    monkeypatch.setattr(UNetModel, "compile_blocks", lambda self, *a, **k: compiled_calls.append(1))
    cfg = tiny_cfg(True)
    memory_plan.plan_memory(cfg, 2, "fp32", None, device_type="cpu")
    assert compiled_calls == []  # counting never compiles (nor runs a compiled forward on fake tensors)
    create_model(cfg)
    assert compiled_calls == [1]


@pytest.mark.slow  # compiling forward and backward takes about a minute on 2 cores
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8)
def test_compiled_outputs_and_gradients_equal_eager():
    """Every block runs compiled: a block past dynamo's recompile limit (8 graphs on the code object
    of ResBlock.forward; this network has more distinct residual blocks) would fail here, not run eagerly."""
    torch._dynamo.reset()
    eager, compiled = pair()
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 900])
    out_e, out_c = eager(x, t), compiled(x, t)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-5, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # also once compiled


@pytest.mark.slow
def test_inductor_fuses_norm_scale_shift_and_silu():
    """Compiled, the norms and their SiLU are one CPU kernel each: GN → SiLU (in-norm) and the folded
    GN·(1 + scale) + shift → SiLU (out-norm, whose per-sample weight is computed inside it)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    block = ResBlock(32, 64, out_channels=32, use_scale_shift_norm=True)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 64)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(block), x, emb)
    torch.testing.assert_close(out, block(x, emb), rtol=1e-4, atol=1e-5)
    kernels = set(re.findall(r"cpp_fused_\w+", "\n".join(code)))
    fused = [k for k in kernels if "native_group_norm" in k and "silu" in k]
    assert any("mul" in k and "add" in k for k in fused), kernels  # the out-norm's scale-shift inside
    assert len(fused) >= 2, kernels


def test_compile_is_a_model_setting():
    assert load_config(overrides=["model.compile=true"]).model.compile is True
    assert load_config().model.compile is False
