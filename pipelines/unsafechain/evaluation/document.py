"""A document written once as blocks of inline parts and rendered twice: as GitHub
Markdown and as one self-contained HTML page (inline CSS, images as data URIs, every text
escaped)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote


@dataclass(frozen=True)
class Code:
    """Inline code: a path, a model id, an identifier."""

    text: str


@dataclass(frozen=True)
class Link:
    """A link to a file relative to the report."""

    text: str
    href: str


@dataclass(frozen=True)
class Toned:
    """Text shown as good or bad news in HTML (a significant difference), plain in Markdown."""

    text: str
    tone: Literal["better", "worse"] | None


Inline = str | Code | Link | Toned
Parts = tuple[Inline, ...]


@dataclass(frozen=True)
class Heading:
    """A section heading."""

    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of inline parts."""

    parts: Parts


@dataclass(frozen=True)
class Bullets:
    """A bulleted list, one item of inline parts each."""

    items: tuple[Parts, ...]


@dataclass(frozen=True)
class Table:
    """A table; ``numeric`` right-aligns every column but the first."""

    header: tuple[str, ...]
    rows: tuple[tuple[Parts, ...], ...]
    numeric: bool = True


@dataclass(frozen=True)
class Image:
    """A plot, by its path relative to the report."""

    alt: str
    path: str


Block = Heading | Paragraph | Bullets | Table | Image


def _escape_markdown(text: str) -> str:
    """``text`` as Markdown that shows it literally, escaping only what would be markup
    there, so that figures such as ``+5.1 [+2.0, +8.1] **`` stay as they read."""
    text = " ".join(text.splitlines())
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        before = text[i - 1] if i else " "
        if c in "*_~":
            # A run of emphasis characters is markup unless whitespace is on both sides
            # (or, for ``_``, letters: ``final_number`` is a word).
            end = i
            while end < len(text) and text[end] == c:
                end += 1
            after = text[end] if end < len(text) else " "
            literal = (before.isspace() and after.isspace()) or (
                c == "_" and before.isalnum() and after.isalnum()
            )
            run = text[i:end]
            out.append(run if literal else "".join(f"\\{x}" for x in run))
            i = end
            continue
        after = text[i + 1] if i + 1 < len(text) else " "
        markup = (
            c in "\\`|"
            or (c == "<" and (after.isalpha() or after in "/!?"))
            or (c == "]" and after in "([:")
            or (c == "&" and (after.isalnum() or after == "#"))
            or (c == "#" and before.isspace())
        )
        out.append(f"\\{c}" if markup else c)
        i += 1
    return "".join(out)


def _href(path: str) -> str:
    return quote(path, safe="/._-~")


def _inline_markdown(part: Inline, *, in_table: bool) -> str:
    if isinstance(part, str | Toned):
        return _escape_markdown(part if isinstance(part, str) else part.text)
    if isinstance(part, Link):
        return f"[{_escape_markdown(part.text)}]({_href(part.href)})"
    # A code span is closed by a run of backticks as long as its opening one; a pipe
    # still ends a table cell inside one.
    code = " ".join(part.text.splitlines())
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence, pad = "`" * (longest + 1), " " if longest else ""
    if in_table:
        code = code.replace("|", "\\|")
    return f"{fence}{pad}{code}{pad}{fence}"


def _parts_markdown(parts: Parts, *, in_table: bool = False) -> str:
    # Neighbouring texts are escaped together: whether ``**`` is markup depends on both sides.
    out: list[str] = []
    text: list[str] = []
    for part in parts:
        if isinstance(part, str | Toned):
            text.append(part if isinstance(part, str) else part.text)
            continue
        out.append(_escape_markdown("".join(text)))
        text = []
        out.append(_inline_markdown(part, in_table=in_table))
    out.append(_escape_markdown("".join(text)))
    return "".join(out)


def render_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as GitHub-flavoured Markdown; text is escaped, paths are code spans."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {_escape_markdown(block.text)}")
        elif isinstance(block, Paragraph):
            out.append(_parts_markdown(block.parts))
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {_parts_markdown(item)}" for item in block.items))
        elif isinstance(block, Image):
            out.append(f"![{_escape_markdown(block.alt)}]({_href(block.path)})")
        else:
            align = ["---"] + ["---:" if block.numeric else "---"] * (len(block.header) - 1)
            lines = [
                "| " + " | ".join(_escape_markdown(cell) for cell in block.header) + " |",
                "|" + "|".join(align) + "|",
                *(
                    "| " + " | ".join(_parts_markdown(c, in_table=True) for c in row) + " |"
                    for row in block.rows
                ),
            ]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
  max-width: 72rem; padding: 0 1rem; color: #1d2330; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #1f4e79; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; color: #1f4e79; }
p, li { max-width: 60rem; }
.table { overflow-x: auto; margin: .8rem 0; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid #d8dde6; vertical-align: top; }
th { background: #eef2f7; text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:hover { background: #f6f8fb; }
td:first-child { font-weight: 600; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: .85em;
  background: #f2f4f7; padding: 0 .2em; border-radius: 3px; overflow-wrap: anywhere; }
.better { color: #1e7b34; font-weight: 600; }
.worse { color: #b3261e; font-weight: 600; }
img { max-width: 100%; height: auto; display: block; margin: 1rem 0; }
"""


def _inline_html(part: Inline) -> str:
    if isinstance(part, str):
        return html.escape(part)
    if isinstance(part, Code):
        return f"<code>{html.escape(part.text)}</code>"
    if isinstance(part, Link):
        return f'<a href="{html.escape(_href(part.href))}">{html.escape(part.text)}</a>'
    if part.tone is None:
        return html.escape(part.text)
    return f'<span class="{part.tone}">{html.escape(part.text)}</span>'


def _parts_html(parts: Parts) -> str:
    return "".join(_inline_html(part) for part in parts)


def render_html(blocks: Sequence[Block], images: Mapping[str, bytes], *, title: str) -> str:
    """The blocks as one self-contained HTML page: inline CSS, the plots as data URIs, every
    text escaped, links relative to the page.

    Args:
        blocks: The document.
        images: The PNG bytes of every ``Image`` block, by its path.
        title: The page's title.
    """
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_parts_html(block.parts)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_parts_html(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Image):
            data = base64.b64encode(images[block.path]).decode("ascii")
            body.append(f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">')
        else:
            kind = ' class="num"' if block.numeric else ""
            head = "".join(
                f"<th{kind if i else ''}>{html.escape(cell)}</th>"
                for i, cell in enumerate(block.header)
            )
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<td{kind if i else ''}>{_parts_html(cell)}</td>" for i, cell in enumerate(row)
                )
                + "</tr>"
                for row in block.rows
            )
            body.append(
                f'<div class="table"><table><thead><tr>{head}</tr></thead>'
                f"<tbody>{rows}</tbody></table></div>"
            )
    content = "\n".join(body)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{content}\n</body>\n</html>\n"
    )
