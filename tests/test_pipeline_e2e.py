"""The whole spine on the shipped tiny model: run, cache, rerun one stage, force, gates, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MANIFEST, TMP_PREFIX, sha256_file
from pipeline.cli import main
from tests.conftest import ROOT, write_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

SINGLE = """\
name: single
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 4, seq_len: 64}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
eval: {{text: {eval}, seq_len: 128, max_tokens: 2048, gates: {{max_kl: {max_kl}}}}}
serve: {{max_tokens: 8}}
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def quickstart_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs")
    res = invoke("run", str(QUICKSTART), "-o", str(out))
    assert res.exit_code == 0, res.output
    return out / "quickstart"


def manifests(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob(f"*/{MANIFEST}")}


def test_quickstart_runs_every_stage_with_manifests(quickstart_out):
    ms = manifests(quickstart_out)
    kinds = sorted(m["stage"] for m in ms.values())
    # download and calibrate are shared by both variants; the rest run once per variant.
    assert kinds == ["calibrate", "compile", "compile", "download", "evaluate", "evaluate",
                     "quantize", "quantize", "serve", "serve"]
    for folder, m in ms.items():
        assert folder == f"{m['stage']}-{m['key'][:12]}"
        assert {"key", "inputs", "versions", "seconds", "metrics", "files", "config"} <= set(m)
        assert m["versions"]["torch"] and m["versions"]["quantship"]
        for f in m["files"]:  # every checksum matches the file on disk
            assert sha256_file(quickstart_out / folder / f["path"]) == f["sha256"]
    assert not list(quickstart_out.glob(f"{TMP_PREFIX}*"))


def test_quickstart_quality_and_report(quickstart_out):
    ms = manifests(quickstart_out)
    ev = {m["variants"][0]: m["metrics"] for m in ms.values() if m["stage"] == "evaluate"}
    assert ev["none"]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert ev["none"]["top1_agreement"] == pytest.approx(1.0)
    assert 0 < ev["rtn"]["kl_mean"] < 0.2
    assert ev["rtn"]["ppl"] > ev["none"]["ppl"] * 0.98
    q = {m["variants"][0]: m["metrics"] for m in ms.values() if m["stage"] == "quantize"}
    assert q["rtn"]["format"] == "awq" and q["rtn"]["bytes"] < q["none"]["bytes"]
    report = (quickstart_out / "report.md").read_text()
    assert "| none |" in report and "| rtn |" in report
    smoke = [m["metrics"] for m in ms.values() if m["stage"] == "serve"]
    assert all(s["completion_tokens"] >= 1 and s["reply"] for s in smoke)


def test_second_run_does_no_work(quickstart_out):
    before = {p.name: p.stat().st_mtime_ns for p in quickstart_out.iterdir() if p.is_dir()}
    res = invoke("run", str(QUICKSTART), "-o", str(quickstart_out.parent))
    assert res.exit_code == 0
    assert "quickstart: 0 stage run(s) executed, 10 cached" in res.output
    assert before == {p.name: p.stat().st_mtime_ns for p in quickstart_out.iterdir() if p.is_dir()}
    plan = invoke("plan", str(QUICKSTART), "-o", str(quickstart_out.parent))
    assert "will run" not in plan.output and plan.output.count("cached") == 10


def test_changing_one_field_reruns_only_that_stage_and_downstream(tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, SINGLE.replace("{max_kl}", "1.0"))
    assert invoke("run", str(recipe), "-o", str(out)).exit_code == 0
    recipe.write_text(recipe.read_text().replace("max_tokens: 8", "max_tokens: 6"))
    res = invoke("run", str(recipe), "-o", str(out), "-v")
    assert "single: 1 stage run(s) executed, 5 cached" in res.output  # only serve
    recipe.write_text(recipe.read_text().replace("seq_len: 128", "seq_len: 96"))
    res = invoke("run", str(recipe), "-o", str(out))
    assert "single: 1 stage run(s) executed, 5 cached" in res.output  # only evaluate
    res = invoke("run", str(recipe), "-o", str(out), "--force", "quantize")
    assert "single: 4 stage run(s) executed, 2 cached" in res.output  # quantize, compile, evaluate, serve
    bad = invoke("run", str(recipe), "-o", str(out), "--force", "quantise")
    assert bad.exit_code == 2 and "--force quantise: no such stage in this plan" in bad.output


def test_failed_gate_exits_3_naming_gate_and_figure(tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, SINGLE.replace("{max_kl}", "0.0"))
    res = invoke("run", str(recipe), "-o", str(out))
    assert res.exit_code == 3
    assert "quality gate failed for variant 'rtn': gate max_kl failed: KL divergence" in res.output
    ms = manifests(out / "single")
    assert "serve" not in {m["stage"] for m in ms.values()}  # a gated variant is not served
    again = invoke("run", str(recipe), "-o", str(out))  # cached, and still failing
    assert again.exit_code == 3 and "0 stage run(s) executed" in again.output


def test_sigkill_mid_stage_then_resume(tmp_path):
    """Kill -9 the real CLI inside each stage in turn; every restart resumes and never reads half-written output."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, SINGLE.replace("{max_kl}", "1.0"))
    root = out / "single"
    killed_in = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for kind in ("download", "calibrate", "quantize", "compile", "evaluate", "serve"):
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe), "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if root.is_dir() and list(root.glob(f"{TMP_PREFIX}{kind}-*")):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_in.append(kind)
                # the killed stage left only a temporary folder: no complete artifact of that kind exists
                assert not [p for p in root.glob(f"{kind}-*") if (p / MANIFEST).exists()]
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {"quantize", "evaluate", "serve"} <= set(killed_in), killed_in
    res = invoke("run", str(recipe), "-o", str(out))
    assert res.exit_code == 0, res.output
    assert not list(root.glob(f"{TMP_PREFIX}*"))
    assert sorted(m["stage"] for m in manifests(root).values()) == sorted(
        ["download", "calibrate", "quantize", "compile", "evaluate", "serve"])
