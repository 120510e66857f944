"""Every console script's `--help` shows a `--set` example from its own config section, and the
example is a real key with a valid value."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from pipeline.common.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SECTION = {  # the config section each script is about; None: the script takes no --set
    "train-vae": "vae",
    "train-diffusion": "train",
    "generate": "generate",
    "circularity-check": "circularity",
    "prepare-data": "prepare",
    "identity-check": "identity",
    "export": "generate",  # the card records the sampling settings (clip_denoised → clip_sample)
    "iris-demo": "data",  # the demo's own choice is its synthetic data set (all sections apply)
    "synthetic-irises": None,  # its options (--n, --size, --seed, --defects) are flags, not config keys
}


def console_scripts() -> dict[str, str]:
    """{script: 'module:function'} of pyproject.toml's [project.scripts]."""
    table = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', table, re.M))


def help_text(entry: str, capsys) -> str:
    module, func = entry.split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: one line of words


def test_every_script_is_listed():
    assert set(console_scripts()) == set(SECTION)


@pytest.mark.parametrize("script", sorted(SECTION))
def test_set_help_shows_a_key_of_the_scripts_own_section(script, capsys):
    text = help_text(console_scripts()[script], capsys)
    examples = re.findall(r"e\.g\. --set ([\w.]+)=(\S+?)[ ,;)]", text)
    section = SECTION[script]
    if section is None:
        assert "--set" not in text
        return
    assert len(examples) == 1, examples
    (key, value), = examples
    assert key.split(".")[0] == section, f"{script}: --set example {key} is not of section {section!r}"
    fields = {f.name for f in dataclasses.fields(type(getattr(Config(), section)))}
    assert key.count(".") == 1 and key.split(".")[1] in fields, f"{script}: {key} is not a config key"
    cfg = load_config(None, [f"{key}={value}"])  # and the value has the key's type
    assert getattr(getattr(cfg, section), key.split(".")[1]) != getattr(getattr(Config(), section), key.split(".")[1])
