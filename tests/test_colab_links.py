"""The Colab badges and the notebooks' REPO_URL: no placeholder left, all of them agree with
pyproject.toml's [project.urls] Repository, and colab/set_repo.py regenerates them from it (or from
a URL or the origin remote) idempotently."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
BADGE = re.compile(r"https://colab\.research\.google\.com/github/([^/\s)\"]+)/([^/\s)\"]+)/blob/main/colab/([\w.-]+\.ipynb)")


def load_tool():
    spec = importlib.util.spec_from_file_location("set_repo", ROOT / "colab" / "set_repo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def repository(root: Path = ROOT) -> str:
    """pyproject.toml's [project.urls] Repository (read without tomllib, which Python 3.10 lacks)."""
    urls = (root / "pyproject.toml").read_text().split("[project.urls]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^Repository = "([^"]+)"', urls, re.M)[1]


def notebook_sources(path: Path) -> list[tuple[str, str]]:
    return [(cell["cell_type"], "".join(cell["source"])) for cell in json.loads(path.read_text())["cells"]]


# ------------------------------------------------------------------ the repository as committed


def test_pyproject_names_a_github_repository():
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository())


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "colab" / "README.md", *NOTEBOOKS], ids=lambda p: p.name)
def test_no_owner_placeholder(path):
    assert "OWNER" not in path.read_text()


@pytest.mark.parametrize("readme", ["README.md", "colab/README.md"])
def test_readme_badges_point_at_the_repository(readme):
    owner_name = repository().removeprefix("https://github.com/")
    text = (ROOT / readme).read_text()
    badges = BADGE.findall(text)
    assert sorted(nb for *_, nb in badges) == [p.name for p in NOTEBOOKS]  # one badge per notebook
    assert {f"{owner}/{name}" for owner, name, _ in badges} == {owner_name}
    assert text.count("colab.research.google.com/github/") == len(badges)  # no other spelling left out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_badge_and_repo_url_point_at_the_repository(path):
    url = repository()
    cells = notebook_sources(path)
    badges = [b for kind, src in cells if kind == "markdown" for b in BADGE.findall(src)]
    assert badges == [(*url.removeprefix("https://github.com/").split("/"), path.name)]
    code = [src for kind, src in cells if kind == "code"]
    assert re.search(rf'^REPO_URL = "{re.escape(url)}"(\s*#.*)?$', code[0], re.M)
    assert sum(len(re.findall(r"^REPO_URL\s*=", src, re.M)) for src in code) == 1


def test_check_mode_passes_on_the_repository(capsys):
    assert load_tool().run(["--check"]) == 0


# ------------------------------------------------------------------ the tool, on a copy


@pytest.fixture
def copy(tmp_path) -> Path:
    """The files the tool reads and writes, copied into tmp_path."""
    for rel in ("pyproject.toml", "README.md", "colab/README.md", *(f"colab/{p.name}" for p in NOTEBOOKS)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.parts}


def test_rewrites_every_place_and_is_idempotent(copy, capsys):
    tool = load_tool()
    assert tool.run(["git@github.com:someone/iris-fork.git"], root=copy) == 0
    assert "updated" in capsys.readouterr().out
    fork = "https://github.com/someone/iris-fork"
    assert repository(copy) == fork
    for rel in ("README.md", "colab/README.md"):
        badges = BADGE.findall((copy / rel).read_text())
        assert len(badges) == len(NOTEBOOKS) and {(o, n) for o, n, _ in badges} == {("someone", "iris-fork")}
    for nb in NOTEBOOKS:
        code = [src for kind, src in notebook_sources(copy / "colab" / nb.name) if kind == "code"]
        assert f'REPO_URL = "{fork}"' in code[0]
        json.loads((copy / "colab" / nb.name).read_text())  # still a notebook
    before = snapshot(copy)
    assert tool.run(["https://github.com/someone/iris-fork/"], root=copy) == 0
    assert "all files up to date" in capsys.readouterr().out
    assert snapshot(copy) == before
    assert tool.run(["--check"], root=copy) == 0
    # back to the original: byte for byte what is committed (the notebooks keep nbformat's layout)
    assert tool.run([repository()], root=copy) == 0
    assert all(before_bytes == (ROOT / rel).read_bytes() for rel, before_bytes in snapshot(copy).items())


def test_check_finds_a_hand_edited_badge(copy, capsys):
    tool = load_tool()
    readme = copy / "colab" / "README.md"
    readme.write_text(readme.read_text().replace("github/iris-diffusion/", "github/OWNER/", 1))
    assert tool.run(["--check"], root=copy) == 1
    assert "colab/README.md" in capsys.readouterr().err
    assert tool.run([], root=copy) == 0  # no origin remote: pyproject's URL
    assert tool.run(["--check"], root=copy) == 0


def test_default_is_the_origin_remote_when_it_is_on_github(copy, capsys):
    tool = load_tool()
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    subprocess.run(["git", "-C", str(copy), "remote", "add", "origin", "/some/local/mirror.git"], check=True)
    assert tool.run([], root=copy) == 0
    assert "from pyproject.toml" in capsys.readouterr().out  # not a GitHub remote: ignored
    subprocess.run(["git", "-C", str(copy), "remote", "set-url", "origin", "https://github.com/me/mine.git"], check=True)
    assert tool.run([], root=copy) == 0
    assert "https://github.com/me/mine (from the origin remote)" in capsys.readouterr().out
    assert 'Repository = "https://github.com/me/mine"' in (copy / "pyproject.toml").read_text()


@pytest.mark.parametrize("args", [["https://gitlab.com/me/iris"], ["github.com/me"], ["--check", "https://github.com/a/b"]])
def test_bad_input_is_one_error_line_and_changes_nothing(copy, args, capsys, monkeypatch):
    tool = load_tool()
    monkeypatch.setattr(tool, "ROOT", copy)
    before = snapshot(copy)
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert snapshot(copy) == before


def test_a_broken_notebook_stops_before_anything_is_written(copy, capsys):
    tool = load_tool()
    nb = copy / "colab" / NOTEBOOKS[-1].name
    nb.write_text(nb.read_text().replace("REPO_URL = ", "REPO = "))
    before = snapshot(copy)
    with pytest.raises(tool.UsageError, match="REPO_URL"):
        tool.run(["https://github.com/someone/else"], root=copy)
    assert snapshot(copy) == before
