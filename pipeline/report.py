"""A self-contained HTML report (images inlined as base64) built from simple sections."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top;text-align:center}
figure img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555} pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
.note{color:#555;font-size:.95em}
"""


@dataclass
class Section:
    """One heading with any of: a paragraph, a table, figures (caption, PNG path), preformatted text."""

    title: str
    text: str = ""
    table: list[list[object]] = field(default_factory=list)  # first row is the header
    figures: list[tuple[str, Path]] = field(default_factory=list)
    pre: str = ""


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: list[list[object]]) -> str:
    head, *body = rows
    out = ["<table><tr>", *(f"<th>{_cell(h)}</th>" for h in head), "</tr>"]
    for row in body:
        out += ["<tr>", *(f"<td>{_cell(v)}</td>" for v in row), "</tr>"]
    out.append("</table>")
    return "".join(out)


def render_html(title: str, sections: list[Section], subtitle: str = "") -> str:
    """The whole report as one HTML string."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p class='note'>{html.escape(subtitle)}</p>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{html.escape(sec.text)}</p>")
        if sec.table:
            parts.append(_table(sec.table))
        for caption, path in sec.figures:
            if Path(path).is_file():
                parts.append(f"<figure>{_img(path)}<figcaption>{html.escape(caption)}</figcaption></figure>")
        if sec.pre:
            parts.append(f"<pre>{html.escape(sec.pre)}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(path: str | Path, title: str, sections: list[Section], subtitle: str = "") -> Path:
    """Write the report atomically (temp file + rename) and return its path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(title, sections, subtitle), encoding="utf-8")
    os.replace(tmp, path)
    return path
