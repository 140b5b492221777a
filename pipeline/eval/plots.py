"""The report's plots (matplotlib, Agg backend: no display needed): pure functions from row dicts to PNG bytes.

``quality_vs_size``: KL and Δppl against size on disk (MiB); ``quality_vs_speed``: KL and Δppl against the
serve smoke test's decode tokens/s. A figure a row lacks leaves that point out; a plot with no point at all
is not made (the functions return None). Rows are ``pipeline.eval.collect`` rows.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

VERDICT_COLORS = {"pass": "#2e7d32", "regression": "#c62828", "failed run": "#6d6d6d"}
DEFAULT_COLOR = "#1f5fa8"


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def delta_ppl_pct(row: Mapping[str, Any]) -> float | None:
    ppl, ref = _finite(row.get("ppl")), _finite(row.get("ref_ppl"))
    return None if ppl is None or not ref else 100.0 * (ppl / ref - 1.0)


def size_mib(row: Mapping[str, Any]) -> float | None:
    size = _finite(row.get("size_bytes"))
    return None if size is None else size / 2**20


def _points(rows: Sequence[Mapping[str, Any]], x_of, y_of) -> list[tuple[float, float, Mapping[str, Any]]]:
    out = []
    for row in rows:
        x, y = x_of(row), y_of(row)
        if x is not None and y is not None:
            out.append((x, y, row))
    return out


def _figure(rows, x_of, xlabel: str, title: str) -> bytes | None:
    """Two panels side by side, KL (symlog: the reference's 0 stays on the plot) and Δppl %, against ``x_of``."""
    panels = [
        ("KL to the reference (nats/token)", lambda r: _finite(r.get("kl_mean")), True),
        ("Δ perplexity (%)", delta_ppl_pct, False),
    ]
    data = [(label, _points(rows, x_of, y_of), log) for label, y_of, log in panels]
    if not any(points for _, points, _ in data):
        return None
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, and the user's backend is left alone

    fig = Figure(figsize=(10, 4.2), dpi=110, layout="constrained")
    fig.suptitle(title, fontsize=12)
    for i, (label, points, log) in enumerate(data):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if not points:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#777")
            continue
        for x, y, row in points:
            color = VERDICT_COLORS.get(row.get("verdict"), DEFAULT_COLOR)
            ax.scatter([x], [y], s=46, color=color, zorder=3, edgecolors="white", linewidths=0.8)
        ys = [y for _, y, _ in points]
        if log and any(y > 0 for y in ys):
            # Linear below the smallest positive KL's decade, log above; the top leaves room for a decade tick.
            linthresh = 10.0 ** math.floor(math.log10(min(y for y in ys if y > 0)))
            ax.set_yscale("symlog", linthresh=linthresh)
            ax.set_ylim(min(-0.3 * linthresh, min(ys)), max(ys) * 3.0)
        else:
            ax.margins(y=0.12)
        xs = [x for x, _, _ in points]
        lo, hi = min(xs), max(xs)
        pad = (hi - lo) * 0.15 or max(abs(hi) * 0.15, 1.0)
        ax.set_xlim(lo - pad, hi + pad * 1.6)  # room for the labels on the right
        _label(ax, points)
    verdicts = sorted({row.get("verdict") for row in rows if row.get("verdict") in VERDICT_COLORS})
    if verdicts:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=VERDICT_COLORS[v], label=v) for v in verdicts]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _label(ax, points) -> None:
    """Name each point; labels that would overlap an earlier one (points of near-equal size and quality) are moved
    up or down, with a thin leader line to their point."""
    to_axes = ax.transScale + ax.transLimits  # data -> axes fraction, on the axis scales as set
    height_pt = ax.get_position().height * ax.figure.get_figheight() * 72
    placed: list[tuple[float, float]] = []
    for x, y, row in sorted(points, key=lambda p: -p[1]):
        fx, fy = to_axes.transform((x, y))
        for dy in (5, -9, 15, -19, 25, -29, 35, -39, 45):
            ly = fy + dy / height_pt
            if all(abs(fx - px) > 0.2 or abs(ly - py) > 11 / height_pt for px, py in placed):
                break
        placed.append((fx, ly))
        arrow = None if dy == 5 else {"arrowstyle": "-", "color": "#999999", "lw": 0.6}
        ax.annotate(str(row.get("variant", "")), (x, y), textcoords="offset points", xytext=(7, dy), fontsize=8,
                    va="center", arrowprops=arrow)


def quality_vs_size(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """PNG: KL and Δppl against size on disk (MiB), one labelled point per variant; None when nothing to plot."""
    return _figure(rows, size_mib, "size on disk (MiB)", "Quality vs size")


def quality_vs_speed(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """PNG: KL and Δppl against decode tokens/s (serve smoke test); None when no variant was served."""
    return _figure(rows, lambda r: _finite(r.get("decode_tps")), "decode tokens/s (serve smoke test, one request)",
                   "Quality vs decode speed")


PLOTS = {"quality_vs_size.png": quality_vs_size, "quality_vs_speed.png": quality_vs_speed}


def render_plots(rows: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """File name -> PNG bytes for every plot these rows can fill."""
    out = {}
    for name, fn in PLOTS.items():
        png = fn(rows)
        if png is not None:
            out[name] = png
    return out
