"""The comparison report in Markdown: one row per variant, and how the figures were measured.

Pure: rows in, a string out; the runner writes the file (``artifacts.REPORT_MD``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

HEADER = (
    "variant",
    "method",
    "bits/group",
    "size (MiB)",
    "perplexity",
    "Δppl %",
    "KL",
    "top-1 %",
    "eval tokens",
    "gates",
)
DASH = "—"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(x: Any, fmt: str) -> str:
    if x is None:
        return DASH
    x = float(x)
    return format(x, fmt) if math.isfinite(x) else str(x)


def _kl(x: Any) -> str:
    """KL to 4 decimals; below 0.001 in scientific notation, so small models' tiny KLs still rank."""
    if x is None:
        return DASH
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4f}" if x == 0 or x >= 1e-3 else f"{x:.2e}"


def _bits(row: Mapping[str, Any]) -> str:
    bits, group = row.get("bits"), row.get("group_size")
    if bits is None:
        return DASH
    return f"{bits}/{group}" if group else str(bits)


def _delta(row: Mapping[str, Any]) -> str:
    ppl, ref = row.get("ppl"), row.get("ref_ppl")
    if ppl is None or ref is None:
        return DASH
    return _num(100.0 * (float(ppl) / float(ref) - 1.0), "+.2f")


def _gates(row: Mapping[str, Any]) -> str:
    failures = row.get("gate_failures")
    if failures is None:
        return DASH
    return f"FAIL ({len(failures)})" if failures else "pass"


def _common(rows: Sequence[Mapping[str, Any]], key: str) -> Any:
    values = {row.get(key) for row in rows if row.get(key) is not None}
    return values.pop() if len(values) == 1 else None


def render_report(
    rows: Sequence[Mapping[str, Any]],
    title: str,
    *,
    seq_len: int | None = None,
    text_file: str | None = None,
) -> str:
    """Markdown: a title, one table of all variants, the failed gates, and a "how measured" paragraph.

    Each row is a dict with ``variant`` and any of: ``method``, ``bits``, ``group_size``, ``size_bytes``
    (checkpoint size), ``ppl``, ``ref_ppl`` (for Δppl), ``kl_mean``, ``top1_agreement`` (a fraction,
    shown in %), ``tokens`` (predicted tokens), ``gate_failures`` (a list of ``check_gates`` messages;
    None or absent = no gates), ``seq_len``, ``text_file``. A missing figure is shown as "—".
    ``seq_len`` and ``text_file`` default to the value the rows share.
    """
    seq_len = seq_len if seq_len is not None else _common(rows, "seq_len")
    text_file = text_file if text_file is not None else _common(rows, "text_file")
    lines = [f"# {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for row in rows:
        size = row.get("size_bytes")
        top1 = row.get("top1_agreement")
        cells = [
            row.get("variant", DASH),
            row.get("method") or DASH,
            _bits(row),
            _num(None if size is None else size / 2**20, ".2f"),
            _num(row.get("ppl"), ".4f"),
            _delta(row),
            _kl(row.get("kl_mean")),
            _num(None if top1 is None else 100.0 * float(top1), ".2f"),
            DASH if row.get("tokens") is None else f"{int(row['tokens']):,}",
            _gates(row),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")

    failed = [(row.get("variant", DASH), msg) for row in rows for msg in (row.get("gate_failures") or [])]
    if failed:
        lines += ["", "## Failed gates", ""]
        lines += [f"- **{_cell(variant)}**: {msg}" for variant, msg in failed]

    engines = [row for row in rows if row.get("target")]
    if engines:
        lines += ["", "## Engines", "", "| variant | target | engine | evaluated with |", "|---|---|---|---|"]
        lines += [f"| {_cell(row.get('variant', DASH))} | {_cell(row['target'])} | "
                  f"{_cell(row.get('engine_status') or DASH)} | {_cell(row.get('runtime') or DASH)} |" for row in engines]

    text = f"`{text_file}`" if text_file else "the evaluation text"
    window = f"{seq_len}" if seq_len else "`seq_len`"
    lines += [
        "",
        "## How measured",
        "",
        f"Perplexity: {text} is tokenized as one stream (documents separated by a blank line, one BOS (or EOS) token "
        f"in front), cut into windows of {window} tokens that each predict the next {window} tokens, so every "
        "token is predicted once (lm-eval's rolling loglikelihood with that max length); perplexity is "
        "exp(mean negative log-likelihood over all predicted tokens), log-softmax in float32. "
        "KL is the mean over the same tokens of KL(P_reference ‖ P_variant) in nats; top-1 is the share of "
        "tokens where the variant's most likely next token is the reference's. Δppl is relative to the "
        "reference's perplexity on the same tokens; size is the checkpoint's weight files.",
        "",
    ]
    return "\n".join(lines)
