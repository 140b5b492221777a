"""What each method writes and what each engine target loads, as data, checked before any work.

Facts about engines we cannot run here are read from their loaders' source and cited:
- TurboMind, lmdeploy 0.18.0 ``lmdeploy/turbomind/deploy/converter.py`` (``get_tm_config``) and
  ``lmdeploy/turbomind/deploy/source_model/..``: AWQ (``version: gemm``) and GPTQ (``desc_act: false``,
  ``sym: true``) at 4 bits, group size 128 only; no W8A8.
- lmdeploy's PyTorch engine (``lmdeploy/pytorch/...``): bf16/fp16, AWQ W4A16, SmoothQuant W8A8.
- TensorRT-LLM: AWQ/GPTQ W4A16 (group 64/128) and W8A8 SmoothQuant through its checkpoint converter.
"""

from __future__ import annotations

from dataclasses import dataclass

# quantize.method -> the checkpoint format it writes (DESIGN.md §4).
FORMAT_OF_METHOD: dict[str, str] = {
    "none": "hf",  # the unquantized reference in its original dtype
    "rtn": "awq",  # round-to-nearest INT4, written in the AWQ GEMM layout
    "awq": "awq",
    "gptq": "gptq",
    "smoothquant": "w8a8",
    "bnb-nf4": "bnb",
    "bnb-int8": "bnb",
}

METHODS_NEEDING_CALIBRATION = frozenset({"awq", "gptq", "smoothquant"})


@dataclass(frozen=True)
class FormatRule:
    bits: tuple[int, ...] | None = None  # None: any
    group_sizes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TargetSpec:
    engine: str
    loads: dict[str, FormatRule]  # format -> constraints
    built: bool  # whether this quantship builds the target yet
    needs: str  # what must be present on the machine to run it


_ANY = FormatRule()

TARGETS: dict[str, TargetSpec] = {
    "transformers": TargetSpec(
        "PyTorch through transformers (embedded)",
        {"hf": _ANY, "awq": _ANY, "gptq": _ANY, "w8a8": _ANY, "bnb": _ANY},
        built=True,
        needs="torch and transformers (always installed)",
    ),
    "onnxruntime": TargetSpec(
        "ONNX Runtime", {"hf": _ANY, "awq": FormatRule((4,)), "gptq": FormatRule((4,))}, False, "onnx, onnxruntime"
    ),
    "gguf": TargetSpec("llama.cpp / Ollama", {"hf": _ANY, "awq": FormatRule((4,)), "gptq": FormatRule((4,))}, False, "gguf"),
    "lmdeploy-pytorch": TargetSpec(
        "lmdeploy PyTorch engine", {"hf": _ANY, "awq": FormatRule((4,), (128,)), "w8a8": _ANY}, False,
        "lmdeploy and a CUDA GPU (or an Ascend NPU with device: ascend)",
    ),
    "turbomind": TargetSpec(
        "lmdeploy TurboMind",
        {"hf": _ANY, "awq": FormatRule((4,), (128,)), "gptq": FormatRule((4,), (128,))},
        False,
        "lmdeploy with its CUDA-12 TurboMind libraries and an NVIDIA GPU",
    ),
    "tensorrt-llm": TargetSpec(
        "TensorRT-LLM",
        {"hf": _ANY, "awq": FormatRule((4,), (64, 128)), "gptq": FormatRule((4,), (64, 128)), "w8a8": _ANY},
        False,
        "tensorrt_llm (NVIDIA's package index, not PyPI) and an NVIDIA GPU",
    ),
    "vllm": TargetSpec(
        "vLLM", {"hf": _ANY, "awq": FormatRule((4,)), "gptq": FormatRule((4, 8)), "w8a8": _ANY, "bnb": _ANY}, False,
        "vllm and a GPU",
    ),
    "sglang": TargetSpec(
        "SGLang", {"hf": _ANY, "awq": FormatRule((4,)), "gptq": FormatRule((4, 8)), "w8a8": _ANY}, False, "sglang and a GPU"
    ),
}


def check_target_loads(target: str, fmt: str, bits: int, group_size: int) -> str | None:
    """Why ``target`` cannot load ``fmt`` at these settings, or None when it can (and is built)."""
    spec = TARGETS[target]
    rule = spec.loads.get(fmt)
    if rule is None:
        able = sorted(t for t, s in TARGETS.items() if fmt in s.loads)
        return f"{spec.engine} does not load the {fmt} format; targets that do: {', '.join(able)}"
    if fmt != "hf" and rule.bits and bits not in rule.bits:
        return f"{spec.engine} loads {fmt} only at {'/'.join(map(str, rule.bits))} bits, not {bits}"
    if fmt != "hf" and rule.group_sizes and group_size not in rule.group_sizes:
        return (
            f"{spec.engine} loads {fmt} only with group size {'/'.join(map(str, rule.group_sizes))}, "
            f"not {group_size}"
        )
    if not spec.built:
        built = sorted(t for t, s in TARGETS.items() if s.built)
        return f"target {target!r} ({spec.engine}) is not built into this quantship version yet; built: {', '.join(built)}"
    return None
