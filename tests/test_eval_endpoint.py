"""Evaluating what is deployed (issue 9, point 3): perplexity, sanity and tasks through the target's OpenAI
endpoint give the in-process figures for an identical deployment, a recipe with ``eval.through: endpoint`` runs end
to end and says how each figure was measured, a server that refuses token-id prompts is named, and a deployment
whose server renders another chat template than the model's fails a sanity gate through the endpoint while the same
model in process passes it."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.eval import endpoint as ep_mod
from pipeline.eval import sanity
from tests.conftest import EVAL_TEXT, TINY_MODEL, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "test-key-not-secret"
EMBEDDED = "embedded server (transformers)"


@pytest.fixture(scope="module")
def tiny():
    from pipeline.engines.transformers_engine import load_model

    return load_model(TINY_MODEL, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def served():
    """The embedded server on the tiny model (float32 on the CPU, as the evaluate stage's in-process runtime)."""
    from pipeline.serve.server import start_server
    from pipeline.stages.serve import build_app, stop_engine

    app = build_app(TINY_MODEL, KEY, "tiny")
    server = start_server(app)
    yield ep_mod.Endpoint(server.url, "tiny", KEY, EMBEDDED)
    server.stop()
    stop_engine(app)


def test_endpoint_perplexity_equals_in_process(tiny, served):
    """Same runtime (float32 transformers on the CPU) on the same windows and token ids: the only difference is
    the request path (one window plus its last target per request, a KV-cache prefill, JSON). Per token the two
    log-probs may differ by a few float32 roundings of the logits, so the mean NLL may differ by at most
    32 eps(float32) of itself (1.8e-5 nats here); measured: identical."""
    from pipeline.eval.perplexity import perplexity, tokenize_documents

    model, tok = tiny
    ids = tokenize_documents(tok, EVAL_TEXT.read_text())[:700]  # 5 full windows of 128 and a short last one
    ours = perplexity(model, ids, 128)
    got = ep_mod.endpoint_perplexity(served, ids, 128)
    assert (got["tokens"], got["windows"], got["seq_len"]) == (ours["tokens"], ours["windows"], 128) == (699, 6, 128)
    eps = torch.finfo(torch.float32).eps
    assert abs(got["nll_mean"] - ours["nll_mean"]) <= 32 * eps * ours["nll_mean"], (got, ours)
    assert got["ppl"] == pytest.approx(ours["ppl"], rel=64 * eps * ours["nll_mean"])


def test_sanity_through_the_endpoint_scores_like_the_reference(tiny, served):
    """The served chat replies of the same model, scored on re-tokenized text against the in-process greedy
    generations scored the same way: identical, with the server's templated prompts as long as the model's."""
    model, tok = tiny
    prompts = sanity.load_prompts()[:4]
    eos = sanity.eos_token_ids(tok, model)
    ref = sanity.generate_all(model, tok, prompts, 16, eos)
    outs = ep_mod.chat_generations(served, tok, prompts, 16, eos)
    assert [o["text"] for o in outs] == [r["text"] for r in ref]
    assert all(o["prompt_tokens"] == o["prompt_tokens_expected"] > 0 for o in outs)
    ref_t = ep_mod.as_text_tokens(ref, tok, eos)
    got = sanity.score_generations(outs, ref_t, eos, 16)
    assert got["reference_overlap"] == 1.0 and got["identical"] == 1.0
    assert got["eos_rate"] == sanity.score_generations(ref, None, eos, 16)["eos_rate"]
    for o, r in zip(outs, ref):  # EOS where the model stopped, as in the generated ids
        assert sanity.reached_eos(o["tokens"], eos) == sanity.reached_eos(r["tokens"], eos)
        assert o["finish_reason"] == ("stop" if sanity.reached_eos(r["tokens"], eos) else "length")


class _RefusingHandler(BaseHTTPRequestHandler):
    """A stand-in for llama-cpp-python's server, which declares ``prompt: str | list[str]``: token ids are a 422."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"detail": [{"loc": ["body", "prompt"], "msg": "Input should be a valid string"}]}).encode()
        self.send_response(422)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_that_refuses_token_id_prompts_is_named():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        ep = ep_mod.Endpoint(f"http://127.0.0.1:{httpd.server_address[1]}", "m", None, "llama.cpp server (stand-in)")
        with pytest.raises(ep_mod.EndpointRefused) as err:
            ep_mod.check_prompt_logprobs(ep, [0, 5, 6])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert err.value.engine == "llama.cpp server (stand-in)"
    assert str(err.value).startswith(
        "The llama.cpp server (stand-in) at the evaluated endpoint does not support prompt log-probs of a token-id "
        "prompt (echo with logprobs): HTTP 422 from /completions: [{'loc': ['body', 'prompt'], 'msg': 'Input should "
        "be a valid string'}].")
    assert "Set eval.through: auto" in str(err.value)


def test_endpoint_asked_for_a_target_without_a_server_is_a_recipe_error(tmp_path):
    """ONNX Runtime runs here but ships no OpenAI server: eval.through: endpoint is refused before any loading;
    auto falls back to in process."""
    from pipeline.errors import RecipeError
    from pipeline.stages.evaluate import _served

    (tmp_path / "engine.json").write_text(json.dumps({"target": "onnxruntime", "device": "cpu",
                                                      "engine": "ONNX Runtime"}))
    ctx = SimpleNamespace(config=SimpleNamespace(through="endpoint"), log=logging.getLogger("test"))
    with pytest.raises(RecipeError) as err:
        _served(ctx, tmp_path)
    assert str(err.value) == (
        "eval.through: endpoint, but compile.target 'onnxruntime' has no server that runs on this machine (not "
        "served: ONNX Runtime has no OpenAI-compatible server). Set eval.through: auto (the endpoint where the "
        "target's server runs, else in process, labelled so) or in_process, or evaluate on a machine that runs the "
        "engine.")
    ctx.config.through = "auto"
    assert _served(ctx, tmp_path) is None


RECIPE = """\
name: ep
model: {{source: {model}}}
quantize: {{method: none}}
compile: {{target: transformers, device: cpu}}
eval:
  text: {eval}
  seq_len: 128
  max_tokens: 512
  TASKS
  sanity: true
  sanity_prompts: prompts.jsonl
  sanity_max_new_tokens: 12
  through: THROUGH
  gates: {{min_reference_overlap: 0.8}}
"""

# Another chat template than the model's (plain "role: content" lines): what a server that picked the wrong
# template (or a default one) renders.
OTHER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def _run(tmp_path: Path, through: str, *args: str, tasks: bool = False) -> tuple[object, dict]:
    from click.testing import CliRunner

    from pipeline.cli import main

    text = RECIPE.replace("THROUGH", through).replace("TASKS", "tasks: [pydocs_cloze]\n  task_limit: 8" if tasks else "")
    recipe = write_recipe(tmp_path, text)
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), *args],
                               catch_exceptions=False)
    plan = json.loads((tmp_path / "out" / "ep" / "plan.json").read_text())
    (run,) = [r for r in plan["runs"] if r["id"] == plan["variants"]["none"]["evaluate"]]
    metrics = Path(run["dir"]) / "metrics.json"
    return res, json.loads(metrics.read_text()) if metrics.is_file() else {}


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep")
    lines = sanity.SHIPPED_PROMPTS.read_text().splitlines()[:4]
    (tmp / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return tmp


@pytest.mark.slow
def test_recipe_through_the_endpoint_end_to_end(plan_dir):
    """method none through the embedded server: perplexity equals the in-process one (recorded beside it), sanity
    and task scores equal the reference's (computed in process, once per plan), and metrics.json and the report say
    how each figure was measured."""
    pytest.importorskip("lm_eval")
    res, m = _run(plan_dir, "endpoint", tasks=True)
    assert res.exit_code == 0, res.output
    assert m["through"] == {"perplexity": f"endpoint: {EMBEDDED}", "kl_top1": "in process: transformers",
                            "sanity": f"endpoint: {EMBEDDED}", "tasks": f"endpoint: {EMBEDDED}"}
    eps = torch.finfo(torch.float32).eps
    assert abs(m["ppl"] - m["ppl_in_process"]) <= 64 * eps * m["nll_mean"] * m["ppl"] + 1e-6  # 6 decimals kept
    assert m["ppl"] == pytest.approx(m["ref_ppl"], abs=1e-5) and m["kl_mean"] < 1e-9 and m["tokens"] == 511
    assert m["sanity"]["reference_overlap"] == 1.0 and m["sanity"]["identical"] == 1.0
    assert m["sanity"]["prompt_token_mismatches"] == 0 and m["sanity"]["prompts"] == 4
    task, ref_task = m["tasks"]["pydocs_cloze"], m["ref_tasks"]["pydocs_cloze"]
    assert task["n"] == 8 and {k: task[k] for k in ("acc", "acc_norm")} == {k: ref_task[k] for k in ("acc", "acc_norm")}
    report = (plan_dir / "out" / "ep" / "report.md").read_text()
    assert f"perplexity, sanity, tasks: endpoint: {EMBEDDED}; KL, top-1: in process: transformers" in report
    evaluate_dir = next((plan_dir / "out" / "ep").glob("evaluate-*/"))
    assert KEY not in (evaluate_dir / "metrics.json").read_text()


@pytest.mark.slow
def test_a_server_with_another_chat_template_fails_the_sanity_gate(plan_dir, monkeypatch):
    """The point of evaluating what is deployed: the same weights, but the server renders another chat template
    than the model's. In process, the sanity gate passes (the model's own template); through the endpoint, the
    replies drift from the reference's and the gate fails with its figure (exit 3)."""
    from pipeline.stages import serve as serve_stage

    res, m = _run(plan_dir, "in_process")
    assert res.exit_code == 0, res.output
    assert m["sanity"]["reference_overlap"] == 1.0 and m["through"]["sanity"] == "in process: transformers"

    build_app = serve_stage.build_app

    def mismatched_app(*args, **kwargs):
        app = build_app(*args, **kwargs)
        app.state.engine.tokenizer.chat_template = OTHER_TEMPLATE
        return app

    monkeypatch.setattr(serve_stage, "build_app", mismatched_app)
    res, m = _run(plan_dir, "endpoint", "--force", "evaluate")  # the clean endpoint evaluation has this key
    assert res.exit_code == 3, res.output
    figure = m["sanity"]["reference_overlap"]
    assert figure < 0.8 and m["sanity"]["prompt_token_mismatches"] == 4
    assert (f"gate min_reference_overlap failed: token overlap with the reference's generations {figure:.4f} < "
            "0.8000") in res.output
    # Perplexity goes through token ids, which no template touches: it still equals the in-process figure.
    assert m["ppl"] == pytest.approx(m["ppl_in_process"], rel=1e-6)


@pytest.mark.slow
def test_a_refusing_server_leaves_perplexity_in_process_under_auto_and_fails_endpoint(plan_dir, monkeypatch):
    """The server's refusal of token-id prompts (what llama-cpp-python's does, here simulated on the probe):
    ``auto`` measures perplexity in process and says why; ``endpoint`` fails the evaluation naming the server."""
    def refuse(ep, ids):
        raise ep_mod.EndpointRefused(ep.engine, "prompt log-probs of a token-id prompt (echo with logprobs)",
                                     "HTTP 422 from /completions: prompt must be a string")

    monkeypatch.setattr(ep_mod, "check_prompt_logprobs", refuse)
    res, m = _run(plan_dir, "auto", "--force", "evaluate")
    assert res.exit_code == 0, res.output
    assert m["through"]["perplexity"] == (f"in process: transformers (the {EMBEDDED} refused token-id prompts with "
                                          "prompt log-probs)")
    assert m["endpoint_refused"] == "HTTP 422 from /completions: prompt must be a string"
    assert m["through"]["sanity"] == f"endpoint: {EMBEDDED}" and "ppl_in_process" not in m
    res, _ = _run(plan_dir, "endpoint", "--force", "evaluate")
    assert res.exit_code == 1
    assert f"The {EMBEDDED} at the evaluated endpoint does not support prompt log-probs" in " ".join(res.output.split())


def test_evaluated_with_groups_the_figures_by_how_they_were_measured():
    from pipeline.eval.collect import evaluated_with

    assert evaluated_with({"perplexity": "in process: gguf", "kl_top1": "in process: gguf"}, "gguf") == "gguf"
    assert evaluated_with({"kl_top1": "in process: t", "tasks": "endpoint: e", "perplexity": "endpoint: e"}, "t") == (
        "perplexity, tasks: endpoint: e; KL, top-1: in process: t")
