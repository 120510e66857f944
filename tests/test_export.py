"""export: our U-Net and schedule as diffusers' UNet2DModel + DDPMScheduler, checked number for number
(random weights with every parameter perturbed, so nothing is trivially zero), and the `export`
command end to end on a tiny run trained here."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.samplers import sample
from guided_diffusion.schedules import get_betas
from guided_diffusion.training.factory import create_diffusion, create_model
from pipeline.common.config import config_from_dict, load_config
from pipeline.diffusers_map import linear_beta_range, scheduler_config, unet_config

diffusers = pytest.importorskip("diffusers", reason="export needs diffusers: pip install -e '.[export]'")

from pipeline.cli import export as export_cli  # noqa: E402
from pipeline.export import DIFFUSERS_MISSING, diffusers_scheduler, diffusers_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    # HP1's layout (64 px, channel_mult 1,2,3,4, attention at 16 and 8, scale-shift, resnet resampling),
    # small channels; heads of 32 channels (HP1's own num_heads 4 is refused, see below)
    "hp1-shaped": {"data": {"image_size": 64}, "model": {
        "model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2, 3, 4], "attention_resolutions": [16, 8],
        "num_head_channels": 32}},
    # learned variance, plain (additive) time embedding, one head per block, two res blocks
    "learn-sigma": {"data": {"image_size": 16}, "model": {
        "model_channels": 32, "num_res_blocks": 2, "channel_mult": [1, 2], "attention_resolutions": [8],
        "num_heads": 1, "use_scale_shift_norm": False, "learn_sigma": True},
        "diffusion": {"var_type": "learned_range"}},
    # RGB, strided-conv / nearest-conv resampling, two heads of one width
    "rgb-conv": {"data": {"image_size": 32, "channels": 3}, "model": {
        "model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2, 2], "attention_resolutions": [8],
        "num_heads": 2, "resblock_updown": False}, "diffusion": {"mean_type": "v"}},
}
TIMESTEPS = [0, 1, 1234, 3999]  # T = 4000


def perturbed_model(cfg, seed=0):
    """Our U-Net with every parameter (the zero-initialised ones too) moved by N(0, 0.05²)."""
    torch.manual_seed(seed)
    model = create_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def pair(name):
    cfg = config_from_dict(CONFIGS[name])
    model = perturbed_model(cfg)
    return cfg, model, diffusers_unet(model, cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_outputs_equal_ours(name):
    cfg, ours, theirs = pair(name)
    c, s = cfg.data.channels, cfg.data.image_size
    x = torch.randn(len(TIMESTEPS), c, s, s)
    t = torch.tensor(TIMESTEPS)
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert b.shape == a.shape == (len(TIMESTEPS), c * (2 if cfg.model.learn_sigma else 1), s, s)
    assert a.abs().amax(dim=(1, 2, 3)).min() > 0.5  # a real signal at every timestep
    diff = (a - b).abs().max().item()
    print(f"{name}: max |ours - diffusers| = {diff:.3g}")
    assert diff < 1e-4


def test_the_comparison_sees_a_wrong_time_embedding():
    """The check is sharp: sin/cos swapped in diffusers' embedding gives a different network."""
    cfg, ours, theirs = pair("learn-sigma")
    wrong = diffusers.UNet2DModel(**{**unet_config(cfg), "flip_sin_to_cos": False}).eval()
    wrong.load_state_dict(theirs.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 3999])
    with torch.no_grad():
        assert (ours(x, t) - wrong(x, t).sample).abs().max() > 1e-2


@pytest.mark.parametrize("steps", [4000, 1000, 50])
def test_linear_betas_equal_ours(steps):
    cfg = config_from_dict({"diffusion": {"steps": steps, "noise_schedule": "linear"}})
    ours = get_betas("linear", steps)
    start, end = linear_beta_range(steps)
    np.testing.assert_allclose(np.linspace(start, end, steps), ours, rtol=0, atol=1e-12)  # the config, in float64
    # what diffusers holds: float32
    np.testing.assert_allclose(diffusers_scheduler(cfg, True).betas.double().numpy(), ours, rtol=2e-7, atol=0)


@pytest.mark.parametrize("steps", [4000, 1000, 50])
def test_cosine_betas_equal_ours(steps):
    cfg = config_from_dict({"diffusion": {"steps": steps, "noise_schedule": "cosine"}})
    assert scheduler_config(cfg, True)["beta_schedule"] == "squaredcos_cap_v2"
    ours = get_betas("cosine", steps)
    theirs = diffusers_scheduler(cfg, True).betas.double().numpy()  # float64 maths, kept in float32
    np.testing.assert_allclose(theirs, ours, rtol=2e-7, atol=0)
    np.testing.assert_array_equal(ours == 0.999, theirs == np.float32(0.999))  # the same max_beta clip
    assert ours[-1] == 0.999


@pytest.mark.parametrize("schedule, mean_type, learn_sigma, clip", [
    ("linear", "eps", False, True), ("cosine", "v", True, False)])
def test_ddim_sample_equals_ours(schedule, mean_type, learn_sigma, clip):
    """10 DDIM steps, eta 0, same starting noise. Our "ddim10" respacing of T = 4000 keeps
    t = 0, 400, …, 3600: the steps DDIMScheduler's "leading" spacing takes."""
    cfg = config_from_dict({
        "data": {"image_size": 16}, "model": {"model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
                                              "attention_resolutions": [8], "num_head_channels": 32,
                                              "learn_sigma": learn_sigma},
        "diffusion": {"steps": 4000, "noise_schedule": schedule, "mean_type": mean_type,
                      "var_type": "learned_range" if learn_sigma else "fixed_small"}})
    model = perturbed_model(cfg)
    unet = diffusers_unet(model, cfg)
    spaced = create_diffusion(cfg, "ddim10")
    noise = torch.randn(2, 1, 16, 16)
    ours = sample(model, spaced, (2, 1, 16, 16), sampler="ddim", noise=noise, clip_denoised=clip)

    scheduler = diffusers.DDIMScheduler.from_config(diffusers_scheduler(cfg, clip).config)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == spaced.timestep_map[::-1]
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t).sample[:, :1]
            x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    assert (ours.abs() < 0.99).float().mean() > 0.2  # not just the clip bounds
    diff = (ours - x).abs().max().item()
    print(f"DDIM {schedule}/{mean_type}: max |ours - diffusers| = {diff:.3g}")
    assert diff < 1e-3


# ----------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("sections, message", [
    ({"data": {"image_size": 64}, "model": {"model_channels": 128, "attention_resolutions": [16, 8]}},
     "diffusers cannot represent model.num_heads=4 (without model.num_head_channels the head width differs"),
    ({"model": {"model_channels": 16, "num_head_channels": 16}}, "diffusers cannot represent model.model_channels=16"),
    ({"model": {"model_channels": 32, "channel_mult": [2, 2, 4], "num_head_channels": 32}},
     "diffusers cannot represent model.channel_mult=[2, 2, 4]"),
])
def test_unrepresentable_settings_are_named(sections, message):
    with pytest.raises(Exception) as exc:
        unet_config(config_from_dict(sections))
    assert str(exc.value).startswith(message)


def test_project_configs():
    """HP2 (and HP3, tiny-cpu) export; HP1 (num_heads 4 without num_head_channels) and sweep-64
    (48 channels: 16 and 32 GroupNorm groups) cannot."""
    for name in ("hp2-128", "hp3-gear", "tiny-cpu", "sweep-128-gpu"):
        assert unet_config(load_config(ROOT / "configs" / f"{name}.yaml"))["norm_num_groups"] == 32
    for name, key in (("hp1-64", "model.num_heads=4"), ("sweep-64", "model.model_channels=48")):
        with pytest.raises(Exception, match=key.replace(".", r"\.")):
            unet_config(load_config(ROOT / "configs" / f"{name}.yaml"))


# ------------------------------------------------------------------------------ the command

TINY = {"data": {"image_size": 32, "synthetic_count": 16},
        "model": {"model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [16],
                  "num_head_channels": 32},
        "diffusion": {"steps": 100, "noise_schedule": "linear"},
        "train": {"batch_size": 4, "max_steps": 2, "save_every": 2, "sample_every": 1000, "sample_count": 1,
                  "sample_steps": 2, "ema_rates": [0.9, 0.99], "log_every": 1}}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 32 px diffusion run trained 2 steps with two EMA rates."""
    import yaml

    from pipeline.cli import train_diffusion

    root = tmp_path_factory.mktemp("export")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    train_diffusion.main.__wrapped__(["--config", str(root / "tiny.yaml"), "--out", str(root / "run"), "--device", "cpu"])
    return root / "run"


def run(*argv):
    with pytest.raises(SystemExit) as exc:
        export_cli.main([str(a) for a in argv])
    return exc.value.code


def test_export_loads_in_diffusers_and_generates(trained_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run(trained_run, "--out", out) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "README.md", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert "EMA 0.99" in capsys.readouterr().out  # the slowest EMA by default

    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 1) and np.isfinite(images).all()
    diffusers.DDIMScheduler.from_pretrained(out, subfolder="scheduler")

    from guided_diffusion.training.checkpoint import load_for_inference
    ours, _, _ = load_for_inference(trained_run)  # the weights written are the EMA's, as they were
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([50])
    with torch.no_grad():
        assert (ours(x, t) - pipe.unet(x, t).sample).abs().max() < 1e-5

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: gpl-2.0\nlibrary_name: diffusers\n")
    for text in ("Steps trained: 2 optimizer steps", "circularity-check pass rate: not measured",
                 "KID: not measured", "16 synthetic near-infrared eyes", "GPL-2.0", "DDPMPipeline.from_pretrained",
                 "identity spoofing", "pupil is often not round"):
        assert text in card


def test_eval_folder_puts_measured_numbers_on_the_card(trained_run, tmp_path, monkeypatch):
    from pipeline import generate as gen_mod
    from pipeline.cli import circularity_check

    monkeypatch.setattr(gen_mod, "library_versions", dict)  # importing TensorFlow for its version takes ~10 s
    gen_cfg = load_config(None, ["generate.n=2", "generate.steps=2", "generate.batch_size=2"])
    result = gen_mod.generate(gen_cfg, trained_run, source="noise", device="cpu", progress=False)
    gen_mod.write_generation(result, tmp_path / "samples", overwrite=False)
    with pytest.raises(SystemExit) as exc:
        circularity_check.main([str(tmp_path / "samples"), "--workers", "1", "--reference", str(tmp_path / "samples")])
    assert exc.value.code == 0
    summary = json.loads((tmp_path / "samples_circularity" / "summary.json").read_text())

    assert run(trained_run, "--out", tmp_path / "hf", "--eval", tmp_path / "samples") == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"circularity-check pass rate: {100 * summary['pass_rate']:.1f} % ({summary['n_pass']} of 2 images)" in card
    assert "made by `generate` from noise, ddim 2 steps, seed 0" in card
    assert "KID: " in card and "proxy features, not Inception" in card and "not measured" not in card

    # the check's own folder works too; images made from other weights (EMA) do not describe the raw ones
    assert run(trained_run, "--out", tmp_path / "hf2", "--eval", tmp_path / "samples_circularity") == 0
    assert run(trained_run, "--out", tmp_path / "hf3", "--ema", 0, "--eval", tmp_path / "samples") == 2
    assert not (tmp_path / "hf3").exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unrepresentable_run_fails_before_writing(tiny_run, tmp_path, capsys):
    """conftest's tiny run has 16 channels: GroupNorms of 16 and 32 groups."""
    assert run(tiny_run, "--out", tmp_path / "hf") == 2
    assert one_error_line(capsys).startswith("error: diffusers cannot represent model.model_channels=16 (")
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder


def test_existing_output_needs_overwrite(trained_run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(trained_run, "--out", out) == 2
    assert "already exists" in one_error_line(capsys)
    assert (out / "keep.txt").read_text() == "mine"
    assert run(trained_run, "--out", out, "--overwrite", "--ema", 0) == 0
    assert not (out / "keep.txt").exists() and (out / "unet" / "config.json").is_file()
    assert "raw (no EMA)" in (out / "README.md").read_text()


def test_without_diffusers_says_how_to_install(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers → ImportError
    assert run(trained_run, "--out", tmp_path / "hf") == 2
    assert one_error_line(capsys) == f"error: {DIFFUSERS_MISSING}"
    assert DIFFUSERS_MISSING == "export needs diffusers: pip install -e '.[export]'"
