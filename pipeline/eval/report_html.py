"""The comparison report as one self-contained HTML file: inline CSS, plots embedded as base64 PNG data URIs,
no script and nothing fetched from the network. Pure: rows and PNG bytes in, a string out.

The table's cells are ``report.table``'s, the same text as report.md and the terminal table.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.eval.report import DASH, _common, how_measured, summary, table

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d1d1f;
       margin: 24px 32px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.sub { color: #666; margin-bottom: 16px; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 9px; border-bottom: 1px solid #e4e4e7; text-align: right; white-space: nowrap; }
th { background: #f4f4f5; font-weight: 600; position: sticky; top: 0; }
td.l, th.l { text-align: left; }
tr:hover td { background: #fafafa; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.pass { background: #e3f3e5; color: #1b5e20; } .regression { background: #fde7e7; color: #b71c1c; }
.failed { background: #ececec; color: #444; }
ul.gates li { margin: 3px 0; } code { background: #f4f4f5; padding: 0 3px; border-radius: 3px; }
.plots img { max-width: 100%; border: 1px solid #e4e4e7; margin: 6px 0 14px; display: block; }
p.how { max-width: 980px; color: #333; }
"""
LEFT = {"variant", "method", "target", "verdict", "gates"}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _md_inline(text: str) -> str:
    """Escape, then render Markdown's `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", _e(text))


def _verdict_cell(row: Mapping[str, Any], text: str) -> str:
    cls = {"pass": "pass", "regression": "regression", "failed run": "failed"}.get(row.get("verdict") or "")
    if cls is None and row.get("gate_failures"):
        cls = "regression"
    elif cls is None and row.get("gate_failures") == []:
        cls = "pass"
    return f'<span class="badge {cls}">{_e(text)}</span>' if cls and text != DASH else _e(text)


def render_html(
    rows: Sequence[Mapping[str, Any]],
    title: str,
    plots: Mapping[str, bytes] | None = None,
    *,
    subtitle: str = "",
    seq_len: int | None = None,
    text_file: str | None = None,
) -> str:
    """One HTML page: the table, the failed gates and runs, engines, the plots inline, how it was measured."""
    headers, cells = table(rows)
    seq_len = seq_len if seq_len is not None else _common(rows, "seq_len")
    text_file = text_file if text_file is not None else _common(rows, "text_file")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    sub = " · ".join(x for x in (summary(rows), subtitle) if x)
    if sub:
        out.append(f'<div class="sub">{_e(sub)}</div>')
    cls = lambda h: ' class="l"' if h in LEFT else ""  # noqa: E731
    out.append('<div class="wrap"><table><thead><tr>' + "".join(f"<th{cls(h)}>{_e(h)}</th>" for h in headers)
               + "</tr></thead><tbody>")
    for row, texts in zip(rows, cells):
        tds = []
        for h, text in zip(headers, texts):
            body = _verdict_cell(row, text) if h in ("verdict", "gates") else _e(text)
            tds.append(f"<td{cls(h)}>{body}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")

    failed = [(row.get("variant", DASH), msg) for row in rows for msg in (row.get("gate_failures") or [])]
    if failed:
        out.append('<h2>Failed gates</h2><ul class="gates">')
        out += [f"<li><b>{_e(v)}</b>: {_e(msg)}</li>" for v, msg in failed]
        out.append("</ul>")
    broken = [row for row in rows if row.get("verdict") == "failed run"]
    if broken:
        out.append('<h2>Failed runs</h2><ul class="gates">')
        out += [f"<li><b>{_e(r.get('variant', DASH))}</b>: {_e(r.get('verdict_why'))}</li>" for r in broken]
        out.append("</ul>")

    engines = [row for row in rows if row.get("target")]
    if engines:
        out.append('<h2>Engines</h2><div class="wrap"><table><thead><tr><th class="l">variant</th>'
                   '<th class="l">target</th><th class="l">engine</th><th class="l">evaluated with</th></tr></thead><tbody>')
        for r in engines:
            out.append("<tr>" + "".join(f'<td class="l">{_e(x or DASH)}</td>' for x in (
                r.get("variant"), r.get("target"), r.get("engine_status"), r.get("runtime"))) + "</tr>")
        out.append("</tbody></table></div>")

    if plots:
        out.append('<h2>Plots</h2><div class="plots">')
        for name, png in plots.items():
            data = base64.b64encode(png).decode("ascii")
            out.append(f'<img alt="{_e(name)}" src="data:image/png;base64,{data}">')
        out.append("</div>")

    out.append("<h2>How measured</h2>")
    out += [f'<p class="how">{_md_inline(p)}</p>' for p in how_measured(rows, seq_len, text_file)]
    out.append("</body></html>")
    return "\n".join(out) + "\n"
