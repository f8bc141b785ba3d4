"""A report as a list of blocks, rendered to Markdown and to one self-contained HTML page.

Blocks: :class:`Heading`, :class:`Para`, :class:`Table` (a DataFrame) and :class:`Image`
(a PNG file). The HTML embeds every PNG as a base64 ``data:`` URI, so the page opens from
disk, by e-mail or on another machine; the Markdown links the PNGs relatively.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import pandas as pd

__all__ = ["Heading", "Para", "Table", "Image", "Block", "format_value", "render_markdown",
           "render_html"]


@dataclass(frozen=True)
class Heading:
    """A section title (level 1-4)."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    """A paragraph of plain text (escaped; `code` spans are kept in Markdown only)."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table; ``columns`` picks and orders columns (default: all)."""

    df: pd.DataFrame
    columns: Sequence[str] | None = None
    empty_text: str = "none"


@dataclass(frozen=True)
class Image:
    """A PNG file shown with a caption."""

    path: Path
    caption: str


Block = Union[Heading, Para, Table, Image]


def format_value(v: Any) -> str:
    """One table cell: 6 significant digits for floats, '—' for missing or non-finite."""
    if v is None or v is pd.NA:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.6g}"
    try:
        if pd.isna(v):
            return "—"
    except (TypeError, ValueError):
        pass
    if hasattr(v, "item"):  # numpy scalars
        return format_value(v.item())
    return str(v)


def _cells(table: Table) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in (table.columns or list(table.df.columns)) if c in table.df.columns]
    rows = [[format_value(v) for v in rec] for rec in table.df[cols].itertuples(index=False)]
    return [str(c) for c in cols], rows


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown text; images are linked relative to ``base`` (the report folder)."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Table):
            if b.df.empty:
                out += [f"_{b.empty_text}_", ""]
                continue
            cols, rows = _cells(b)
            out.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
            out.append("|" + "|".join(" --- " for _ in cols) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
        elif isinstance(b, Image):
            rel = Path(os.path.relpath(b.path, base)).as_posix()
            out += [f"![{b.caption}]({rel})", "", f"_{b.caption}_", ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:78em;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td.t{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}p.empty{color:#777;font-style:italic}
"""


_NUMBER = re.compile(r"^(-?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?|-?inf|—)$")


def _html_table(table: Table) -> str:
    if table.df.empty:
        return f"<p class='empty'>{html.escape(table.empty_text)}</p>"
    cols, rows = _cells(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        tds = []
        for c in r:
            # Numbers right-aligned, text left-aligned.
            numeric = _NUMBER.match(c) is not None
            tds.append(f"<td{'' if numeric else ' class=t'}>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained HTML page (inline CSS, PNGs embedded as data URIs)."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            anchor = "".join(ch if ch.isalnum() else "-" for ch in b.text.lower()).strip("-")
            parts.append(f"<h{b.level} id='{anchor}'>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{html.escape(b.text).replace('`', '')}</p>")
        elif isinstance(b, Table):
            parts.append(_html_table(b))
        elif isinstance(b, Image):
            parts.append(f"<figure><img src='{_data_uri(b.path)}' alt='{html.escape(b.caption)}'>"
                         f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
