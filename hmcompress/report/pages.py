"""Self-contained HTML pages (tables and PNGs embedded as data URIs) for CI artifacts.

One file, no scripts, no external resources: it opens the same from a CI artifact, an e-mail or
a local disk. The figures and tables are those of the terminal and `plots`; nothing is recomputed.
"""
from __future__ import annotations

import base64
import html

from hmcompress.compare.comparison import Comparison, TextTable, tables
from hmcompress.report import tables as report

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 0.3em; }
th, td { border: 1px solid #bbb; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
td.flag { background: #fde2e1; font-weight: bold; }
p.note { font-size: 12px; color: #444; margin: 0.2em 0; max-width: 70em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
details { margin: 0.3em 0; } summary { cursor: pointer; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def table_html(table: TextTable) -> str:
    """A table with its title and notes; cells saying NO (not smallest) are highlighted."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="flag">{_esc(c)}</td>' if c.startswith("NO:") else f"<td>{_esc(c)}</td>"
                         for c in row) + "</tr>\n"
        for row in table.rows)
    notes = "".join(f'<p class="note">{_esc(n)}</p>' for n in table.notes)
    return f"<h3>{_esc(table.title)}</h3>\n<table><tr>{head}</tr>\n{body}</table>\n{notes}\n"


def image_html(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">\n'


def _folded_html(pictures: dict[str, bytes]) -> str:
    """One folded section (``details``) per picture: pages with many layers stay short."""
    return "".join(f"<details><summary>{_esc(name)}</summary>\n{image_html(png, name)}</details>\n"
                   for name, png in pictures.items())


def _split(pictures: dict[str, bytes], summary: tuple[str, ...]) -> tuple[str, str]:
    """(the summary pictures shown, the others folded) as HTML."""
    shown = "".join(image_html(png, name) for name, png in pictures.items() if name in summary)
    return shown, _folded_html({n: png for n, png in pictures.items() if n not in summary})


def document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_esc(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_esc(title)}</h1>\n{body}</body>\n</html>\n")


def comparison_page(c: Comparison, pictures: dict[str, bytes]) -> str:
    """Every table of the comparison, the summary pictures and one folded picture per layer."""
    methods = "".join(f"<li><b>{_esc(name)}</b>: {_esc(m.label)}</li>" for name, m in c.methods.items())
    shown, folded = _split(pictures, ("ratio_vs_tol.png", "layers.png"))
    body = (f"<p>Tolerances: {', '.join(f'{t:g}' for t in c.tolerances)} (relative Frobenius); leaf {c.leaf}. "
            f"Every figure is measured in float64 on the stored matrix.</p>\n<ul>{methods}</ul>\n"
            + shown + "".join(table_html(t) for t in tables(c)) + "<h2>Layers</h2>\n" + folded)
    return document(f"hmcompress compare: {c.source}", body)


def file_page(name: str, options: dict, layers: list[report.LayerStats], pictures: dict[str, bytes]) -> str:
    """The per-layer report of a compressed file, with its pictures."""
    table = TextTable(name, list(report.COLUMNS), report.rows(layers),
                      [report.passthrough_line(layers), report.total_line(layers)])
    shown = ", ".join(f"{k} {options[k]}" for k in ("tol", "absolute", "strategy", "precision", "leaf")
                      if k in options)
    summary, folded = _split(pictures, ("layers.png",))
    body = f"<p>Options: {_esc(shown)}</p>\n" + table_html(table) + summary + folded
    return document(f"hmcompress report: {name}", body)
