"""The model card: README.md of a publishable folder, with the Hugging Face hub's metadata header.

Pure: ``render_card(CardFacts) -> str``. The header is written through ``huggingface_hub.ModelCardData`` (the
hub's own serializer: ``base_model``, ``base_model_relation: quantized``, ``library_name``, ``license``, ``tags``,
``pipeline_tag``), see https://huggingface.co/docs/hub/model-cards#specifying-a-base-model. The eval table is the
comparison report's own (``pipeline.eval.report.table``) for this variant and the reference, transposed, so the
card and report.md always show the same figures. The serve commands are the engines' own (``serve_command`` of
each target module that loads the format), collected by ``pipeline.release.publish``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# engine.json format name -> the format tag hub users search for
FORMAT_TAGS = {"awq": "awq", "gptq": "gptq", "w8a8": "w8a8", "ct-w8a8": "compressed-tensors",
               "ct-int4": "compressed-tensors", "ct-fp8": "compressed-tensors", "fp8": "fp8", "bnb": "bitsandbytes"}
# compile.target -> the hub's library_name (the library that loads what is published)
LIBRARY_OF_TARGET = {"gguf": "gguf", "onnxruntime": "onnx"}
TARGET_TAGS = {"gguf": "gguf", "onnxruntime": "onnx", "tensorrt-llm": "tensorrt-llm", "turbomind": "lmdeploy",
               "lmdeploy-pytorch": "lmdeploy", "vllm": "vllm", "sglang": "sglang"}


@dataclass
class ServeEntry:
    """How one engine serves the published folder: its command (paths relative to ``<dir>``) or why none."""

    target: str
    engine: str
    command: str | None  # one line to paste; None when the folder was not built for this engine
    note: str = ""


@dataclass
class CardFacts:
    """Everything the card says, gathered by ``pipeline.release.publish.card_facts``."""

    name: str  # the published model's name (repo name or folder name)
    variant: str
    recipe: str
    row: dict[str, Any]  # the report's row for this variant (pipeline.eval.collect.collect_rows)
    quantize: dict[str, Any]  # the quantize section as run (plan config)
    engine: dict[str, Any]  # the compile artifact's engine.json
    base_model: str | None  # hub id of the source model; None for a local source without publish.base_model
    source: dict[str, Any] | None = None  # provenance.source_facts of the download (id, kind, commit, fingerprint)
    license: dict[str, str] = field(default_factory=dict)  # license / license_name / license_link of the source
    gates: dict[str, Any] = field(default_factory=dict)  # the variant's gate thresholds (None = not set)
    serve: list[ServeEntry] = field(default_factory=list)
    fetch: str = ""  # how to get the folder: a download command or a path
    local_dir: str = "<dir>"  # what ``<dir>`` in the commands stands for


def precision_tag(method: str | None, bits: int | None) -> str | None:
    """int4 / int8 / nf4 / fp8 (None for the unquantized reference)."""
    if method in (None, "none"):
        return None
    if method == "fp8":
        return "fp8"
    if method == "bnb-nf4":
        return "nf4"
    return f"int{bits}" if bits else None


def tags(facts: CardFacts) -> list[str]:
    """quantship, the method, the precision, the format and the engine, without repeats."""
    fmt = (facts.engine.get("format") or {}).get("fmt")
    target = facts.engine.get("target")
    method = facts.quantize.get("method")
    out = ["quantship", method, precision_tag(method, facts.quantize.get("w_bits")), FORMAT_TAGS.get(fmt),
           TARGET_TAGS.get(target), "quantized" if method not in (None, "none") else None]
    return [t for i, t in enumerate(out) if t and t not in out[:i]]


def header(facts: CardFacts) -> str:
    """The YAML metadata block (without the ``---`` fences)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=facts.base_model,
        library_name=LIBRARY_OF_TARGET.get(facts.engine.get("target"), "transformers"),
        license=facts.license.get("license"),
        license_name=facts.license.get("license_name"),
        license_link=facts.license.get("license_link"),
        tags=tags(facts),
        pipeline_tag="text-generation",
        base_model_relation="quantized" if facts.base_model else None,
    )
    return data.to_yaml()


def _settings(quantize: dict[str, Any]) -> list[str]:
    """The method's settings as Markdown bullets: the common fields, and the method's own options block."""
    method = quantize.get("method")
    lines = [f"- method: `{method}`"]
    for key in ("w_bits", "w_group_size", "w_sym", "device"):
        if key in quantize and not (method in ("none", "smoothquant", "fp8", "bnb-nf4", "bnb-int8")
                                    and key in ("w_group_size", "w_sym")):
            lines.append(f"- {key}: `{quantize[key]}`")
    own = quantize.get({"gptq": "gptq", "awq": "awq", "smoothquant": "smoothquant", "fp8": "fp8"}.get(method, ""))
    if isinstance(own, dict) and own:
        lines.append(f"- {method} options: `{json.dumps(own, sort_keys=True)}`")
    return lines


def _eval_table(facts: CardFacts) -> list[str]:
    """Figure | this variant | reference, from the report's own cells."""
    from pipeline.eval.report import table

    row = dict(facts.row)
    ref = {"variant": "reference", "verdict": None, "method": "none", "ppl": row.get("ref_ppl"),
           "ref_ppl": row.get("ref_ppl"), "size_bytes": row.get("ref_bytes"), "ref_bytes": row.get("ref_bytes"),
           "tasks": row.get("ref_tasks") or {}, "tokens": row.get("tokens"), "target": None}
    if row.get("tasks"):  # a task the reference has no score for still gets its row
        ref["tasks"] = {name: ref["tasks"].get(name) for name in row["tasks"]}
    headers, (mine, theirs) = table([row, ref])
    lines = [f"| figure | {facts.variant} | unquantized reference |", "|---|---|---|"]
    for h, a, b in zip(headers, mine, theirs):
        if h in ("variant",):
            continue
        lines.append(f"| {_md(h)} | {_md(a)} | {_md(b)} |")
    return lines


def _gates(facts: CardFacts) -> list[str]:
    set_gates = {k: v for k, v in facts.gates.items() if v is not None}
    if not set_gates:
        return ["No quality gates were set for this variant."]
    failures = facts.row.get("gate_failures") or []
    out = ["| gate | threshold | result |", "|---|---|---|"]
    for name, limit in set_gates.items():
        failed = next((f for f in failures if f.startswith(f"gate {name} failed")), None)
        out.append(f"| {name} | {limit} | {_md(failed) if failed else 'pass'} |")
    return out


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_card(facts: CardFacts) -> str:
    """README.md for the published folder: metadata header, what it is, method, eval table, gates, how to serve."""
    from pipeline.eval.report import how_measured

    row = facts.row
    method = facts.quantize.get("method")
    fmt = (facts.engine.get("format") or {}).get("fmt")
    src = facts.source or {}
    base = facts.base_model or (f"the local model folder `{src.get('id')}`" if src.get("id") else "a local model")
    lines = ["---", header(facts).rstrip("\n"), "---", "", f"# {facts.name}", ""]
    precision = precision_tag(method, facts.quantize.get("w_bits"))
    what = f"{precision} ({method}) quantized" if precision else "unquantized"
    lines += [f"An {what} build of {('`' + base + '`') if facts.base_model else base} for "
              f"{facts.engine.get('engine') or facts.engine.get('target')}, made by "
              f"quantship from recipe `{facts.recipe}`, variant `{facts.variant}`. "
              f"Verdict: **{row.get('verdict', '—')}** ({row.get('verdict_why', '')}).", ""]
    if not facts.base_model:
        lines += ["The source model was a local folder, not a hub repo, so the metadata names no `base_model` "
                  "(set `publish.base_model` in the recipe to name its hub id).", ""]
    if src:
        commit = src.get("commit") or f"not resolved ({src.get('commit_why', 'unknown')})"
        lines += [f"Source: `{src.get('id')}` ({src.get('kind')}), revision `{src.get('revision')}`, commit "
                  f"`{commit}`, files fingerprint `{str(src.get('fingerprint'))[:16]}…`.", ""]
    if facts.license.get("license"):
        lines += [f"License: `{facts.license['license']}`, carried from the source model.", ""]

    lines += ["## Quantization", ""] + _settings(facts.quantize)
    lines += [f"- checkpoint format: `{fmt}` (as `config.json`'s `quantization_config` declares it)",
              f"- compile target: `{facts.engine.get('target')}` ({facts.engine.get('status')})", ""]

    lines += ["## Evaluation", ""] + _eval_table(facts) + [""]
    if row.get("runtime"):
        lines += [f"Evaluated with: {row['runtime']}.", ""]
    for para in how_measured([row], row.get("seq_len"), row.get("text_file")):
        lines += [para, ""]
    lines += ["### Quality gates", ""] + _gates(facts) + [""]

    lines += ["## Serving", ""]
    if facts.fetch:
        lines += ["Get the folder:", "", "```sh", facts.fetch, "```", ""]
    lines += [f"`{facts.local_dir}` below is {'that folder' if facts.fetch else 'the folder holding this README'}. "
              "Every command serves the OpenAI API "
              "(`/v1/completions`, `/v1/chat/completions`).", ""]
    built_for = facts.engine.get("target")
    others = [e for e in facts.serve if e.command is None and e.target != built_for]
    for entry in facts.serve:
        if entry in others:
            continue
        lines += [f"### {entry.engine} (`{entry.target}`)", ""]
        if entry.note:
            lines += [entry.note, ""]
        if entry.command:
            lines += ["```sh", entry.command, "```", ""]
    if others:
        lines += ["### Other engines that load this format", ""]
        lines += [f"- {e.engine} (`{e.target}`): {e.note}" for e in others] + [""]
    lines += ["## Provenance", "",
              "`manifest.json` lists the sha256 of every file in this folder, the recipe (secrets removed), the source "
              "model and its commit, the calibration tokens' hash and the versions of every tool used. Check a copy "
              f"with `pipeline verify {facts.local_dir}`.", ""]
    return "\n".join(lines)
