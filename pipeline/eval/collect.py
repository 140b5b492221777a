"""The report's rows, read back from a run folder: ``plan.json`` and the manifests of its stage runs.

One row per variant. Used by the runner at the end of a run (which knows the gates and the run's statuses)
and by ``pipeline compare`` over any finished run folder (which reads the gates the runner saved in
``report.json``, or the recipe named in ``plan.json`` when that file still exists).

A row holds the evaluate metrics as measured (``ppl``, ``ref_ppl``, ``kl_mean``, ``top1_agreement``,
``tokens``, ``tasks``, ``sanity``, ``runtime``, ...; ``runtime`` says how each figure was measured when they
went different ways, see ``evaluated_with``) plus: ``variant``, ``method``, ``bits``,
``group_size``, ``size_bytes`` (the quantized checkpoint), ``ref_bytes`` (the source model's weights, for
the compression ratio), ``quantize_s`` (the quantize manifest's ``seconds``), ``decode_tps`` (the serve
smoke test's completion tokens / request latency), ``target``, ``engine_status``, ``gate_failures``
(None when the variant has no gates, or was not evaluated), ``stages`` (kind -> status) and the verdict:
``pass``, ``regression`` (a gate failed) or ``failed run`` (a stage failed, was skipped or never finished),
with ``verdict_why``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.artifacts import MANIFEST, PLAN, read_manifest
from pipeline.errors import RecipeError

REPORT_JSON = "report.json"
STAGES = ("download", "calibrate", "quantize", "compile", "evaluate", "serve")
# Methods whose checkpoints have no weight bit width / group size worth a column.
NO_GROUP = ("none", "smoothquant", "fp8", "bnb-nf4", "bnb-int8")
PASS, REGRESSION, FAILED = "pass", "regression", "failed run"


def read_plan(root: Path) -> dict[str, Any]:
    """``root/plan.json``, or a RecipeError saying why ``root`` is not a run folder."""
    root = Path(root)
    if not root.is_dir():
        raise RecipeError(
            f"{root} is not a run folder: it does not exist or is not a folder. Pass a run's output folder, "
            "outputs/<recipe name>/, the one `pipeline run RECIPE` prints at its end."
        )
    path = root / PLAN
    try:
        plan = json.loads(path.read_text())
    except OSError:
        inner = sorted(p.parent.name for p in root.glob(f"*/{PLAN}"))[:5]
        hint = f" It holds run folders: {', '.join(inner)}; pass those instead." if inner else ""
        raise RecipeError(
            f"{root} is not a run folder: it has no {PLAN}, which `pipeline run` writes into "
            f"outputs/<recipe name>/ before any stage runs.{hint} Pass the folder that holds {PLAN}."
        ) from None
    except ValueError as e:
        raise RecipeError(f"{path} is not valid JSON ({e}); rerun `pipeline run` on its recipe to rewrite it.") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("variants"), dict) or not isinstance(plan.get("runs"), list):
        raise RecipeError(
            f"{path} is not a quantship plan (it lacks 'variants' or 'runs'); rerun `pipeline run` on its recipe."
        )
    return plan


def saved_gates(root: Path, plan: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Each variant's gates: from ``report.json`` (written by the runner), else from the recipe file named in
    ``plan.json`` when it still loads; None when neither is available."""
    try:
        data = json.loads((Path(root) / REPORT_JSON).read_text())
        if isinstance(data.get("gates"), dict):
            return data["gates"]
    except (OSError, ValueError, AttributeError):
        pass
    recipe = plan.get("recipe")
    if recipe and Path(recipe).is_file():
        try:
            from pipeline.recipe_load import load_recipe

            loaded = load_recipe(recipe)
            return {v: r.eval.gates.model_dump() for v, r in loaded.variants.items() if r.eval is not None}
        except Exception:  # the recipe changed or no longer validates: report without gates
            return None
    return None


def _manifest(root: Path, run: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A run's manifest when the folder (looked up next to plan.json: the run folder may have moved) is complete."""
    if run is None:
        return None
    m = read_manifest(Path(root) / Path(run["dir"]).name)
    return m if m is not None and m.get("key") == run.get("key") else None


def collect_rows(
    root: Path,
    gates: Mapping[str, Mapping[str, Any]] | None = None,
    statuses: Mapping[str, str] | None = None,
    prefix: str = "",
) -> list[dict[str, Any]]:
    """One row per variant of the run folder ``root`` (see the module docstring), in the recipe's order.

    ``gates``: variant -> gate thresholds (default: ``saved_gates``). ``statuses``: run id -> the runner's
    done|cached|failed|skipped for this run (default: complete folders count as done, others as missing).
    ``prefix`` is put in front of each variant name (``pipeline compare`` uses ``<recipe>/``).
    """
    from pipeline.eval.gates import check_gates

    root = Path(root)
    plan = read_plan(root)
    if gates is None:
        gates = saved_gates(root, plan) or {}
    runs = {r["id"]: r for r in plan["runs"]}
    rows = []
    for variant, ids in plan["variants"].items():
        manifests = {kind: _manifest(root, runs.get(run_id)) for kind, run_id in ids.items()}
        stages = {}
        for kind, run_id in ids.items():
            st = (statuses or {}).get(run_id)
            if st is None:
                st = "done" if manifests[kind] is not None else "missing"
            elif st in ("done", "cached") and manifests[kind] is None:
                st = "missing"
            stages[kind] = st
        qcfg = (runs.get(ids.get("quantize")) or {}).get("config", {})
        method = qcfg.get("method")
        ev = (manifests.get("evaluate") or {}).get("metrics") or {}
        qm = manifests.get("quantize") or {}
        cm = (manifests.get("compile") or {}).get("metrics") or {}
        sm = (manifests.get("serve") or {}).get("metrics") or {}
        dm = (manifests.get("download") or {}).get("metrics") or {}
        row: dict[str, Any] = {
            **ev,
            "variant": prefix + variant,
            "method": method,
            "bits": None if method in (None, "none") else qcfg.get("w_bits"),
            "group_size": None if method in NO_GROUP or method is None else qcfg.get("w_group_size"),
            "size_bytes": (qm.get("metrics") or {}).get("bytes"),
            "ref_bytes": dm.get("bytes"),
            "quantize_s": qm.get("seconds"),
            "target": cm.get("target") or (runs.get(ids.get("compile")) or {}).get("config", {}).get("target"),
            "engine_status": cm.get("status"),
            "stages": stages,
        }
        if isinstance(ev.get("through"), dict):
            row["runtime"] = evaluated_with(ev["through"], ev.get("runtime"))
        if ev.get("text") and "text_file" not in row:
            row["text_file"] = ev["text"]
        tokens, latency = sm.get("completion_tokens"), sm.get("smoke_latency_s")
        if tokens and latency:
            row["decode_tps"] = float(tokens) / float(latency)
        elif sm.get("status") and sm.get("status") != "passed":
            row["serve_status"] = sm["status"]
        variant_gates = gates.get(variant) if gates else None
        if ev and variant_gates and any(v is not None for v in variant_gates.values()):
            try:
                row["gate_failures"] = check_gates(ev, variant_gates)
            except ValueError as e:  # gates this version does not know (a newer recipe): say so, fail nothing
                row["gate_failures"] = None
                row["gate_error"] = str(e)
        elif ev:
            row["gate_failures"] = None
        row["verdict"], row["verdict_why"] = verdict(stages, row.get("gate_failures"))
        rows.append(row)
    return rows


_FIGURES = {"perplexity": "perplexity", "kl_top1": "KL, top-1", "sanity": "sanity", "tasks": "tasks"}


def evaluated_with(through: Mapping[str, str], runtime: str | None = None) -> str | None:
    """The report's "evaluated with" cell from metrics' ``through`` (figure -> how it was measured): the runtime
    alone when every figure went the same way in process, else e.g. "perplexity, sanity, tasks: endpoint: embedded
    server (transformers); KL, top-1: in process: transformers"."""
    groups: dict[str, list[str]] = {}
    for key in sorted(through, key=lambda k: list(_FIGURES).index(k) if k in _FIGURES else len(_FIGURES)):
        groups.setdefault(str(through[key]), []).append(_FIGURES.get(key, key))
    if len(groups) == 1 and runtime and next(iter(groups)) == f"in process: {runtime}":
        return runtime
    return "; ".join(f"{', '.join(names)}: {how}" for how, names in groups.items()) or runtime


def verdict(stages: Mapping[str, str], gate_failures: list[str] | None) -> tuple[str, str]:
    """``(verdict, why)``: ``failed run`` when a stage up to evaluate did not finish (or serve failed on its own),
    ``regression`` when a gate failed (serve is then skipped on purpose), else ``pass``."""
    broken = [(k, s) for k, s in stages.items() if s not in ("done", "cached")]
    before_eval = [(k, s) for k, s in broken if k != "serve"]
    if before_eval:
        kind, st = before_eval[0]
        return FAILED, f"{kind} {'did not finish' if st == 'missing' else st}"
    if gate_failures:
        return REGRESSION, f"{len(gate_failures)} gate(s) failed"
    if broken:
        kind, st = broken[0]
        return FAILED, f"{kind} {'did not finish' if st == 'missing' else st}"
    return PASS, "all gates passed" if gate_failures is not None else "no gates set"


def write_rows_json(root: Path, rows: list[dict[str, Any]], gates: Mapping[str, Any]) -> Path:
    """``report.json``: the rows as rendered and each variant's gates (so `pipeline compare` can judge later)."""
    from pipeline.artifacts import write_json

    path = Path(root) / REPORT_JSON
    write_json(path, {"gates": dict(gates), "rows": rows})
    return path


def is_run_folder(path: Path) -> bool:
    return (Path(path) / PLAN).is_file() and not (Path(path) / MANIFEST).is_file()


def write_report_files(
    out: Path, rows: list[dict[str, Any]], title: str, gates: Mapping[str, Any] | None = None, subtitle: str = ""
) -> Path:
    """Write ``report.md``, ``report.html``, the PNG plots and ``report.json`` into ``out``; returns report.md.

    Plots need matplotlib (the ``eval`` extra): without it the reports are written without them, and say so in
    the log."""
    import logging

    from pipeline.artifacts import REPORT_MD
    from pipeline.eval.report import render_report
    from pipeline.eval.report_html import render_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from pipeline.eval.plots import render_plots

        plots = render_plots(rows)
    except ImportError as e:
        logging.getLogger("pipeline").warning("report without plots: %s (install quantship[eval])", e)
        plots = {}
    for name, png in plots.items():
        (out / name).write_bytes(png)
    md = out / REPORT_MD
    md.write_text(render_report(rows, title=title, plots=list(plots)), encoding="utf-8")
    (out / "report.html").write_text(render_html(rows, title, plots, subtitle=subtitle), encoding="utf-8")
    write_rows_json(out, rows, gates or {})
    return md
