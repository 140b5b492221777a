"""`pipeline compare RUN_DIR...`: the same report across separate runs, read back from plan.json and the manifests
(run folders built here from real plans, with manifests written as the runner writes them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MANIFEST, PLAN
from pipeline.cli import main
from pipeline.eval.collect import collect_rows, write_rows_json
from pipeline.plan import make_plan
from pipeline.recipe_load import load_recipe
from tests.conftest import write_recipe

RECIPE = """\
name: NAME
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 4, seq_len: 64}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
eval: {{text: {eval}, seq_len: 128, gates: {{max_kl: 0.01}}}}
serve: {{max_tokens: 8}}
matrix:
  quantize.method: [none, rtn]
"""
KL = {"none": 0.0, "rtn": 0.02}


def fake_run(tmp: Path, name: str, missing: tuple[str, ...] = ()) -> Path:
    """A run folder of recipe ``name`` as the runner leaves it; ``missing`` run ids have no manifest (failed)."""
    tmp.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(tmp, RECIPE.replace("NAME", name), f"{name}.yaml")
    plan = make_plan(load_recipe(recipe), tmp / "out")
    plan.save()
    for run in plan.runs:
        if run.id in missing:
            continue
        v = run.variants[0]
        metrics = {
            "download": {"bytes": 8 * 2**20},
            "quantize": {"bytes": (8 if v == "none" else 2) * 2**20},
            "compile": {"target": "transformers", "status": "runs here"},
            "evaluate": {"ppl": 10.0 + 10 * KL[v], "ref_ppl": 10.0, "kl_mean": KL[v], "top1_agreement": 1 - KL[v],
                         "tokens": 100, "runtime": "transformers", "text": "eval.txt", "seq_len": 128},
            "serve": {"status": "passed", "completion_tokens": 8, "smoke_latency_s": 0.25},
        }.get(run.kind, {})
        run.dir.mkdir(parents=True)
        (run.dir / MANIFEST).write_text(json.dumps({"key": run.key, "stage": run.kind, "seconds": 1.5,
                                                    "metrics": metrics}))
    return plan.root


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_compare_two_runs(tmp_path):
    a = fake_run(tmp_path, "alpha")
    b = fake_run(tmp_path, "beta", missing=("compile@rtn", "evaluate@rtn", "serve@rtn"))
    out = tmp_path / "cmp"
    res = invoke("compare", str(a), str(b), "--out", str(out))
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    assert re.search(r"^\| alpha/none \| pass \| none \| — \| 8\.00 \| 1\.00× \| 10\.0000 \| \+0\.00 \| 0\.0000 \| 100\.00 \| "
                     r"100 \| 1\.5 \| 32\.0 \| transformers \|$", md, re.M), md
    assert re.search(r"^\| alpha/rtn \| regression \(1 gate\) \| rtn \| 4/128 \| 2\.00 \| 4\.00× \| 10\.2000 \| \+2\.00 \| "
                     r"0\.0200 \| 98\.00 \|.*\| 32\.0 \| transformers \|$", md, re.M), md
    assert re.search(r"^\| beta/rtn \| failed run \(compile did not finish\) \| rtn \| 4/128 \| 2\.00 \|.*\| — \|", md, re.M)
    assert "- **alpha/rtn**: gate max_kl failed: KL divergence 0.0200 > 0.0100" in md
    assert "- **beta/rtn**: compile did not finish" in md
    page = (out / "report.html").read_text()
    assert "alpha/rtn" in page and 'badge failed">failed run' in page and "data:image/png;base64," in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert {"quality_vs_size.png", "quality_vs_speed.png", "report.json"} <= {p.name for p in out.iterdir()}
    assert "alpha/rtn" in res.output and "regression (1 gate)" in res.output


def test_gates_come_from_report_json_when_the_recipe_is_gone(tmp_path):
    root = fake_run(tmp_path, "alpha")
    (tmp_path / "alpha.yaml").unlink()
    assert [r["gate_failures"] for r in collect_rows(root)] == [None, None]  # no gates known: not judged
    write_rows_json(root, [], {"none": {"max_kl": 0.01}, "rtn": {"max_kl": 0.01}})
    assert [r["verdict"] for r in collect_rows(root)] == ["pass", "regression"]


def test_the_same_recipe_from_two_output_roots_gets_distinct_names(tmp_path):
    a = fake_run(tmp_path / "one", "alpha")
    b = fake_run(tmp_path / "two", "alpha")
    res = invoke("compare", str(a), str(b), "--out", str(tmp_path / "cmp"))
    assert res.exit_code == 0, res.output
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| alpha/none |" in md and "| out/alpha/none |" in md


@pytest.mark.parametrize("make,expected", [
    (lambda t: t / "nope", "is not a run folder: it does not exist or is not a folder"),
    (lambda t: t, "is not a run folder: it has no plan.json"),
])
def test_not_a_run_folder(tmp_path, make, expected):
    res = invoke("compare", str(make(tmp_path)), "--out", str(tmp_path / "cmp"))
    assert res.exit_code == 2 and expected in res.output and "Traceback" not in res.output
    assert not (tmp_path / "cmp").exists()


def test_a_parent_of_run_folders_names_them(tmp_path):
    fake_run(tmp_path, "alpha")
    res = invoke("compare", str(tmp_path / "out"), "--out", str(tmp_path / "cmp"))
    assert res.exit_code == 2 and "It holds run folders: alpha; pass those instead." in res.output


def test_a_broken_plan_is_named(tmp_path):
    (tmp_path / PLAN).write_text("{}")
    res = invoke("compare", str(tmp_path), "--out", str(tmp_path / "cmp"))
    assert res.exit_code == 2 and "is not a quantship plan" in res.output
