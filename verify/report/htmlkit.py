"""Pieces of the self-contained HTML reports: one file, figures embedded as
base64 PNG data URIs, nothing fetched from anywhere."""

from __future__ import annotations

import base64
from html import escape

STYLE = """
body { font-family: sans-serif; max-width: 1500px; margin: 1em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
"""


def table(headers, body, cell_class=None) -> str:
    """An HTML table of escaped text; `cell_class(column, value)` may name a CSS
    class for a cell."""
    out = ["<table><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in headers) + "</tr>"]
    for row in body:
        cells = []
        for i, cell in enumerate(row):
            cls = cell_class(i, cell) if cell_class else None
            attr = f' class="{cls}"' if cls else ""
            cells.append(f"<td{attr}>{escape(str(cell))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def img(png: bytes, alt: str, **data) -> str:
    """An <img> holding `png` as a data URI; `data` become data-* attributes."""
    attrs = "".join(f' data-{k}="{escape(str(v))}"' for k, v in data.items())
    return (f'<img alt="{escape(alt)}"{attrs} '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def page(title: str, parts, style: str = "") -> str:
    return "\n".join([f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
                      f"<title>{escape(title)}</title><style>{STYLE}{style}</style></head><body>",
                      *parts, "</body></html>", ""])
