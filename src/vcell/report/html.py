"""Small HTML helpers: escaping, number formatting, tables, the page shell (inline CSS only).

Every piece of text that reaches the page goes through :func:`esc`; the only URLs the page ever
contains are ``data:`` images and ``#`` anchors, and a Content-Security-Policy forbids the
browser from loading anything else.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence

#: Forbids every network or file load; only inline styles and data: images are allowed.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
:root { --fg:#1d2329; --muted:#5b6670; --line:#d8dde2; --accent:#1f5f99; --best:#d7f0d2; --bg:#ffffff; --panel:#f6f8fa; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif;
  font-size:15px; line-height:1.5; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 64px; }
header.top { border-bottom: 3px solid var(--accent); padding-bottom: 12px; margin-bottom: 18px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 6px; }
.subtitle { color: var(--muted); margin: 0; }
dl.meta { display:grid; grid-template-columns: max-content 1fr max-content 1fr; gap: 2px 18px; margin: 12px 0 0; font-size: 14px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; word-break: break-word; }
.headline { background: var(--panel); border-left: 4px solid var(--accent); padding: 10px 14px; margin: 14px 0; }
nav.toc { font-size: 14px; margin: 8px 0; }
nav.toc a { color: var(--accent); margin-right: 14px; text-decoration: none; }
.note { color: var(--muted); font-size: 13.5px; max-width: 1100px; }
.warn { background:#fff4e5; border-left: 4px solid #e69500; padding: 6px 10px; font-size: 13.5px; margin: 6px 0; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--panel); font-weight: 600; position: sticky; top: 0; }
th.text, td.text { text-align: left; }
th.wrap { white-space: normal; min-width: 6.5em; max-width: 11em; vertical-align: bottom; }
tr.group th { background: #e9eef3; text-align: left; font-size: 13.5px; }
td.best { background: var(--best); font-weight: 700; }
td.null { color: var(--muted); }
th .dir { display:block; font-weight: 400; color: var(--muted); font-size: 11px; }
figure { margin: 12px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13.5px; max-width: 1100px; margin-top: 4px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--line); padding-top: 8px; }
@media print { main { max-width: none; padding: 0; } .scroll { overflow: visible; } h2 { break-after: avoid; } figure { break-inside: avoid; } }
"""


def esc(value) -> str:
    """HTML-escape any value's text (quotes included, safe inside attributes)."""
    return html.escape(str(value), quote=True)


def fmt_number(value) -> str:
    """A table number: 4 significant digits; ``–`` for a null, ``NaN`` for NaN."""
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(v):
        return "NaN"
    return f"{v:.4g}"


def is_null(value) -> bool:
    """True for None, NaN and anything that is not a number."""
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def tag(name: str, body: str = "", **attrs) -> str:
    """``<name attr="...">body</name>``; attribute values are escaped, body is trusted HTML."""
    parts = [name] + [f'{k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None]
    return f"<{' '.join(parts)}>{body}</{name}>"


def figure(uri: str, alt: str, caption: str = "") -> str:
    """An embedded PNG (a ``data:`` URI) with its caption (caption: trusted HTML)."""
    if not uri.startswith("data:image/"):
        raise ValueError("figures must be embedded data: URIs")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}">{cap}</figure>'


def definition_list(items: Iterable[tuple[str, str]]) -> str:
    """A ``<dl>`` of (label, value) pairs, both escaped."""
    return '<dl class="meta">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def simple_table(header: Sequence[str], rows: Iterable[Sequence], text_cols: int = 1) -> str:
    """A plain table; the first ``text_cols`` columns are left-aligned text, the rest numbers
    (floats formatted by :func:`fmt_number`, anything else as text). Everything escaped."""
    head = "".join(tag("th", esc(h), class_="text" if i < text_cols else None) for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = fmt_number(v) if isinstance(v, float) else str(v)
            cells.append(tag("td", esc(text), class_="text" if i < text_cols else None))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return '<div class="scroll"><table><thead><tr>' + head + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>"


def page(title: str, body: str) -> str:
    """The whole document: doctype, charset, CSP, inline CSS, body (trusted HTML)."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
