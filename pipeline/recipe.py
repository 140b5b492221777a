"""The recipe: a typed schema whose YAML keys are field names (one pydantic model per section).

Reading a file into it (YAML with line numbers, ``${ENV_VAR}``, the matrix, errors that name file, line and
field) is :mod:`pipeline.recipe_load`; the rules that span stages are :mod:`pipeline.rules`.

A recipe, in short::

    name: quickstart
    model: {source: ../models/tiny-llama-pydocs}
    calibration: {source: ../calibration/pydocs-calib.txt, samples: 16, seq_len: 256}
    quantize: {method: rtn, w_bits: 4, w_group_size: 128}
    compile: {target: transformers}
    eval: {text: ../data/eval/pydocs-heldout.txt, gates: {max_kl: 0.5}}
    serve: {smoke_prompt: "What is a list?"}
    matrix: {quantize.method: [none, rtn]}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pipeline.targets import FormatSettings, format_of_quantize

RECIPE_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """Where the model comes from: a hub id with a pinned revision, or a local folder."""

    source: str = Field(description="A Hugging Face hub id (org/name) or a local folder (relative to the recipe).")
    revision: str | None = Field(
        None, description="Hub revision to pin (commit sha, tag or branch). Required for hub ids, unused locally."
    )
    allow_pickle: bool = Field(False, description="Allow *.bin/*.pt pickle weights. Off: safetensors only.")
    trust_remote_code: bool = Field(False, description="Run the model repo's own Python code. Off unless asked.")
    allow_patterns: list[str] | None = Field(
        None, description="Files to fetch from the hub (glob patterns); default: weights, config and tokenizer."
    )


class CalibrationSection(_Section):
    """Calibration samples: token windows drawn deterministically from a text source."""

    source: str = Field(description="A local .txt/.jsonl/.parquet file (relative to the recipe) or a datasets id.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/datasets sources.")
    split: str = Field("train", description="Split of a datasets id.")
    subset: str | None = Field(None, description="Configuration name of a datasets id (e.g. wikitext-2-raw-v1).")
    samples: int = Field(128, ge=1, le=100_000, description="Number of calibration windows.")
    seq_len: int = Field(512, ge=8, le=131_072, description="Tokens per calibration window.")
    seed: int = Field(0, description="Seed of the window sampling; same seed, same samples.")


Method = Literal["none", "rtn", "awq", "gptq", "smoothquant", "fp8", "bnb-nf4", "bnb-int8"]

# Weight bits each method writes unless the recipe says otherwise, and the bits each method can write.
METHOD_BITS: dict[str, tuple[int, tuple[int, ...]]] = {
    "none": (16, (16,)),
    "rtn": (4, (4,)),  # AWQ GEMM layout: 4-bit only
    "awq": (4, (4,)),
    "gptq": (4, (4, 8)),
    "smoothquant": (8, (8,)),
    "fp8": (8, (8,)),  # e4m3 weights
    "bnb-nf4": (4, (4,)),
    "bnb-int8": (8, (8,)),
}


class GPTQOptions(_Section):
    """GPTQ settings (Frantar et al., 2022)."""

    damp: float = Field(0.01, gt=0, lt=1, description="Dampening, as a fraction of the Hessian's mean diagonal.")
    desc_act: bool = Field(
        True, description="Act-order: quantize columns by decreasing Hessian diagonal. With static_groups (the "
        "default) g_idx stays in order and every GPTQ loader reads it; without, it writes a permuted g_idx.",
    )
    block_size: int = Field(128, ge=1, le=4096, description="Columns per lazy-update block.")
    static_groups: bool = Field(
        True, description="Fix each group's grid on the original column order before the updates, so g_idx stays "
        "i // group_size with desc_act (static act-order, llm-compressor's actorder: static).",
    )


class AWQOptions(_Section):
    """AWQ settings (Lin et al., 2023)."""

    n_grid: int = Field(20, ge=1, le=100, description="Grid points of the scale exponent search in [0, 1).")
    clip: bool = Field(True, description="Search per-group weight clipping after scaling.")
    max_shrink: float = Field(0.5, gt=0, lt=1, description="Largest fraction a group's range may be clipped by.")
    duo_scaling: bool = Field(
        True, description="AutoAWQ/llm-compressor scales mag_x^a / mag_w^(1-a); invariant to per-channel rescaling "
        "of the input, which the paper's mag_x^a (false) is not.",
    )


class SmoothQuantOptions(_Section):
    """SmoothQuant W8A8 settings (Xiao et al., 2022)."""

    alpha: float = Field(0.5, gt=0, lt=1, description="Migration strength: 0 keeps outliers in activations, 1 moves all.")
    layout: Literal["lmdeploy", "compressed-tensors"] = Field(
        "lmdeploy", description="lmdeploy's smooth_quant layout (its PyTorch engine) or compressed-tensors (vLLM)."
    )
    weight_stat: Literal["mean", "max"] = Field(
        "mean", description="Weight statistic of the smoothing factors: 'mean' (lmdeploy's row-normalised mean |W|, "
        "lower KL in the quality bench) or 'max' (the paper's max |W|)."
    )


class FP8Options(_Section):
    """FP8 settings: e4m3 weights, activations scaled per token at run time (dynamic)."""

    block: bool = Field(
        False, description="128x128 weight blocks (DeepSeek-V3 style; what TurboMind reads) instead of one scale "
        "per output channel.",
    )
    layout: Literal["fp8", "compressed-tensors"] = Field(
        "fp8", description="quant_method fp8 (lmdeploy, TurboMind, vLLM, TensorRT-LLM) or compressed-tensors "
        "float-quantized (vLLM, SGLang, TensorRT-LLM).",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="Module names (or suffixes) kept in the model's dtype.",
    )


class QuantizeSection(_Section):
    """How to quantize. ``none`` keeps the reference; the others write an engine-loadable checkpoint.

    Example::

        quantize: {method: gptq, w_bits: 4, w_group_size: 128, gptq: {desc_act: true, static_groups: true}}
    """

    method: Method = Field(description="none (reference), rtn, awq, gptq, smoothquant (W8A8), bnb-nf4 or bnb-int8.")
    w_bits: int = Field(
        None, validate_default=False,
        description="Weight bits; default by method: 4 for rtn/awq/gptq/bnb-nf4, 8 for smoothquant/bnb-int8.",
    )
    w_group_size: int = Field(128, description="Input columns sharing one scale and zero point (32, 64 or 128).")
    w_sym: bool = Field(None, validate_default=False, description="Symmetric weights (zero point 2^(bits-1)); default: true for gptq, else false. rtn/awq "
                         "with w_sym: true still write the AWQ GEMM layout (zeros all 8), which TensorRT-LLM's "
                         "symmetric W4A16_AWQ can take exactly.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where calibrated methods run: auto = GPU if any.")
    gptq: GPTQOptions = Field(default_factory=GPTQOptions, description="Used by method gptq.")
    awq: AWQOptions = Field(default_factory=AWQOptions, description="Used by method awq.")
    smoothquant: SmoothQuantOptions = Field(default_factory=SmoothQuantOptions, description="Used by method smoothquant.")
    fp8: FP8Options = Field(default_factory=FP8Options, description="Used by method fp8.")

    def format_settings(self) -> FormatSettings:
        """The format this section writes, with the settings the targets' rules check."""
        fmt = format_of_quantize(self.method, self.smoothquant.layout, self.fp8.layout)
        int_grid = self.method in ("rtn", "awq", "gptq")
        return FormatSettings(
            fmt, None if self.method == "none" else self.w_bits, self.w_group_size if int_grid else None,
            sym=self.w_sym if int_grid else None,
            permuted_g_idx=self.method == "gptq" and self.gptq.desc_act and not self.gptq.static_groups,
            fp8_block=self.fp8.block if self.method == "fp8" else None,
        )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") in METHOD_BITS:
            data = dict(data)
            if data.get("w_bits") is None:
                data["w_bits"] = METHOD_BITS[data["method"]][0]
            if data.get("w_sym") is None:
                data["w_sym"] = data["method"] == "gptq"
        return data

    @field_validator("w_group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in (32, 64, 128):
            raise ValueError("must be 32, 64 or 128")
        return v


Target = Literal["transformers", "onnxruntime", "gguf", "lmdeploy-pytorch", "turbomind", "tensorrt-llm", "vllm", "sglang"]


class CompileSection(_Section):
    """Which engine the quantized model is prepared for."""

    target: Target = Field("transformers", description="Engine target; 'transformers' is the embedded CPU/GPU one.")
    device: Literal["cpu", "cuda", "ascend", "auto"] = Field(
        "auto", description="Device the engine runs on; auto: CUDA when present, else the target's first device.",
    )
    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel GPUs (passed to lmdeploy, TensorRT-LLM, vLLM, SGLang).")
    session_len: int | None = Field(
        None, ge=16, description="Max tokens per session (prompt + reply); default: the model's max_position_embeddings.",
    )
    kv_cache_fraction: float = Field(
        0.8, gt=0, le=1, description="Share of free GPU memory the KV cache may take (lmdeploy cache_max_entry_count, "
        "TensorRT-LLM free_gpu_memory_fraction, vLLM gpu_memory_utilization).",
    )
    kv_cache: Literal["auto", "int8", "int4", "fp8"] = Field(
        "auto", description="KV-cache precision: auto (the model's dtype), int8, int4 or fp8, where the target offers it.",
    )
    max_batch_size: int = Field(128, ge=1, le=4096, description="Max concurrent sequences in the engine.")
    eager: bool | None = Field(
        None, description="Eager mode instead of CUDA/NPU graphs; default: the engine's choice for the format "
        "(Ascend: graph mode for W8A8, eager for W4A16, as lmdeploy documents).",
    )
    require_run: bool = Field(
        False, description="Fail the stage when this machine cannot run the engine (otherwise the artifact is built "
        "and the manifest says 'not run here' and why).",
    )


class GatesSection(_Section):
    """Quality gates: a failed gate fails the run (exit code 3) and names the gate and the figure."""

    max_ppl_increase_pct: float | None = Field(None, ge=0, description="Max perplexity increase over the reference, %.")
    max_kl: float | None = Field(None, ge=0, description="Max mean KL divergence to the reference (nats/token).")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="Min top-1 agreement with the reference.")
    max_repetition: float | None = Field(
        None, ge=0, le=1, description="Max repeated 4-gram rate of greedy generations (eval.sanity; 0..1)."
    )
    min_eos_rate: float | None = Field(
        None, ge=0, le=1, description="Min share of sanity prompts whose generation stops (EOS) within the limit."
    )
    min_reference_overlap: float | None = Field(
        None, ge=0, le=1, description="Min token overlap (F1) of greedy generations with the reference's (eval.sanity)."
    )


class EvalSection(_Section):
    """Accuracy evaluation against the reference model on a held-out text."""

    text: str = Field(description="Held-out text file (relative to the recipe); documents separated by blank lines.")
    seq_len: int = Field(256, ge=8, le=131_072, description="Window length of the perplexity protocol.")
    max_tokens: int | None = Field(None, ge=16, description="Evaluate only the first N tokens of the text.")
    batch_size: int = Field(4, ge=1, le=1024, description="Windows per forward pass.")
    tasks: list[str] = Field(
        default_factory=list, description="lm-eval tasks to score (needs the [eval] extra); the shipped "
        "pydocs_cloze needs no download.",
    )
    task_limit: int | None = Field(None, ge=1, description="Score only the first N documents of each task.")
    task_paths: list[str] = Field(
        default_factory=list, description="Extra folders of lm-eval task YAMLs (relative to the recipe).",
    )
    sanity: bool = Field(False, description="Greedy generations on a fixed prompt set, scored against the reference's.")
    sanity_prompts: str | None = Field(
        None, description="Prompt set (JSONL of {id, messages}, relative to the recipe); default: the shipped one.",
    )
    sanity_max_new_tokens: int = Field(48, ge=1, le=4096, description="Token limit of each sanity generation.")
    through: Literal["auto", "endpoint", "in_process"] = Field(
        "auto", description="How perplexity, sanity and tasks reach the deployable model: 'endpoint' through the "
        "compile target's OpenAI-compatible server (started on 127.0.0.1, a free port, a fresh API key), "
        "'in_process' through its in-process runtime, 'auto' the endpoint where the target's server runs here, else "
        "in process. KL and top-1 agreement are always in process (they need full logits).",
    )
    gates: GatesSection = Field(default_factory=GatesSection, description="Quality gates.")


ENGINE_LIMITS = ("max_batch_size", "max_batch_tokens", "max_queued", "max_queued_tokens", "decode")


class ServeSection(_Section):
    """The compiled target's OpenAI-compatible server (the engine's own where it runs here, else the embedded one
    for the transformers target): started, health-checked, smoke-tested with the official openai client."""

    enabled: bool = Field(True, description="Run the serve stage (smoke test) for each variant.")
    host: str = Field("127.0.0.1", description="Bind address. Loopback unless told otherwise.")
    port: int = Field(0, ge=0, le=65535, description="Port; 0 picks a free one for the smoke test.")
    api_key: SecretStr | None = Field(None, description="Bearer key clients must send; use ${ENV_VAR}, never a literal.")
    smoke_prompt: str = Field("Hello! What is Python?", description="The chat message of the smoke test.")
    max_tokens: int = Field(16, ge=1, le=4096, description="Tokens generated in the smoke test.")
    keep_running: bool = Field(False, description="After the run, keep serving (one variant) until interrupted.")
    health_timeout_s: float = Field(
        600, gt=0, le=7200, description="How long an engine's own server may take to become healthy (it loads the "
        "model first).",
    )
    # The embedded server's caps (pipeline.serve.generate.GenerationEngine); an engine's own server takes its
    # batch settings from the compile section.
    max_batch_size: int = Field(16, ge=1, le=4096, description="Embedded server: sequences decoded together.")
    max_batch_tokens: int = Field(
        65536, ge=2, description="Embedded server: tokens (prompt + max_tokens) the running batch may reserve.")
    max_queued: int | None = Field(
        256, ge=0, description="Embedded server: sequences that may wait for the batch; past it a 429 "
        "(null: no cap).")
    max_queued_tokens: int | None = Field(
        None, ge=0, description="Embedded server: tokens waiting sequences may reserve; past it a 429 (null: no cap).")
    decode: Literal["auto", "eager", "graphs", "graphs+compile"] = Field(
        "auto", description="Embedded server's decode step (pipeline.serve.graph_step): eager, graphs (static KV "
        "cache + a CUDA graph per batch bucket on CUDA), graphs+compile (also torch.compile per layer); auto = graphs+compile "
        "on CUDA (eager where the model is refused or does not compile), eager elsewhere; the serve stage's smoke test "
        "decodes eagerly under auto (its few tokens never repay the capture and compile: 10-20 s per 8B variant).")

    def engine_limits(self) -> dict[str, int | None]:
        """The caps as ``GenerationEngine`` keyword arguments."""
        return {k: getattr(self, k) for k in ENGINE_LIMITS}


_PUBLISH_TO = re.compile(r"hf://(?P<org>[A-Za-z0-9{][A-Za-z0-9._{}-]*)/(?P<name>[A-Za-z0-9{][A-Za-z0-9._{}-]*)|file:///.+")


class PublishSection(_Section):
    """Where each variant whose quality gates passed is published: a Hugging Face hub repo (one commit with the
    manifest and model card) or a local folder (copied atomically). ``{variant}`` and ``{recipe}`` in ``to`` name
    each variant's own destination.

    Example::

        publish: {to: "hf://my-org/tiny-llama-{variant}", private: true, commit_message: "quantship release"}
    """

    to: str = Field(description="hf://ORG/NAME (a hub model repo) or file:///ABSOLUTE/PATH; {variant} and {recipe} "
                    "are replaced by the variant's and the recipe's names.")
    revision: str | None = Field(None, description="Hub branch to commit to (created if missing); default: main. "
                                 "Recorded only, for file:// destinations.")
    private: bool = Field(True, description="Create the hub repo private (ignored when it already exists).")
    commit_message: str | None = Field(None, description="Hub commit message; default names the recipe, variant "
                                       "and method.")
    variants: list[str] | None = Field(None, description="Publish only these variants (default: every variant "
                                       "whose gates passed).")
    overwrite: bool = Field(False, description="Replace a different publication already at a file:// destination "
                            "(off: such a destination is an error).")
    base_model: str | None = Field(None, description="Hub id of the source model for the card's base_model "
                                   "(default: model.source when it is a hub id; a local folder has none).")

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        if not _PUBLISH_TO.fullmatch(v):
            raise ValueError(f"must be hf://ORG/NAME (a hub repo id) or file:///ABSOLUTE/PATH (got {v!r})")
        if v.startswith("hf://") and re.search(r"\.\.|--|[.-]$", v.split("://", 1)[1].replace("{", "").replace("}", "")):
            raise ValueError(f"{v!r}: a hub repo name has no '..' or '--' and does not end in '.' or '-'")
        unknown = set(re.findall(r"\{([^}]*)\}", v)) - {"variant", "recipe"}
        if unknown:
            raise ValueError(f"{v!r}: unknown placeholder {{{sorted(unknown)[0]}}}; use {{variant}} or {{recipe}}")
        return v


class Recipe(_Section):
    """A quantship recipe: one model through download, calibrate, quantize, compile, evaluate and serve."""

    version: int = Field(RECIPE_VERSION, description="Recipe format version.")
    name: str | None = Field(None, description="Name of the outputs folder; default: the recipe file's stem.")
    model: ModelSection
    calibration: CalibrationSection | None = Field(None, description="Needed by methods that calibrate.")
    quantize: QuantizeSection
    compile: CompileSection = Field(default_factory=CompileSection)
    eval: EvalSection | None = Field(None, description="Accuracy evaluation and quality gates.")
    serve: ServeSection | None = Field(None, description="Serve and smoke-test each variant.")
    publish: PublishSection | None = Field(
        None, description="Publish each variant whose gates passed (needs eval): to the hub or a folder.",
    )
    matrix: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted field -> values; each combination is a variant (e.g. {quantize.method: [none, rtn]}).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (a folder name)")
        return v

    @model_validator(mode="after")
    def _version(self) -> Recipe:
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is not supported; this quantship reads {RECIPE_VERSION}")
        return self

    @model_validator(mode="after")
    def _publish_needs_eval(self) -> Recipe:
        if self.publish is not None and self.eval is None:
            raise ValueError("publish needs an eval section: only variants whose quality gates passed are published")
        return self


class LoadedRecipe(BaseModel):
    """A validated recipe with where it came from and its expanded variants."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    name: str
    base: Recipe
    variants: dict[str, Recipe]  # label -> fully resolved recipe (matrix values applied)

    def resolve(self, relative: str) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        p = Path(os.path.expanduser(relative))
        return p if p.is_absolute() else (self.path.parent / p).resolve()


def schema() -> dict:
    """The JSON Schema of a recipe (for editors)."""
    return Recipe.model_json_schema()
