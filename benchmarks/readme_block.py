"""Put a file that a run wrote into README.md, between `<!-- NAME -->` and `<!-- /NAME -->` markers,
so the README's tables are copied from the runs and never typed.

    python benchmarks/readme_block.py NAME FILE [--readme README.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_block(text: str, name: str, content: str) -> str:
    """`text` with the lines between the NAME markers replaced by `content`; ValueError without markers."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"README needs one '{start}' line followed by one '{end}' line")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("file", type=Path)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args()
    try:
        text = replace_block(args.readme.read_text(), args.name, args.file.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tmp = args.readme.with_name(f".{args.readme.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.readme)
    print(f"wrote {args.readme} (block {args.name} from {args.file})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
