"""Execute a plan: a loop over stage runs that reuses complete artifacts and writes new ones atomically.

Each run writes into a temporary sibling folder; the manifest is written last and the folder renamed into
place, so a run killed at any point leaves nothing that is ever read (stale temp folders are removed at the
next start). A failed run marks its downstream runs skipped; other variants go on. Quality gates are checked
from the evaluate manifests on every run, cached or not, so a cached failing variant still fails.

``execute`` walks the plan and hands each run whose inputs have finished to an executor (pipeline/executors/):
the local one runs it here at once, the Ray one as a Ray task that calls the same ``run_stage`` in a worker.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import __version__
from pipeline.artifacts import clean_stale, commit_dir, new_tmp_dir, read_manifest
from pipeline.errors import GateFailed, QuantshipError, StageError
from pipeline.plan import STAGE_ORDER, Plan, StageRun, downstream, tool_versions, variant_recipe
from pipeline.provenance import manifest_facts, portable
from pipeline.resources import measure
from pipeline.stages import StageContext

log = logging.getLogger("pipeline")


@dataclass
class RunOutcome:
    statuses: dict[str, str] = field(default_factory=dict)  # run id -> done|cached|failed|skipped
    errors: dict[str, QuantshipError] = field(default_factory=dict)  # run id -> error
    gate_failures: dict[str, list[str]] = field(default_factory=dict)  # variant -> messages
    report: Path | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # the report's rows, one per variant, with verdicts

    @property
    def exit_code(self) -> int:
        """1 (or the error's own code) when a stage failed, else 3 when a quality gate failed, else 0."""
        if self.errors:
            return max(e.exit_code for e in self.errors.values())
        return GateFailed.exit_code if self.gate_failures else 0

    def worked(self) -> list[str]:
        return [k for k, v in self.statuses.items() if v == "done"]


def stage_function(kind: str):
    return importlib.import_module(f"pipeline.stages.{kind}").run


def execute(plan: Plan, force: set[str] | None = None, progress: Any = None, executor: Any = None) -> RunOutcome:
    """Run every stage of ``plan`` that is not already complete (or that ``force`` names, with its downstream).

    The walk (dependency order, force, skips, gates, progress, the outcome) is the same for every executor; only
    where a ready stage run runs differs. ``LocalExecutor`` (the default) runs each in this process as it is
    submitted, so runs go one after another in the plan's order; ``RayExecutor`` runs the ready ones at once
    as Ray tasks (pipeline/executors/).
    """
    from pipeline.executors.local import LocalExecutor

    executor = executor or LocalExecutor()
    plan.root.mkdir(parents=True, exist_ok=True)
    for stale in clean_stale(plan.root):
        log.info("removed the incomplete output of an interrupted run: %s", stale.name)
    plan.save()
    forced = downstream(plan, force or set())
    outcome = RunOutcome()
    executor.start(plan)
    try:
        pending = list(plan.runs)
        while pending or executor.busy():
            # Visit every ready run, again after any result came in: a result recorded late in one pass (a
            # failure, say) can make a run earlier in the list ready, with nothing left running to wake the walk.
            progressed = True
            while progressed:
                progressed = False
                for run in list(pending):
                    if all(w in outcome.statuses for w in _waits_on(plan, run)):
                        pending.remove(run)
                        _visit(plan, run, outcome, forced, progress, executor)
                        progressed = True
                for result in executor.results(block=False):
                    _record(plan, result, outcome, progress)
                    progressed = True
            if executor.busy():
                for result in executor.results(block=True):
                    _record(plan, result, outcome, progress)
            elif pending:  # nothing runs and nothing can start: a run waits on one that is not in the plan
                raise RuntimeError(f"plan walk stuck: {[r.id for r in pending]} wait on runs that never finish")
    finally:
        executor.close()
    outcome.report = write_report(plan, outcome)
    return outcome


@dataclass
class StageResult:
    """What one stage run came to, wherever it ran: done (its folder committed) or failed (nothing left of it)."""

    run_id: str
    status: str  # done | failed
    seconds: float = 0.0
    error: QuantshipError | None = None


def _waits_on(plan: Plan, run: StageRun) -> list[str]:
    """The runs whose status decides this one: its inputs, and for a stage after evaluate (serve), the evaluate
    runs of its variants (a variant that failed a gate is not served)."""
    waits = list(run.deps.values())
    if run.kind in STAGE_ORDER and STAGE_ORDER.index(run.kind) > STAGE_ORDER.index("evaluate"):
        waits += [plan.variant_runs[v]["evaluate"] for v in run.variants if "evaluate" in plan.variant_runs[v]]
    return waits


def _visit(plan: Plan, run: StageRun, outcome: RunOutcome, forced: set[str], progress: Any, executor: Any) -> None:
    """Skip, reuse or submit one run whose upstream runs have all finished."""
    bad_deps = [d for d in run.deps.values() if outcome.statuses.get(d) in ("failed", "skipped")]
    gated = [v for v in run.variants if v in outcome.gate_failures]
    # A variant that failed a gate is not served, and nothing of it is published (a shared publish run: any).
    if bad_deps or (run.kind == "serve" and len(gated) == len(run.variants)) or (run.kind == "publish" and gated):
        outcome.statuses[run.id] = "skipped"
        log.warning("%s skipped: %s", run.id, f"{bad_deps[0]} did not finish" if bad_deps else "a quality gate failed")
        return
    if run.done() and run.id not in forced:
        outcome.statuses[run.id] = "cached"
        log.info("%s cached (%s)", run.id, run.dir.name)
        if progress:
            progress.cached(run)
        _after(plan, run, outcome)
        return
    log.info("%s running -> %s", run.id, run.dir.name)
    if progress:
        progress.start(run)
    executor.submit(plan, run, progress.callback(run) if progress else None)


def _record(plan: Plan, result: StageResult, outcome: RunOutcome, progress: Any) -> None:
    """A finished run's status, error, progress line and (for evaluate) gate verdicts."""
    run = plan.run(result.run_id)
    outcome.statuses[run.id] = result.status
    if result.error is not None:
        outcome.errors[run.id] = result.error
        log.error("%s failed: %s", run.id, result.error)
        if progress:
            progress.fail(run)
        return
    log.info("%s done in %.1fs", run.id, result.seconds)
    if progress:
        progress.finish(run, result.seconds)
    _after(plan, run, outcome)


def _after(plan: Plan, run: StageRun, outcome: RunOutcome) -> None:
    if run.kind == "evaluate":
        _check_gates(plan, run, outcome)


def run_stage(plan: Plan, run: StageRun, progress: Callable[..., None] | None = None) -> StageResult:
    """Run one stage into a temporary folder and rename it into place with its manifest, in this process or in
    a Ray worker. A typed error, or a crash (its traceback logged to run.log), comes back in the result, and the
    temporary folder is removed."""
    recipe = variant_recipe(plan, run)
    section = {"download": recipe.model, "calibrate": recipe.calibration, "quantize": recipe.quantize,
               "compile": recipe.compile, "evaluate": recipe.eval, "serve": recipe.serve,
               "publish": recipe.publish}[run.kind]
    tmp = new_tmp_dir(run.dir)
    ctx = StageContext(
        run_id=run.id,
        config=section,
        recipe=_RecipeView(plan, recipe),
        inputs={kind: plan.run(dep).dir for kind, dep in run.deps.items()},
        out=tmp,
        log=log.getChild(run.kind),
        progress=progress or StageContext.__dataclass_fields__["progress"].default,
    )
    started = time.time()
    t0 = time.perf_counter()
    try:
        with measure() as used:  # this stage's own peaks (host RSS high-water mark reset; GPU if CUDA is in use)
            metrics = stage_function(run.kind)(ctx) or {}
    except QuantshipError as e:
        return _failed(run, tmp, e)
    except Exception as e:  # a bug or an unexpected library failure: keep the traceback in the log
        log.debug("%s crashed:\n%s", run.id, traceback.format_exc())
        return _failed(run, tmp, StageError(f"{run.id} failed unexpectedly: {type(e).__name__}: {e}. The traceback "
                                            f"is in {plan.root / 'run.log'}."))
    seconds = time.perf_counter() - t0
    manifest = {
        "quantship": __version__,
        "stage": run.kind,
        "run_id": run.id,
        "key": run.key,
        "variants": run.variants,
        "config": portable(run.config),  # absolute local paths shown as <local>/<name>: artifacts are relocatable
        "inputs": {kind: {"run": dep, "key": plan.run(dep).key, "dir": plan.run(dep).dir.name}
                   for kind, dep in run.deps.items()},
        "input_files": portable(run.inputs),
        "versions": tool_versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(seconds, 3),
        "metrics": metrics,
        "peak_rss_bytes": used.figures.get("peak_rss_bytes"),  # the process's resident set during the stage
        "peak_gpu_bytes": used.figures.get("peak_gpu_bytes"),  # torch's allocator peak; None: CUDA not in use
        **manifest_facts(plan, run, tmp),  # recipe (secrets removed), source commit, calibration hash, tools, CUDA
    }
    commit_dir(tmp, run.dir, manifest)
    return StageResult(run.id, "done", seconds)


def _failed(run: StageRun, tmp: Path, error: QuantshipError) -> StageResult:
    shutil.rmtree(tmp, ignore_errors=True)
    return StageResult(run.id, "failed", error=error)


def _check_gates(plan: Plan, run: StageRun, outcome: RunOutcome) -> None:
    from pipeline.eval.gates import check_gates

    metrics = (read_manifest(run.dir) or {}).get("metrics", {})
    for variant in run.variants:
        gates = plan.recipe.variants[variant].eval.gates.model_dump()
        failures = check_gates(metrics, gates)
        if failures:
            outcome.gate_failures[variant] = failures
            for f in failures:
                log.error("variant %s: %s", variant, f)


def write_report(plan: Plan, outcome: RunOutcome | None = None) -> Path | None:
    """``<root>/report.md``, ``report.html``, the plots and ``report.json`` from the plan's manifests (rewritten on
    every run), one row per variant with its verdict; the rows are kept in ``outcome.rows``."""
    from pipeline.eval.collect import collect_rows, write_report_files

    gates = {v: r.eval.gates.model_dump() for v, r in plan.recipe.variants.items() if r.eval is not None}
    rows = collect_rows(plan.root, gates=gates, statuses=outcome.statuses if outcome else None)
    if outcome is not None:
        outcome.rows = rows
    if not rows:
        return None
    return write_report_files(plan.root, rows, f"quantship report: {plan.recipe.name}", gates,
                              subtitle=f"recipe {plan.recipe.path}")


class _RecipeView:
    """What a stage may read of the recipe: the variant's sections and path resolution."""

    def __init__(self, plan: Plan, recipe: Any) -> None:
        self.variant = recipe  # the matrix variant this run belongs to (all its variants agree on what it reads)
        self.path = plan.recipe.path
        self.name = plan.recipe.name
        self._loaded = plan.recipe

    def resolve(self, relative: str) -> Path:
        return self._loaded.resolve(relative)
