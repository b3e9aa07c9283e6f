"""One self-contained HTML page: inline CSS, images as data URIs, no script, no font, no link out.

:class:`Page` collects sections (headings, paragraphs, tables, PNG figures) and
:meth:`Page.render` returns the whole document as text. Everything is escaped; the only
``src`` attributes are ``data:image/png;base64,...`` and the only ``href`` attributes are
in-page anchors (``#section``), so the file opens the same from a USB stick with no network.
The layout is one column that scales images and scrolls wide tables sideways, readable at a
phone's width.
"""

from __future__ import annotations

import base64
import html
import re
from typing import Sequence

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:0 12px 40px;
     color:#1b1b1f;background:#fafafa;line-height:1.45;max-width:1100px;margin-inline:auto}
h1{font-size:1.5rem;margin:18px 0 4px}h2{font-size:1.2rem;margin:28px 0 6px;border-bottom:1px solid #ddd}
p,h1,h2,figcaption{overflow-wrap:anywhere}p.note,.small{color:#555;font-size:.9rem}nav{font-size:.9rem;margin:8px 0}nav a{margin-right:10px;white-space:nowrap}
figure{margin:10px 0}figure img{max-width:100%;height:auto;display:block;border:1px solid #e4e4e4;background:#fff}
figcaption{font-size:.85rem;color:#555}.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:.85rem;background:#fff;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f0f0f4}td.l,th.l{text-align:left}tr.blend td{font-weight:600;background:#f4f8ff}
code{font-size:.85em;background:#eee;padding:0 3px;border-radius:3px}
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def anchor(title: str) -> str:
    """The in-page id of a section title."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


class Page:
    """An HTML report under construction; sections are added in reading order."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.sections: list[str] = []
        self.images = 0

    def section(self, title: str) -> None:
        self.sections.append(title)
        self.parts.append(f'<h2 id="{anchor(title)}">{_e(title)}</h2>')

    def text(self, text: str, note: bool = False) -> None:
        self.parts.append(f'<p{" class=note" if note else ""}>{_e(text)}</p>')

    def image(self, png: bytes, alt: str, caption: str | None = None) -> None:
        data = base64.b64encode(png).decode("ascii")
        cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{cap}</figure>')
        self.images += 1

    def table(self, columns: Sequence[str], rows: Sequence[Sequence], left: int = 1,
              emphasis: Sequence[bool] | None = None) -> None:
        """A table; the first ``left`` columns are left-aligned; ``emphasis`` marks blend rows."""
        head = "".join(f'<th{" class=l" if i < left else ""}>{_e(c)}</th>' for i, c in enumerate(columns))
        body = []
        for r, row in enumerate(rows):
            cls = ' class="blend"' if emphasis is not None and emphasis[r] else ""
            cells = "".join(f'<td{" class=l" if i < left else ""}>{_e(v)}</td>' for i, v in enumerate(row))
            body.append(f"<tr{cls}>{cells}</tr>")
        self.parts.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
                          "</tbody></table></div>")

    def render(self, subtitle: str = "") -> str:
        nav = " ".join(f'<a href="#{anchor(t)}">{_e(t)}</a>' for t in self.sections)
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{_e(self.title)}</title><style>{CSS}</style></head><body>"
                f"<h1>{_e(self.title)}</h1><p class=note>{_e(subtitle)}</p><nav>{nav}</nav>"
                + "\n".join(self.parts) + "</body></html>\n")
