"""Typed config: YAML round trips, --set parsing and the one-line errors."""

import dataclasses
from pathlib import Path

import pytest

from pipeline.common.config import (
    Config,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from pipeline.common.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"hp1-64", "hp2-128", "hp3-gear", "tiny-cpu", "vae", "generate", "circularity"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dump_then_load_is_identical(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(cfg))
    again = load_config(out)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_file_values_are_applied():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "hp3-gear.yaml")
    assert cfg.data.image_size == 128 and cfg.diffusion.noise_schedule == "cosine"
    assert cfg.train.gear == [[0.0, 3e-4], [250.0, 1e-4]]
    assert all(isinstance(v, float) for pair in cfg.train.gear for v in pair)


def test_empty_config_is_all_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == Config()
    assert load_config(None) == Config()


def test_set_values_are_typed():
    cfg = load_config(None, [
        "train.lr=3e-4", "train.lr_schedule=gear", "train.gear=[[0, 3e-4], [100, 1e-4]]",
        "model.channel_mult=[1, 2, 2]", "data.hflip=false", "data.image_size=32",
        "diffusion.hybrid_lambda=1", "data.path=/tmp/my irises", "train.ema_rates=[0.999, 0.99]",
    ])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.gear == [[0.0, 3e-4], [100.0, 1e-4]]
    assert cfg.model.channel_mult == [1, 2, 2]
    assert cfg.data.hflip is False and cfg.data.image_size == 32
    assert cfg.diffusion.hybrid_lambda == 1.0 and isinstance(cfg.diffusion.hybrid_lambda, float)
    assert cfg.data.path == "/tmp/my irises"
    assert cfg.train.ema_rates == [0.999, 0.99]


def test_set_overrides_file_and_later_set_wins(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  image_size: 64\ntrain:\n")
    cfg = load_config(tmp_path / "c.yaml", ["data.image_size=128", "train.lr=1e-3", "train.lr=2e-3"])
    assert cfg.data.image_size == 128 and cfg.train.lr == 2e-3


def test_numeric_folder_name_is_a_string():
    assert load_config(None, ["data.path=2024"]).data.path == "2024"


@pytest.mark.parametrize("overrides,message", [
    (["data.bogus=1"], "unknown config key 'data.bogus'; valid keys: path, image_size"),
    (["nope.x=1"], "unknown config key 'nope'; valid keys: data, model"),
    (["data.image_size=1.5"], "config key 'data.image_size' must be int, got 1.5"),
    (["data.image_size=true"], "config key 'data.image_size' must be int"),
    (["data.hflip=3"], "config key 'data.hflip' must be bool"),
    (["train.lr=fast"], "config key 'train.lr' must be float, got 'fast'"),
    (["train.ema_rates=0.999"], "config key 'train.ema_rates' must be a list of float"),
    (["model.channel_mult=[1, x]"], "config key 'model.channel_mult[1]' must be int"),
    (["data=5"], "config section 'data' must be a mapping"),
    (["data.image_size"], "--set expects key=value"),
    (["data.path=abc", "data.path.x=1"], "'path' is not a section"),
])
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(UserError) as exc:
        load_config(None, overrides)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_key_lists_every_valid_key():
    with pytest.raises(UserError) as exc:
        config_from_dict({"vae": {"latent": 3}})
    for f in dataclasses.fields(Config().vae):
        assert f.name in str(exc.value)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  image_size: 64\n  path: [unclosed\n")
    with pytest.raises(UserError, match=r"invalid YAML in .*bad\.yaml \(line \d+\)"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must contain a mapping"):
        load_config(listed)
    typed = tmp_path / "typed.yaml"
    typed.write_text("train:\n  batch_size: many\n")
    with pytest.raises(UserError, match="config key 'train.batch_size' must be int, got 'many'"):
        load_config(typed)
