"""Self-contained HTML reports: figures embedded as base64 PNG (and saved beside the HTML), a table of contents,
the run config and the numbers behind each plot."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..utils import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.85em;color:#555;max-width:520px}
img{max-width:520px;border:1px solid #eee}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f4f4f4}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}.finding{background:#fff7e0;padding:.5em;border-left:4px solid #e0a000}
details{margin:.4em 0}
"""


@dataclass
class Figure:
    name: str  # file stem, e.g. "loss"
    fig: object  # matplotlib Figure
    caption: str = ""


@dataclass
class Section:
    title: str
    text: str = ""  # HTML allowed (already escaped by the caller where needed)
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)  # (caption, rows)


def table_html(rows: list[dict], caption: str = "", max_rows: int = 200) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)

    def cell(v):
        if isinstance(v, float):
            return f"{v:.6g}"
        return html.escape(str(v))

    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows[:max_rows])
    more = f"<p>({len(rows) - max_rows} more rows in the CSV)</p>" if len(rows) > max_rows else ""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<details><summary>{html.escape(caption or 'numbers')}</summary><table>{cap}<tr>{head}</tr>{body}</table>{more}</details>"


def write_report(path: str | Path, title: str, sections: list[Section], config_text: str = "", links: dict | None = None) -> Path:
    """Write ``path`` (HTML) with every figure embedded and also saved as ``figures/<name>.png`` beside it.

    Figures are rendered through their own canvas (``Figure.savefig``): pyplot and the process-wide matplotlib
    backend are not touched.
    """
    path = Path(path)
    fig_dir = path.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    toc, parts = [], []
    for i, sec in enumerate(sections):
        anchor = f"s{i}"
        toc.append(f'<li><a href="#{anchor}">{html.escape(sec.title)}</a></li>')
        out = [f'<h2 id="{anchor}">{html.escape(sec.title)}</h2>', sec.text]
        for f in sec.figures:
            buf = io.BytesIO()
            f.fig.savefig(buf, format="png", dpi=100)
            data = buf.getvalue()
            (fig_dir / f"{f.name}.png").write_bytes(data)
            b64 = base64.b64encode(data).decode()
            out.append(
                f'<figure><img alt="{html.escape(f.caption or f.name)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{html.escape(f.caption)} (<a href=\"figures/{f.name}.png\">PNG</a>)</figcaption></figure>"
            )
        for caption, rows in sec.tables:
            out.append(table_html(rows, caption))
        parts.append("\n".join(out))
    link_html = ""
    if links:
        link_html = "<p>" + " · ".join(f'<a href="{html.escape(v)}">{html.escape(k)}</a>' for k, v in links.items()) + "</p>"
    cfg = f"<h2 id=\"config\">Run config</h2><pre>{html.escape(config_text)}</pre>" if config_text else ""
    toc_html = "<ol>" + "".join(toc) + ('<li><a href="#config">Run config</a></li>' if cfg else "") + "</ol>"
    doc = (
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{link_html}<nav><h2>Contents</h2>{toc_html}</nav>"
        + "\n".join(parts) + cfg + "</body></html>\n"
    )
    atomic_write_text(path, doc)
    return path
