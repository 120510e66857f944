"""Point the Colab badges and the notebooks' REPO_URL at one GitHub repository.

    python colab/set_repo.py [URL]        (or: make colab-links [URL=…])
    python colab/set_repo.py --check      exit 1 when a file is not in step with pyproject.toml

The repository lives in one place, `[project.urls] Repository` of pyproject.toml. This tool writes
the URL there and regenerates every place derived from it: the "Open in Colab" badge links of
README.md, colab/README.md and each notebook's first cell, and the `REPO_URL = "…"` line of each
notebook's first code cell (the line the notebook clones from when it runs in Colab).

URL: the argument, else the `origin` git remote when it is a GitHub repository, else pyproject's
Repository URL (which then only regenerates the other files). https://github.com/<owner>/<name>,
with or without `.git`, and git@github.com:<owner>/<name>.git are accepted. Running it twice changes
nothing the second time; every file is written to a temp file and renamed into place.

Standard library only, so it runs before the package is installed. A bad URL or a missing file is
one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_train_vae", "02_train_diffusion", "03_generate_and_check")
READMES = ("README.md", "colab/README.md")

GITHUB = re.compile(r"^(?:https://github\.com/|git@github\.com:|ssh://git@github\.com/)"
                    r"(?P<owner>[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)/(?P<name>[A-Za-z0-9._-]+?)(?:\.git)?/?$")
REPOSITORY_LINE = re.compile(r'^(Repository\s*=\s*)"([^"]*)"', re.M)
URLS_TABLE = re.compile(r"^\[project\.urls\]\s*$", re.M)
BADGE = re.compile(r"(https://colab\.research\.google\.com/github/)[^/\s)\"]+/[^/\s)\"]+(/blob/)")
REPO_URL_LINE = re.compile(r'^REPO_URL = .*$', re.M)
REPO_URL_COMMENT = "# written by colab/set_repo.py from pyproject.toml: run it for a fork"


class UsageError(Exception):
    """A mistake of the caller: reported as one `error:` line, exit code 2."""


def normalise(url: str) -> str:
    """https://github.com/<owner>/<name> for any accepted spelling of a GitHub repository URL."""
    match = GITHUB.match(url.strip())
    if not match or match["name"] in (".", ".."):
        raise UsageError(f"not a GitHub repository URL: {url!r} (expected https://github.com/<owner>/<name>)")
    return f"https://github.com/{match['owner']}/{match['name']}"


def pyproject_url(text: str) -> str:
    """The Repository URL of pyproject.toml's [project.urls] table."""
    table = URLS_TABLE.search(text)
    match = REPOSITORY_LINE.search(text, table.end()) if table else None
    if not match or "\n[" in text[table.end():match.start()]:
        raise UsageError('pyproject.toml has no [project.urls] Repository = "https://github.com/…" line')
    return normalise(match[2])


def origin_url(root: Path) -> str | None:
    """The `origin` remote, normalised, when it is a GitHub repository; else None."""
    try:
        out = subprocess.run(["git", "-C", str(root), "remote", "get-url", "origin"], capture_output=True,
                             text=True, check=False).stdout.strip()
    except OSError:  # no git
        return None
    try:
        return normalise(out) if out else None
    except UsageError:
        return None


def with_pyproject_url(text: str, url: str) -> str:
    """pyproject.toml's text with its Repository URL set to `url`."""
    pyproject_url(text)  # there is one to replace
    table = URLS_TABLE.search(text)
    return text[:table.end()] + REPOSITORY_LINE.sub(rf'\g<1>"{url}"', text[table.end():], count=1)


def with_badges(text: str, url: str) -> str:
    """`text` with every Colab badge link pointing at the repository `url`."""
    owner_name = url.removeprefix("https://github.com/")
    return BADGE.sub(lambda m: f"{m[1]}{owner_name}{m[2]}", text)


def notebook_text(text: str, url: str, name: str) -> str:
    """A notebook's JSON with its badges and its first code cell's REPO_URL line set to `url`."""
    nb = json.loads(text)
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    if not code or not REPO_URL_LINE.search("".join(code[0]["source"])):
        raise UsageError(f"{name}: the first code cell has no 'REPO_URL = …' line")
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            source = with_badges(source, url)
        elif cell is code[0]:
            source = REPO_URL_LINE.sub(f'REPO_URL = "{url}"  {REPO_URL_COMMENT}', source, count=1)
        cell["source"] = source.splitlines(keepends=True)
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"  # nbformat's own layout


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def updated_files(root: Path, url: str) -> dict[Path, tuple[str, str]]:
    """{path: (current text, text with `url`)} for pyproject.toml, the READMEs and the notebooks."""
    out = {}

    def read(rel: str) -> str:
        path = root / rel
        if not path.is_file():
            raise UsageError(f"file not found: {path}")
        return path.read_text(encoding="utf-8")

    text = read("pyproject.toml")
    out[root / "pyproject.toml"] = (text, with_pyproject_url(text, url))
    for rel in READMES:
        text = read(rel)
        out[root / rel] = (text, with_badges(text, url))
    for name in NOTEBOOKS:
        rel = f"colab/{name}.ipynb"
        text = read(rel)
        out[root / rel] = (text, notebook_text(text, url, rel))
    return out


def choose_url(root: Path, given: str | None) -> tuple[str, str]:
    """(URL, where it came from): the argument, the origin remote, or pyproject.toml."""
    if given:
        return normalise(given), "the command line"
    origin = origin_url(root)
    if origin:
        return origin, "the origin remote"
    return pyproject_url((root / "pyproject.toml").read_text(encoding="utf-8")), "pyproject.toml"


def run(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(prog="set_repo.py", description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="https://github.com/<owner>/<name> (default: the origin remote if it "
                        "is on GitHub, else pyproject.toml's Repository URL)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of step "
                        "with pyproject.toml's Repository URL")
    args = parser.parse_args(argv)
    if args.check:
        if args.url:
            raise UsageError("--check compares with pyproject.toml: give no URL")
        url = pyproject_url((root / "pyproject.toml").read_text(encoding="utf-8"))
        stale = [path for path, (old, new) in updated_files(root, url).items() if old != new]
        for path in stale:
            print(f"{path.relative_to(root)}: not pointing at {url}; run: python colab/set_repo.py", file=sys.stderr)
        return 1 if stale else 0
    url, source = choose_url(root, args.url)
    changed = []
    for path, (old, new) in updated_files(root, url).items():  # everything is checked before anything is written
        if old != new:
            write_atomic(path, new)
            changed.append(str(path.relative_to(root)))
    done = f"updated {', '.join(changed)}" if changed else "all files up to date"
    print(f"repository {url} (from {source}): {done}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv, ROOT)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
