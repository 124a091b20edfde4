"""The report's pieces: figures saved as PNG and embedded as data URIs, small tables, and one
self-contained HTML page (no script, style sheet, font or image is fetched: a
Content-Security-Policy forbids every request except ``data:`` images, so it opens offline)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 1em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: .8em 0; } figcaption { font-size: .9em; color: #555; }
img { max-width: 100%; } .note { color: #555; font-size: .9em; }
"""


@dataclass
class Section:
    """One part of the report: a title and its HTML pieces, in order."""

    title: str
    parts: list[str] = field(default_factory=list)

    def text(self, words: str) -> None:
        """A paragraph of plain text (escaped)."""
        self.parts.append(f"<p>{html.escape(words)}</p>")

    def note(self, words: str) -> None:
        """A grey note (escaped)."""
        self.parts.append(f'<p class="note">{html.escape(words)}</p>')

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        """A table; floats are shown with 4 decimals."""
        def cell(v: Any) -> str:
            return html.escape(f"{v:.4f}" if isinstance(v, float) else str(v))

        head = "".join(f"<th>{cell(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>"
                       for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")


class Figures:
    """Saves each figure as ``out/<name>.png`` and gives its ``<figure>`` with the PNG
    embedded."""

    def __init__(self, out: Path):
        self.out = out
        self.saved: list[Path] = []

    def html(self, fig: plt.Figure, name: str, caption: str) -> str:
        """Save ``fig`` (then close it); its ``<figure>`` element, the PNG embedded."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        data = buf.getvalue()
        path = self.out / f"{name}.png"
        path.write_bytes(data)
        self.saved.append(path)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (f'<figure><img alt="{html.escape(name)}" src="{uri}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def add(self, section: Section, fig: plt.Figure, name: str, caption: str) -> None:
        """:meth:`html`, appended to ``section``."""
        section.parts.append(self.html(fig, name, caption))

    def side_by_side(self, section: Section, items: list[tuple[plt.Figure, str, str]]) -> None:
        """Several figures in one row of ``section``."""
        cells = "".join(f'<div style="flex: 1">{self.html(*item)}</div>' for item in items)
        section.parts.append(f'<div style="display: flex; gap: 1em">{cells}</div>')


def write_html(path: Path, title: str, intro: list[str], sections: list[Section]) -> Path:
    """The report as one HTML file."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f'<p class="note">{html.escape(line)}</p>' for line in intro]
    for s in sections:
        body.append(f"<section><h2>{html.escape(s.title)}</h2>{''.join(s.parts)}</section>")
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path
