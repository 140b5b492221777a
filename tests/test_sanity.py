"""Generation sanity: exact figures of the pure functions, the two greedy decoders agree, the gates name figure
and threshold, and a broken quantized model that passes a perplexity gate is caught by a sanity gate."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.errors import RecipeError
from pipeline.eval import sanity
from pipeline.eval.gates import check_gates
from tests.conftest import EVAL_TEXT, TINY_MODEL


def test_repeated_ngram_rate_exact():
    assert sanity.repeated_ngram_rate([1, 2, 3, 4, 5, 6], 4) == 0.0
    # 5 four-grams, the last repeats the first
    assert sanity.repeated_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 / 5)
    assert sanity.repeated_ngram_rate([7] * 10, 4) == pytest.approx(6 / 7)
    assert sanity.repeated_ngram_rate([1, 2, 3], 4) == 0.0
    assert sanity.repeated_ngram_rate([1, 1, 2], 1) == pytest.approx(1 / 3)


def test_eos_and_overlap_exact():
    assert sanity.strip_eos([5, 6, 3, 9], [3]) == [5, 6]
    assert sanity.reached_eos([5, 6, 3], [3]) and not sanity.reached_eos([5, 6], [3])
    assert sanity.token_overlap([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(2 * 2 / 7)
    assert sanity.token_overlap([1, 2], [2, 1]) == 1.0
    assert sanity.token_overlap([], []) == 1.0 and sanity.token_overlap([1], []) == 0.0
    outs = [{"id": "a", "tokens": [1, 2, 3]}, {"id": "b", "tokens": [4, 4, 4, 4, 4]}]
    refs = [{"id": "a", "tokens": [1, 2, 3]}, {"id": "b", "tokens": [4, 5, 3]}]
    got = sanity.score_generations(outs, refs, eos_ids=[3], max_new_tokens=5, n=2)
    # a: body [1, 2], EOS, overlap with [1, 2] = 1; b: body 4x5, 3 of 4 bigrams repeat, overlap 2*1/(5+2)
    assert got["repetition"] == pytest.approx((0 + 3 / 4) / 2, abs=1e-6)
    assert got["eos_rate"] == 0.5
    assert got["reference_overlap"] == pytest.approx((1 + 2 / 7) / 2, abs=1e-6)
    assert got["identical"] == 0.5 and got["prompts"] == 2


def test_shipped_prompts_and_bad_prompt_file(tmp_path):
    prompts = sanity.load_prompts()
    assert len(prompts) == 16 and len({p["id"] for p in prompts}) == 16
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "x", "messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "no messages"}\n')
    with pytest.raises(RecipeError, match=r"p.jsonl:2 is not a prompt"):
        sanity.load_prompts(bad)


def test_sanity_gates_name_figure_and_threshold():
    metrics = {"sanity": {"repetition": 0.97, "eos_rate": 0.25, "reference_overlap": 0.1}}
    fails = check_gates(metrics, {"max_repetition": 0.9, "min_eos_rate": 0.25, "min_reference_overlap": 0.5})
    assert fails == [
        "gate max_repetition failed: repeated 4-gram rate of greedy generations 0.9700 > 0.9000",
        "gate min_reference_overlap failed: token overlap with the reference's generations 0.1000 < 0.5000",
    ]
    assert check_gates({"sanity": {"eos_rate": 0.0}}, {"min_eos_rate": 0.1}) == [
        "gate min_eos_rate failed: EOS rate of greedy generations 0.0000 < 0.1000"]
    (msg,) = check_gates({}, {"min_reference_overlap": 0.5})
    assert "was not measured" in msg and "eval.sanity: true" in msg


@pytest.fixture(scope="module")
def tiny():
    from pipeline.engines.transformers_engine import load_model

    return load_model(TINY_MODEL, device="cpu", dtype=torch.float32)


def test_logits_loop_equals_transformers_generate(tiny):
    model, tok = tiny
    eos = sanity.eos_token_ids(tok, model)
    callable_only = lambda x: model(input_ids=x, use_cache=False).logits  # noqa: E731  (a non-transformers runtime)
    for p in sanity.load_prompts()[:2]:
        ids = sanity.prompt_ids(tok, p["messages"])
        assert ids[0] == tok.bos_token_id and tok.decode(ids).endswith("<|im_start|>assistant\n")
        a = sanity.greedy_generate(model, ids, 24, eos)
        assert len(a) == 24 or a[-1] in eos
        assert sanity.greedy_generate(callable_only, ids, 24, eos) == a


@pytest.mark.slow
def test_broken_quantized_model_passes_ppl_gate_but_fails_sanity(tiny, tmp_path):
    """RTN of the tiny model, then layer 3's attention output projection's scales zeroed: that layer's attention
    contributes nothing. Measured here (4096 held-out tokens, 16 prompts x 48 tokens): reference repetition
    0.57, rtn 0.54 / overlap 0.85, broken ppl +13.9 % but repetition 0.98 (it emits newlines) / overlap 0.11."""
    from safetensors.torch import load_file, save_file

    from pipeline.engines.transformers_engine import load_model
    from pipeline.eval.divergence import compare_to_reference
    from pipeline.eval.perplexity import tokenize_documents
    from pipeline.quant.rtn import quantize_checkpoint_rtn

    ref, tok = tiny
    quantize_checkpoint_rtn(TINY_MODEL, tmp_path / "rtn", group_size=128)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "rtn", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    key = "model.layers.3.self_attn.o_proj.scales"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})

    ids = tokenize_documents(tok, EVAL_TEXT.read_text())[:4096]
    prompts = sanity.load_prompts()
    eos = sanity.eos_token_ids(tok, ref)
    ref_out = sanity.generate_all(ref, tok, prompts, 48, eos)
    gates = {"max_ppl_increase_pct": 15.0, "max_repetition": 0.9, "min_reference_overlap": 0.5}
    results = {}
    for name in ("rtn", "broken"):
        model, _ = load_model(tmp_path / name, device="cpu", dtype=torch.float32)
        metrics = compare_to_reference(ref, model, ids, 256)
        metrics["sanity"] = sanity.score_generations(sanity.generate_all(model, tok, prompts, 48, eos), ref_out, eos, 48)
        results[name] = (metrics, check_gates(metrics, gates))
    ref_fig = sanity.score_generations(ref_out, ref_out, eos, 48)
    assert ref_fig["reference_overlap"] == 1.0 and ref_fig["repetition"] < 0.7

    rtn, rtn_fails = results["rtn"]
    assert rtn_fails == [], rtn_fails
    assert rtn["ppl_increase_pct"] < 2 and rtn["sanity"]["reference_overlap"] > 0.7

    broken_m, fails = results["broken"]
    assert 5 < broken_m["ppl_increase_pct"] < 15  # the perplexity gate alone lets it through
    assert not any(f.startswith("gate max_ppl_increase_pct") for f in fails)
    assert [f.split(":")[0] for f in fails] == ["gate max_repetition failed", "gate min_reference_overlap failed"]
    assert broken_m["sanity"]["repetition"] > 0.9 and broken_m["sanity"]["reference_overlap"] < 0.3


PLAN = """\
name: shared
model: {{source: {model}}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
eval:
  text: {eval}
  seq_len: 128
  max_tokens: 1024
  tasks: [pydocs_cloze]
  task_limit: 12
  sanity: true
  sanity_max_new_tokens: 12
  through: in_process  # this test counts the in-process generations and task runs
  gates: {{max_repetition: REP}}
matrix:
  quantize.method: [none, rtn]
"""


@pytest.mark.slow
def test_pipeline_shares_the_reference_and_records_tasks_and_sanity(tmp_path, monkeypatch):
    """Two variants, one reference: its log-probs and generations are computed once (in reference-*/ under the
    plan's root) and read by both evaluate runs; tasks and sanity figures land in metrics.json; a sanity gate
    added later fails the cached evaluation with its figure and threshold (exit 3)."""
    pytest.importorskip("lm_eval")
    import json

    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.eval.divergence import ReferenceLogprobs
    from tests.conftest import write_recipe

    from pipeline.eval import tasks as tasks_module

    calls = {"compute": 0, "generate": 0, "tasks": 0}
    run_tasks = tasks_module.run_tasks

    def counting_tasks(*a, **k):
        calls["tasks"] += 1
        return run_tasks(*a, **k)

    monkeypatch.setattr(tasks_module, "run_tasks", counting_tasks)
    compute, generate = ReferenceLogprobs.compute.__func__, sanity.generate_all

    def counting_compute(cls, *a, **k):
        calls["compute"] += 1
        return compute(cls, *a, **k)

    def counting_generate(*a, **k):
        calls["generate"] += 1
        return generate(*a, **k)

    monkeypatch.setattr(ReferenceLogprobs, "compute", classmethod(counting_compute))
    monkeypatch.setattr(sanity, "generate_all", counting_generate)
    recipe = write_recipe(tmp_path, PLAN.replace("REP", "0.99"))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert calls == {"compute": 1, "generate": 3, "tasks": 3}  # the reference once, then each variant
    root = out / "shared"
    (ref_dir,) = root.glob("reference-*")
    assert len(list(ref_dir.glob("logprobs-*/reference.json"))) == 1 and len(list(ref_dir.glob("sanity-*.json"))) == 1
    assert len(list(ref_dir.glob("tasks-*.json"))) == 1

    metrics = {}
    for m in root.glob("evaluate-*/manifest.json"):
        data = json.loads(m.read_text())
        metrics[data["variants"][0]] = data["metrics"]
        assert json.loads((m.parent / "metrics.json").read_text()) == data["metrics"]
        assert (m.parent / "generations.json").is_file()
    none, rtn = (metrics[v] for v in sorted(metrics, key=lambda v: "rtn" in v))
    assert none["ppl"] == pytest.approx(none["ref_ppl"], rel=1e-6) and none["kl_mean"] < 1e-9
    assert none["sanity"]["reference_overlap"] == 1.0 and none["sanity"]["identical"] == 1.0
    assert none["reference"].startswith("cached once per plan")
    assert none["tasks"] == none["ref_tasks"] == rtn["ref_tasks"]  # the unquantized variant scores as the reference
    for m in (none, rtn):
        task = m["tasks"]["pydocs_cloze"]
        assert task["n"] == 12 and task["chance"] == 0.25 and 0 <= task["acc"] <= 1 and task["acc_stderr"] > 0
        assert {"repetition", "eos_rate", "reference_overlap"} <= set(m["sanity"])
        assert m["sanity"]["prompts"] == 16 and m["sanity"]["max_new_tokens"] == 12

    # A stricter sanity gate: nothing reruns (gates are not in the cache key), the gate fails with its figure.
    calls.update(compute=0, generate=0, tasks=0)
    write_recipe(tmp_path, PLAN.replace("REP", "0.01"))
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 3, res.output
    assert calls == {"compute": 0, "generate": 0, "tasks": 0}
    rep = none["sanity"]["repetition"]
    assert f"gate max_repetition failed: repeated 4-gram rate of greedy generations {rep:.4f} > 0.0100" in res.output


def test_a_runtime_that_cannot_decode_is_not_measured_and_fails_the_gate(tmp_path):
    import logging
    from types import SimpleNamespace

    from pipeline.stages.evaluate import _sanity
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)

    def broken_runtime(input_ids):
        raise RuntimeError("context window exceeded")

    ctx = SimpleNamespace(config=SimpleNamespace(sanity_prompts=None, sanity_max_new_tokens=4), out=tmp_path,
                          recipe=None, progress=lambda *a: None, log=logging.getLogger("test"))
    reference = SimpleNamespace(generations=lambda *a: {"eos_ids": [3], "outputs": []})
    got = _sanity(ctx, broken_runtime, tok, reference, runtime="onnxruntime")
    assert got["repetition"] is None and got["reference_overlap"] is None
    assert got["not_measured"] == ("greedy decoding through onnxruntime failed (RuntimeError: context window "
                                   "exceeded)")
    (msg,) = check_gates({"sanity": got}, {"min_reference_overlap": 0.5})
    assert msg == ("gate min_reference_overlap failed: the token overlap with the reference's generations was not "
                   "measured: greedy decoding through onnxruntime failed (RuntimeError: context window exceeded)")
