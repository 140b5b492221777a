"""The model card: hub metadata header (read back by huggingface_hub's own parser), method settings, the eval table
with task scores ± stderr and sanity figures, gates, serve commands; the license carried from the source model."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from pipeline.release.card import CardFacts, ServeEntry, render_card, tags
from pipeline.release.publish import source_license

ROW = {
    "variant": "awq", "method": "awq", "bits": 4, "group_size": 128, "size_bytes": 3_700_000, "ref_bytes": 8_100_000,
    "ppl": 126.5, "ref_ppl": 125.0, "kl_mean": 0.0123, "top1_agreement": 0.9512, "tokens": 1023, "seq_len": 128,
    "text_file": "heldout.txt", "runtime": "transformers", "quantize_s": 12.5, "target": "vllm",
    "tasks": {"pydocs_cloze": {"acc": 0.7, "acc_stderr": 0.1, "n": 20}},
    "ref_tasks": {"pydocs_cloze": {"acc": 0.75, "acc_stderr": 0.099, "n": 20}},
    "sanity": {"repetition": 0.0125, "eos_rate": 0.5, "reference_overlap": 0.71},
    "gate_failures": [], "verdict": "pass", "verdict_why": "all gates passed",
}
ENGINE = {"target": "vllm", "engine": "vLLM", "status": "not run here: vLLM is not installed",
          "format": {"fmt": "awq", "bits": 4, "group_size": 128}}
QUANTIZE = {"method": "awq", "w_bits": 4, "w_group_size": 128, "w_sym": False, "device": "auto",
            "awq": {"n_grid": 20, "clip": True}, "gptq": {"damp": 0.01}}


def facts(**kw) -> CardFacts:
    base = dict(name="acme/tiny-awq", variant="awq", recipe="tiny", row=ROW, quantize=QUANTIZE, engine=ENGINE,
                base_model="acme/tiny", license={"license": "apache-2.0"},
                gates={"max_kl": 0.05, "min_top1_agreement": 0.9, "max_repetition": None},
                serve=[ServeEntry("vllm", "vLLM", "vllm serve tiny-awq/model --served-model-name tiny-awq"),
                       ServeEntry("turbomind", "lmdeploy TurboMind", None, "Loads this format, but built for vllm.")],
                fetch="hf download acme/tiny-awq --local-dir tiny-awq", local_dir="tiny-awq")
    base.update(kw)
    return CardFacts(**base)


def test_header_is_hub_metadata():
    card = ModelCard(render_card(facts()))  # huggingface_hub parses the front matter itself
    data = card.data.to_dict()
    assert data["base_model"] == "acme/tiny" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert data["tags"] == ["quantship", "awq", "int4", "vllm", "quantized"]
    assert data["pipeline_tag"] == "text-generation"


def test_body_has_method_eval_table_gates_and_serve_commands():
    text = render_card(facts())
    assert "- method: `awq`\n- w_bits: `4`\n- w_group_size: `128`\n- w_sym: `False`" in text
    assert '- awq options: `{"clip": true, "n_grid": 20}`' in text and "damp" not in text
    assert "| figure | awq | unquantized reference |" in text
    assert "| perplexity | 126.5000 | 125.0000 |" in text and "| Δppl % | +1.20 | +0.00 |" in text
    assert "| KL | 0.0123 | — |" in text and "| top-1 % | 95.12 | — |" in text
    assert "| pydocs_cloze | 0.700 ± 0.100 | 0.750 ± 0.099 |" in text
    assert "| repetition | 0.013 | — |" in text and "| ref overlap | 0.710 | — |" in text
    assert "| verdict | pass | — |" in text and "Verdict: **pass** (all gates passed)" in text
    assert "| max_kl | 0.05 | pass |\n| min_top1_agreement | 0.9 | pass |" in text and "max_repetition" not in text
    assert "```sh\nhf download acme/tiny-awq --local-dir tiny-awq\n```" in text
    assert "### vLLM (`vllm`)\n\n```sh\nvllm serve tiny-awq/model --served-model-name tiny-awq\n```" in text
    assert "- lmdeploy TurboMind (`turbomind`): Loads this format, but built for vllm." in text
    assert "no publish stage" not in text  # the report's verdict note is not carried into a published card


def test_a_failed_gate_is_named_with_its_figure():
    row = {**ROW, "gate_failures": ["gate max_kl failed: KL divergence 0.0123 > 0.0100"], "verdict": "regression"}
    text = render_card(facts(row=row, gates={"max_kl": 0.01}))
    assert "| max_kl | 0.01 | gate max_kl failed: KL divergence 0.0123 > 0.0100 |" in text


def test_local_source_has_no_base_model_and_says_why():
    text = render_card(facts(base_model=None, license={}, source={"id": "tiny-llama-pydocs", "kind": "local"}))
    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data and "license" not in data
    assert "set `publish.base_model` in the recipe" in text and "the local model folder `tiny-llama-pydocs`" in text


def test_tags_and_library_follow_method_and_target():
    gguf = facts(engine={**ENGINE, "target": "gguf", "format": {"fmt": "gptq"}},
                 quantize={"method": "gptq", "w_bits": 8})
    assert tags(gguf) == ["quantship", "gptq", "int8", "gguf", "quantized"]
    assert "library_name: gguf" in render_card(gguf)
    fp8 = facts(engine={**ENGINE, "format": {"fmt": "ct-fp8"}}, quantize={"method": "fp8", "w_bits": 8})
    assert tags(fp8) == ["quantship", "fp8", "compressed-tensors", "vllm", "quantized"]
    nf4 = facts(engine={**ENGINE, "target": "transformers", "format": {"fmt": "bnb"}},
                quantize={"method": "bnb-nf4", "w_bits": 4})
    assert tags(nf4) == ["quantship", "bnb-nf4", "nf4", "bitsandbytes", "quantized"]


def test_license_carried_from_the_source_readme_or_config(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    download = tmp_path / "download"
    download.mkdir()
    (download / "model.json").write_text(json.dumps({"path": str(src)}))
    assert source_license(download) == {}
    (src / "config.json").write_text(json.dumps({"license": "mit"}))
    assert source_license(download) == {"license": "mit"}
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n# x\n")
    assert source_license(download) == {"license": "other", "license_name": "tiny-license", "license_link": "LICENSE"}
    text = render_card(facts(license=source_license(download)))
    data = ModelCard(text).data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "tiny-license", "LICENSE")
