"""The house stays the right way up: imports point down only, and no module (benchmarks included)
grows past ~400 lines.

Layers, top to bottom (DESIGN.md): cli → app → (check, data, vae, training, core) → common, where
`training` (guided_diffusion/training/) may also use the diffusion `core` (guided_diffusion/*.py),
and the core imports nothing of the project but itself. Every import counts, including the lazy
ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vae", "guided_diffusion", "pipeline")
MAX_LINES = 400

ALLOWED = {
    "common": {"common"},
    "core": {"core"},
    "training": {"training", "core", "common"},
    "vae": {"vae", "common"},
    "data": {"data", "common"},
    "check": {"check", "common"},
    "app": {"app", "check", "data", "vae", "training", "core", "common"},
    "cli": {"cli", "app", "check", "data", "vae", "training", "core", "common"},
}


def layer(module: str) -> str:
    """The layer a dotted module name belongs to."""
    for prefix, name in (("pipeline.cli", "cli"), ("pipeline.common", "common"), ("pipeline.check", "check"),
                         ("pipeline.data", "data"), ("guided_diffusion.training", "training"),
                         ("guided_diffusion", "core"), ("vae", "vae"), ("pipeline", "app")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    raise ValueError(f"{module} is in no layer")


def project_imports(source: str, package_names: set[str]) -> set[str]:
    """Dotted project modules imported anywhere in `source` (`from pkg import mod` counts as pkg.mod
    when pkg.mod is a module or package of the project)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            subs = {f"{node.module}.{a.name}" for a in node.names} & package_names
            found.update(subs or {node.module})
    return found


def modules() -> dict[str, Path]:
    """Every module of the three packages by dotted name (packages by their own name)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def forbidden_edges(sources: dict[str, str]) -> list[str]:
    """'a → b (layer x → layer y)' for every import that points up or sideways."""
    names = set(sources)
    bad = []
    for module, source in sorted(sources.items()):
        for target in sorted(project_imports(source, names)):
            if layer(target) not in ALLOWED[layer(module)]:
                bad.append(f"{module} → {target} ({layer(module)} → {layer(target)})")
    return bad


def test_imports_point_down_only():
    sources = {name: path.read_text() for name, path in modules().items()}
    assert forbidden_edges(sources) == []


def test_the_rule_catches_upward_and_sideways_edges():
    """The check itself can fail: planted edges of each forbidden kind are reported, allowed ones not."""
    sources = {
        "guided_diffusion.samplers": "from pipeline.common.errors import UserError\n",
        "guided_diffusion.training.loop": "def f():\n    from pipeline.data.folders import load_image_array\n",
        "vae.train": "import guided_diffusion.unet\n",
        "pipeline.check.analyze": "from vae import priors\n",
        "pipeline.common.files": "from pipeline import generate\n",
        "pipeline.generate": "from pipeline.cli import entry\nfrom guided_diffusion.training import checkpoint\n",
        "pipeline.cli.entry": "from pipeline.generate import generate\n",
        "pipeline.cli": "", "pipeline.data.folders": "", "pipeline.check": "", "pipeline.data": "",
        "guided_diffusion.unet": "", "guided_diffusion.training.checkpoint": "", "vae.priors": "",
        "pipeline.common.errors": "",
    }
    assert forbidden_edges(sources) == [
        "guided_diffusion.samplers → pipeline.common.errors (core → common)",
        "guided_diffusion.training.loop → pipeline.data.folders (training → data)",
        "pipeline.check.analyze → vae.priors (check → vae)",
        "pipeline.common.files → pipeline.generate (common → app)",
        "pipeline.generate → pipeline.cli.entry (app → cli)",
        "vae.train → guided_diffusion.unet (vae → core)",
    ]


@pytest.mark.parametrize("folder", [*PACKAGES, "benchmarks"])
def test_no_module_over_the_line_limit(folder):
    long = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
