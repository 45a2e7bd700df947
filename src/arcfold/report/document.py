"""A report as a few plain blocks (headings, paragraphs, tables, images), written as Markdown and as one
self-contained HTML file.

The HTML embeds every image as a data URI, so the one file shows its plots wherever it is opened: from disk, or
inside the MLflow UI, whose artifact view renders an .html artifact in a frame. The Markdown names each image
through `image_src` (a relative file name on disk; MLflow's Markdown view shows only images with an http(s)
address, so the copy logged there points at the UI's own artifact URL).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str  # Markdown inline: **bold** and `code` are kept in the HTML too


@dataclass(frozen=True)
class Table:
    rows: Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Image:
    path: Path
    alt: str


Block = Union[Heading, Paragraph, Table, Image]


def markdown_table(rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in cols) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(blocks: Sequence[Block], image_src: Callable[[Path], str] = lambda p: p.name) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Table):
            out.append(markdown_table(b.rows))
        else:
            out.append(f"![{b.alt}]({image_src(b.path)})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code` as tags."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def data_uri(path: Path) -> str:
    kind = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


STYLE = """body { font-family: system-ui, sans-serif; margin: 1em; color: #1f2328; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #d0d7de; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
img { max-width: 100%; margin: 0.5em 0; display: block; }
code { background: #f6f8fa; padding: 0 0.2em; }"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """One HTML page, images inline as data URIs: nothing else is needed to show it."""
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            if not b.rows:
                continue
            cols = list(b.rows[0])
            head = "".join(f"<th>{_inline(c)}</th>" for c in cols)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            body.append(f'<img alt="{html.escape(b.alt)}" src="{data_uri(b.path)}">')
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


__all__ = ["Block", "Heading", "Image", "Paragraph", "Table", "data_uri", "markdown_table", "to_html", "to_markdown"]
