"""The runner's plan walk (runner.execute) without Ray: a run whose dependency failed is skipped, never waited on.

Stage functions are stand-ins (a small file each; compile fails on demand), so the walk is what is tested: with
the local executor, and with an in-process executor that hands results back late, in the order a Ray cluster may
(a fast failure arriving after the walk has passed over the runs that wait on it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import pipeline.runner as runner
from pipeline.artifacts import MANIFEST
from pipeline.errors import TargetUnavailable
from pipeline.executors.local import LocalExecutor
from pipeline.plan import make_plan
from pipeline.recipe_load import load_recipe
from pipeline.runner import StageResult, execute, run_stage
from tests.conftest import ROOT, write_recipe

MATRIX = """\
name: walk
model: {{source: {model}}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
eval: {{text: {eval}, seq_len: 64, max_tokens: 512}}
matrix:
  quantize.method: [none, rtn]
"""


@pytest.fixture
def fake_stages(monkeypatch):
    """Every stage writes one small file; compile@rtn raises a typed error and compile@none crashes."""
    ran: list[str] = []

    def stage(kind):
        def run(ctx):
            ran.append(ctx.run_id)
            if kind == "compile" and ctx.run_id == "compile@rtn":
                raise TargetUnavailable("compile@rtn: a stand-in typed error (what, why, how to fix).")
            if kind == "compile":
                raise ZeroDivisionError("a stand-in crash")
            (ctx.out / "out.txt").write_text(ctx.run_id)
            return {}
        return run

    monkeypatch.setattr(runner, "stage_function", stage)
    return ran


class LateExecutor(LocalExecutor):
    """Runs each stage at submit, in this process, but hands its result back only on the ``delay[run_id] + 1``-th
    ``results`` call after that (all of them when asked to block), as a cluster whose runs take unequal times."""

    def __init__(self, delay: dict[str, int]) -> None:
        super().__init__()
        self.delay = delay
        self._held: list[list] = []  # [calls left, result]

    def submit(self, plan, run, progress) -> None:
        self._held.append([self.delay.get(run.id, 0), run_stage(plan, run, progress)])

    def results(self, block: bool) -> list[StageResult]:
        if block:
            out, self._held = [r for _, r in self._held], []
            return out
        out = [r for left, r in self._held if left <= 0]
        self._held = [[left - 1, r] for left, r in self._held if left > 0]
        return out

    def busy(self) -> bool:
        return bool(self._held)


EXPECTED = {"download": "done", "quantize@none": "done", "quantize@rtn": "done", "compile@none": "failed",
            "compile@rtn": "failed", "evaluate@none": "skipped", "evaluate@rtn": "skipped"}


def _check(out, ran, plan) -> None:
    assert out.statuses == EXPECTED
    assert sorted(out.errors) == ["compile@none", "compile@rtn"]
    assert isinstance(out.errors["compile@rtn"], TargetUnavailable)
    assert "ZeroDivisionError: a stand-in crash" in str(out.errors["compile@none"])
    assert out.exit_code == 1
    assert not any(r.startswith("evaluate") for r in ran)  # a skipped run never runs
    assert not plan.run("compile@none").dir.exists() and not plan.run("evaluate@none").dir.exists()


def test_local_executor_skips_the_runs_after_a_failed_compile(tmp_path, fake_stages):
    plan = make_plan(load_recipe(write_recipe(tmp_path, MATRIX)), tmp_path / "out")
    assert [r.id for r in plan.runs] == list(EXPECTED)  # the order the late executor below relies on
    _check(execute(plan), fake_stages, plan)


def test_a_failure_that_arrives_after_the_walk_passed_its_dependents_still_skips_them(tmp_path, fake_stages):
    """compile@none fails slowly: its result comes back after compile@rtn's and after evaluate@rtn was skipped,
    in the same pass over the plan, with nothing left running (the walk used to stop: 'plan walk stuck')."""
    plan = make_plan(load_recipe(write_recipe(tmp_path, MATRIX)), tmp_path / "out")
    executor = LateExecutor({"compile@none": 2})
    _check(execute(plan, executor=executor), fake_stages, plan)
    assert not executor.busy()


@pytest.mark.parametrize("delays", [{"download": 1}, {"quantize@none": 3, "compile@rtn": 1}, {"compile@rtn": 5}])
def test_any_order_of_results_ends_with_the_same_statuses(tmp_path, fake_stages, delays):
    plan = make_plan(load_recipe(write_recipe(tmp_path, MATRIX)), tmp_path / "out")
    _check(execute(plan, executor=LateExecutor(delays)), fake_stages, plan)


def test_a_run_waiting_on_a_run_outside_the_plan_is_an_error_not_a_hang(tmp_path, fake_stages):
    plan = make_plan(load_recipe(write_recipe(tmp_path, MATRIX)), tmp_path / "out")
    plan.run("evaluate@rtn").deps["compile"] = "compile@elsewhere"
    with pytest.raises(RuntimeError, match=r"plan walk stuck: \['evaluate@rtn'\]"):
        execute(plan)


# --- per-stage resources in the manifest ---------------------------------------------------------------------


def test_each_manifest_records_its_stage_peak_memory_outside_the_key(tmp_path, monkeypatch):
    """quantize@rtn holds 256 MiB of written bytes for a moment, quantize@none nothing: the first's peak is higher
    by about that much (the high-water mark is reset per stage, not the process's history)."""
    import time

    def stage(kind):
        def run(ctx):
            if ctx.run_id == "quantize@rtn":
                block = b"\x01" * (256 << 20)
                time.sleep(0.1)  # the sampler's 20 ms period, where the kernel refuses the reset
                del block
            (ctx.out / "out.txt").write_text(ctx.run_id)
            return {}
        return run

    monkeypatch.setattr(runner, "stage_function", stage)
    plan = make_plan(load_recipe(write_recipe(tmp_path, MATRIX)), tmp_path / "out")
    execute(plan)
    keys = {r.id: r.key for r in plan.runs}
    peaks = {}
    for r in plan.runs:
        m = json.loads((r.dir / MANIFEST).read_text())
        assert m["peak_gpu_bytes"] is None  # no CUDA here
        assert isinstance(m["peak_rss_bytes"], int) and 20 << 20 < m["peak_rss_bytes"] < 64 << 30
        peaks[r.id] = m["peak_rss_bytes"]
    assert peaks["quantize@rtn"] - peaks["quantize@none"] > 200 << 20
    assert {r.id: r.key for r in make_plan(load_recipe(write_recipe(tmp_path, MATRIX)), tmp_path / "out").runs} == keys
    assert execute(make_plan(load_recipe(write_recipe(tmp_path, MATRIX)), tmp_path / "out")).worked() == []


def test_measuring_a_stage_does_not_import_torch():
    code = ("import sys; from pipeline.resources import measure\n"
            "with measure() as m: x = b'1' * (1 << 20)\n"
            "assert 'torch' not in sys.modules and m.figures['peak_rss_bytes'] > 0\n"
            "assert 'peak_gpu_bytes' not in m.figures\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ok", res.stderr
