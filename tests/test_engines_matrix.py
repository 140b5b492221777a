"""One quantization compiled for all eight targets in one run: the engines this machine runs are run (evaluated
in their own runtime, served by their own server), the others are built and say 'not run here' and why,
everywhere a person would look (engine.json, manifests, smoke.json, report.md)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.artifacts import ENGINE, MANIFEST, SMOKE
from pipeline.cli import main
from pipeline.engines.base import package_present
from pipeline.targets import TARGETS
from tests.conftest import write_recipe

RECIPE = """
name: engines
model: {{source: {model}}}
quantize: {{method: rtn, w_sym: true}}
eval: {{text: {eval}, seq_len: 128, max_tokens: 512}}
serve: {{max_tokens: 4}}
matrix: {{compile.target: [{targets}]}}
"""
RUNS_HERE = {"transformers", "onnxruntime"} | ({"gguf"} if package_present("llama_cpp") else set())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    recipe = write_recipe(tmp, RECIPE.replace("{targets}", ", ".join(TARGETS)))
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    root = tmp / "out" / "engines"
    by_stage: dict[str, dict[str, dict]] = {}
    for p in root.glob(f"*/{MANIFEST}"):
        m = json.loads(p.read_text())
        for variant in m["variants"]:
            by_stage.setdefault(m["stage"], {})[variant] = {"manifest": m, "dir": p.parent}
    return root, by_stage


@pytest.mark.slow
def test_one_quantization_feeds_every_target(run):
    _, by_stage = run
    quantize_dirs = {v["dir"] for v in by_stage["quantize"].values()}
    assert len(quantize_dirs) == 1 and set(by_stage["compile"]) == set(TARGETS)


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_each_target_runs_here_or_says_why_not(run, target):
    _, by_stage = run
    engine = json.loads((by_stage["compile"][target]["dir"] / ENGINE).read_text())
    compiled = by_stage["compile"][target]["manifest"]["metrics"]
    evaluated = by_stage["evaluate"][target]["manifest"]["metrics"]
    smoke = json.loads((by_stage["serve"][target]["dir"] / SMOKE).read_text())
    assert engine["status"] == compiled["status"]
    if target in RUNS_HERE:
        assert engine["run_here"] is True and not engine["status"].startswith("not run here")
        assert evaluated["runtime"] == target  # evaluated in the engine's own runtime
        if target == "onnxruntime":
            assert smoke["status"] == "not served: ONNX Runtime has no OpenAI-compatible server"
        else:  # served by its own server (llama.cpp's) or the embedded one, and answered the openai client
            assert smoke["status"] == "passed" and smoke["usage"]["completion_tokens"] >= 1
            assert smoke["served_by"] == ("embedded" if target == "transformers" else smoke["served_by"])
    else:
        assert engine["run_here"] is False and engine["status"] == f"not run here: {engine['why']}"
        assert evaluated["runtime"].startswith("transformers on the same checkpoint (")
        assert smoke == {"status": engine["status"]}


@pytest.mark.slow
def test_report_names_every_target_and_how_it_was_evaluated(run):
    root, _ = run
    report = (root / "report.md").read_text()
    assert "## Engines" in report
    for target in TARGETS:
        assert f"| {target} | {target} |" in report
