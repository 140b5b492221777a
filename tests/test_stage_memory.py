"""Stages free their models (issue 10, GPU memory build-up over one ``pipeline run``): stages run one after
another in one long-lived process, so whatever a stage function leaves referenced stays on the device for the rest
of the run. After the evaluate stage and the serve stage return, no model they loaded is still alive (weak
references to every model ``load_model`` returned are dead, without a ``gc.collect()`` by the test), for both
``eval.through: in_process`` and ``endpoint`` (the embedded server, its engine thread and its scheduler)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest

from tests.conftest import write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = """\
name: mem
model: {{source: {model}}}
quantize: {{method: none}}
compile: {{target: transformers, device: DEVICE}}
eval:
  text: {eval}
  seq_len: 128
  max_tokens: 256
  sanity: true
  sanity_prompts: prompts.jsonl
  sanity_max_new_tokens: 4
  TASKS
  through: THROUGH
serve: {{max_tokens: 4}}
"""


@pytest.mark.parametrize("through,device", [
    ("in_process", "cpu"), ("endpoint", "cpu"),
    pytest.param("in_process", "cuda", marks=pytest.mark.gpu), pytest.param("endpoint", "cuda", marks=pytest.mark.gpu),
])
def test_evaluate_and_serve_leave_no_model_alive(tmp_path, monkeypatch, through, device):
    """On CUDA also: the caching allocator holds no more after each stage than before it (what bench/RESULTS.md's
    8B run showed climbing by 5.6-7.9 GiB per evaluate and serve stage)."""
    pytest.importorskip("lm_eval")
    import torch
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.engines import transformers_engine
    from pipeline.eval import sanity
    from pipeline.stages import evaluate, serve

    lines = sanity.SHIPPED_PROMPTS.read_text().splitlines()[:2]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    loaded: list[tuple[str, weakref.ref]] = []
    alive_before: list[int] = []  # at each load, how many earlier models were still alive
    real_load = transformers_engine.load_model

    def recording_load(*args, **kwargs):
        alive_before.append(sum(ref() is not None for _, ref in loaded))
        model, tok = real_load(*args, **kwargs)
        loaded.append((str(args[0] if args else kwargs.get("model_dir")), weakref.ref(model)))
        return model, tok

    monkeypatch.setattr(transformers_engine, "load_model", recording_load)
    after: dict[str, list[str]] = {}

    def checked(kind, real):
        def run(ctx):
            before = len(loaded)
            gpu_before = torch.cuda.memory_allocated() if device == "cuda" else 0
            result = real(ctx)
            after[kind] = [where for where, ref in loaded[before:] if ref() is not None]
            after[kind + "_loaded"] = len(loaded) - before
            if device == "cuda":
                after[kind + "_gpu_growth"] = torch.cuda.memory_allocated() - gpu_before
            return result
        return run

    monkeypatch.setattr(evaluate, "run", checked("evaluate", evaluate.run))
    monkeypatch.setattr(serve, "run", checked("serve", serve.run))
    tasks = "tasks: [pydocs_cloze]\n  task_limit: 4" if through == "in_process" else ""  # lm-eval holds the model
    text = RECIPE.replace("THROUGH", through).replace("TASKS", tasks).replace("DEVICE", device)
    recipe = write_recipe(tmp_path, text)
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    # evaluate loads the candidate and the reference; endpoint mode the embedded server's copy too; serve its own
    assert after["evaluate_loaded"] == (3 if through == "endpoint" else 2)
    assert after["serve_loaded"] == 1
    assert after["evaluate"] == [] and after["serve"] == [], after
    if through == "endpoint":  # the embedded server's copy loads once the candidate and the reference are gone
        assert alive_before[:3] == [0, 1, 0]
    else:
        assert alive_before[:2] == [0, 1]
    assert alive_before[-1] == 0  # the serve stage's
    if device == "cuda":  # nothing of the stages' models stays allocated (1 MiB for what torch keeps per device)
        assert after["evaluate_gpu_growth"] <= 1 << 20 and after["serve_gpu_growth"] <= 1 << 20, after
    plan = json.loads((tmp_path / "out" / "mem" / "plan.json").read_text())
    (run,) = [r for r in plan["runs"] if r["id"] == plan["variants"]["none"]["evaluate"]]
    metrics = json.loads((Path(run["dir"]) / "metrics.json").read_text())
    assert metrics["kl_mean"] < (1e-9 if device == "cpu" else 1e-3) and metrics["sanity"]["prompts"] == 2
    assert metrics["through"]["perplexity"] == ("endpoint: embedded server (transformers)" if through == "endpoint"
                                                else "in process: transformers")
    if through == "in_process":
        assert metrics["tasks"]["pydocs_cloze"]["n"] == 4
