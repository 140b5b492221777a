"""The comparison report in Markdown: one row per variant, and how the figures were measured.

Pure: rows in, a string out; the runner writes the file (``artifacts.REPORT_MD``). ``table`` gives the
headers and text cells that the Markdown, the HTML (``report_html``) and the terminal table all show, so the
three always agree. Columns beyond the base ten (compression, task scores, generation sanity, quantize time,
decode speed, target, verdict) appear when some row has that figure; a row without it shows "—".
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
    try:
        x = float(x)
    except (TypeError, ValueError):  # a figure recorded as text (e.g. "not measured"): shown as is
        return str(x)
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


def _verdict(row: Mapping[str, Any]) -> str:
    v = row.get("verdict")
    if v is None:
        return _gates(row)
    if v == "regression":
        n = len(row.get("gate_failures") or [])
        return f"regression ({n} gate{'s' if n != 1 else ''})"
    if v == "failed run":
        return f"failed run ({row.get('verdict_why') or 'a stage failed'})"
    return str(v)


def _compression(row: Mapping[str, Any]) -> str:
    size, ref = row.get("size_bytes"), row.get("ref_bytes")
    if not size or not ref:
        return DASH
    return f"{float(ref) / float(size):.2f}×"


TASK_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mc2")


def task_score(result: Any) -> tuple[str, float, float | None] | None:
    """``(metric, value, stderr)`` of one task's result dict: acc, else acc_norm, exact_match, ..., else its first
    numeric figure that is not a standard error."""
    if not isinstance(result, Mapping):
        return None
    keys = [k for k in TASK_METRICS if isinstance(result.get(k), (int, float))]
    keys += [k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and "stderr" not in k and k not in keys]
    if not keys:
        return None
    key = keys[0]
    metric, _, filt = key.partition(",")  # lm-eval's raw keys: "acc,none" with "acc_stderr,none"
    err = result.get(f"{metric}_stderr,{filt}" if filt else f"{key}_stderr")
    return key, float(result[key]), None if not isinstance(err, (int, float)) else float(err)


def _task(row: Mapping[str, Any], name: str) -> str:
    score = task_score((row.get("tasks") or {}).get(name))
    if score is None:
        return DASH
    _, value, err = score
    return f"{value:.3f} ± {err:.3f}" if err is not None and math.isfinite(err) else f"{value:.3f}"


def _sanity(key: str, fmt: str):
    return lambda row: _num((row.get("sanity") or {}).get(key), fmt)


def _target(row: Mapping[str, Any]) -> str:
    target = row.get("target")
    if not target:
        return DASH
    status = str(row.get("engine_status") or "")
    return f"{target} (not run here)" if status.startswith("not run here") else str(target)


def _decode(row: Mapping[str, Any]) -> str:
    if row.get("decode_tps") is not None:
        return _num(row["decode_tps"], ".1f")
    return "not served" if row.get("serve_status") else DASH


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """``(header, row -> text)`` for every column this set of rows has a figure for."""
    has = lambda key: any(row.get(key) is not None for row in rows)  # noqa: E731
    verdicts = has("verdict")
    cols: list[tuple[str, Any]] = [("variant", lambda r: r.get("variant", DASH))]
    if verdicts:  # next to the name: what a release job reads first, visible in a narrow window too
        cols.append(("verdict", _verdict))
    cols += [
        ("method", lambda r: r.get("method") or DASH),
        ("bits/group", _bits),
        ("size (MiB)", lambda r: _num(None if r.get("size_bytes") is None else r["size_bytes"] / 2**20, ".2f")),
    ]
    if has("ref_bytes"):
        cols.append(("× smaller", _compression))
    cols += [
        ("perplexity", lambda r: _num(r.get("ppl"), ".4f")),
        ("Δppl %", _delta),
        ("KL", lambda r: _kl(r.get("kl_mean"))),
        ("top-1 %", lambda r: _num(None if r.get("top1_agreement") is None else 100.0 * float(r["top1_agreement"]), ".2f")),
    ]
    tasks = sorted({name for row in rows for name in (row.get("tasks") or {})})
    cols += [(f"{name}", (lambda n: lambda r: _task(r, n))(name)) for name in tasks]
    if has("sanity"):
        cols += [("repetition", _sanity("repetition", ".3f")), ("EOS rate", _sanity("eos_rate", ".2f")),
                 ("ref overlap", _sanity("reference_overlap", ".3f"))]
    cols.append(("eval tokens", lambda r: DASH if r.get("tokens") is None else f"{int(r['tokens']):,}"))
    if has("quantize_s"):
        cols.append(("quantize s", lambda r: _num(r.get("quantize_s"), ".1f")))
    if has("decode_tps") or has("serve_status"):
        cols.append(("decode tok/s*", _decode))
    if has("target"):
        cols.append(("target", _target))
    if not verdicts:
        cols.append(("gates", _verdict))
    return cols


def table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The report's one table as text: headers, and one list of cells per row (Markdown, HTML and terminal)."""
    cols = _columns(rows)
    return [h for h, _ in cols], [[str(fn(row)) for _, fn in cols] for row in rows]


def task_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({name for row in rows for name in (row.get("tasks") or {})})


def summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """E.g. "6 variants: 4 pass, 1 regression, 1 failed run" ("" when the rows carry no verdicts)."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.get("verdict"):
            counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    if not counts:
        return ""
    parts = ", ".join(f"{counts[v]} {v}" for v in ("pass", "regression", "failed run") if v in counts)
    return f"{len(rows)} variant{'s' if len(rows) != 1 else ''}: {parts}"


def how_measured(rows: Sequence[Mapping[str, Any]], seq_len: Any, text_file: Any) -> list[str]:
    """The "How measured" paragraphs (plain text, Markdown backticks allowed)."""
    text = f"`{text_file}`" if text_file else "the evaluation text"
    window = f"{seq_len}" if seq_len else "`seq_len`"
    out = [
        f"Perplexity: {text} is tokenized as one stream (documents separated by a blank line, one BOS (or EOS) token "
        f"in front), cut into windows of {window} tokens that each predict the next {window} tokens, so every "
        "token is predicted once (lm-eval's rolling loglikelihood with that max length); perplexity is "
        "exp(mean negative log-likelihood over all predicted tokens), log-softmax in float32. "
        "KL is the mean over the same tokens of KL(P_reference ‖ P_variant) in nats; top-1 is the share of "
        "tokens where the variant's most likely next token is the reference's. Δppl is relative to the "
        "reference's perplexity on the same tokens; size is the checkpoint's weight files."
    ]
    extra = []
    if any(r.get("ref_bytes") is not None for r in rows):
        extra.append("\"× smaller\" is the source model's size on disk divided by the variant's.")
    if task_names(rows):
        extra.append("Task columns: the task's accuracy (acc, else its first score) ± its standard error, "
                     "as the evaluate stage recorded them.")
    if any(r.get("sanity") is not None for r in rows):
        extra.append("Sanity: repetition is the share of repeated n-grams in greedy generations on the fixed prompt "
                     "set (lower is better), EOS rate the share of generations that stopped before the limit, "
                     "ref overlap the token overlap with the reference model's generations.")
    if any(any(str(h).startswith("endpoint") for h in (r.get("through") or {}).values()) for r in rows):
        extra.append("Evaluated with: figures measured through an endpoint went through the compile target's own "
                     "OpenAI-compatible server (`eval.through`): perplexity from its prompt log-probs on the same "
                     "token ids, sanity from its chat completions (the reply's text re-tokenized, the reference's "
                     "too), tasks through lm-eval's local-completions; KL and top-1 need full logits and are always "
                     "measured in process.")
    if any(r.get("quantize_s") is not None for r in rows):
        extra.append("Quantize s: the quantize stage's wall-clock seconds (its manifest's `seconds`), on the machine and "
                     "device that ran it.")
    if any(r.get("decode_tps") is not None or r.get("serve_status") for r in rows):
        extra.append("*Decode tok/s is not a benchmark: it is the serve stage's one smoke-test chat request, "
                     "completion tokens divided by the request's latency (prefill and HTTP included, one request, "
                     "few tokens), so it ranks variants only roughly and understates steady decode speed.")
    if any(r.get("verdict") for r in rows):
        extra.append("Verdict: pass (every gate passed, or none was set), regression (a quality gate failed; the "
                     "run exits 3), failed run (a stage failed, was skipped or never finished). Publishing: "
                     "only where the recipe has a `publish` section, and only a variant whose verdict is pass "
                     "(its gates and, where the recipe serves, its smoke test passed) goes to `publish.to`; a "
                     "regression or a failed run is never published.")
    if extra:
        out.append(" ".join(extra))
    return out


def render_report(
    rows: Sequence[Mapping[str, Any]],
    title: str,
    *,
    seq_len: int | None = None,
    text_file: str | None = None,
    plots: Sequence[str] = (),
) -> str:
    """Markdown: a title, one table of all variants, the failed gates and runs, engines, plots, "how measured".

    Each row is a dict with ``variant`` and any of: ``method``, ``bits``, ``group_size``, ``size_bytes``
    (checkpoint size), ``ref_bytes`` (source size, for the compression ratio), ``ppl``, ``ref_ppl`` (for
    Δppl), ``kl_mean``, ``top1_agreement`` (a fraction, shown in %), ``tasks`` ({task: {acc, acc_stderr,
    ...}}), ``sanity`` ({repetition, eos_rate, reference_overlap}), ``tokens`` (predicted tokens),
    ``quantize_s``, ``decode_tps``, ``target``, ``engine_status``, ``runtime``, ``gate_failures`` (a list of
    ``check_gates`` messages; None or absent = no gates), ``verdict`` and ``verdict_why``
    (``collect.verdict``), ``seq_len``, ``text_file``. A missing figure is shown as "—". ``seq_len`` and
    ``text_file`` default to the value the rows share. ``plots``: image file names (next to the report).
    """
    seq_len = seq_len if seq_len is not None else _common(rows, "seq_len")
    text_file = text_file if text_file is not None else _common(rows, "text_file")
    headers, cells = table(rows)
    lines = [f"# {title}", ""]
    if summary(rows):
        lines += [summary(rows), ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in cells]

    failed = [(row.get("variant", DASH), msg) for row in rows for msg in (row.get("gate_failures") or [])]
    if failed:
        lines += ["", "## Failed gates", ""]
        lines += [f"- **{_cell(variant)}**: {msg}" for variant, msg in failed]
    broken = [row for row in rows if row.get("verdict") == "failed run"]
    if broken:
        lines += ["", "## Failed runs", ""]
        lines += [f"- **{_cell(row.get('variant', DASH))}**: {row.get('verdict_why')}" for row in broken]

    engines = [row for row in rows if row.get("target")]
    if engines:
        lines += ["", "## Engines", "", "| variant | target | engine | evaluated with |", "|---|---|---|---|"]
        lines += [f"| {_cell(row.get('variant', DASH))} | {_cell(row['target'])} | "
                  f"{_cell(row.get('engine_status') or DASH)} | {_cell(row.get('runtime') or DASH)} |" for row in engines]

    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]

    lines += ["", "## How measured", ""]
    for para in how_measured(rows, seq_len, text_file):
        lines += [para, ""]
    return "\n".join(lines)
