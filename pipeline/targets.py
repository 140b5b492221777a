"""What each method writes and what each engine target loads, as data, checked before any work.

One row per target: the module under ``pipeline/engines/`` that builds and serves it (the contract is in
``pipeline/engines/base.py``), the formats it loads with their constraints, the devices it runs on and the
KV-cache precisions it offers. The recipe validator reads these rows; so do ``pipeline doctor`` and
``pipeline plan``. Facts about engines that cannot run here are read from their loaders' source and cited in
the engine's module (versions named there).

Format names (what a quantized folder's ``config.json`` ``quantization_config`` declares, see
``pipeline.formats.detect_format``):

- ``hf``: no quantization_config (bf16/fp16/fp32 reference);
- ``awq``: AutoAWQ GEMM W4A16; ``gptq``: GPTQ v1 (zeros stored - 1);
- ``w8a8``: lmdeploy's ``smooth_quant`` int8 layout; ``ct-w8a8``: compressed-tensors ``int-quantized`` W8A8;
- ``ct-int4``: compressed-tensors ``pack-quantized`` 4-bit int; ``ct-fp8``: compressed-tensors ``float-quantized``;
- ``fp8``: ``quant_method: fp8`` (e4m3 weights, dynamic activations, per-channel or 128x128 blocks);
- ``bnb``: bitsandbytes NF4 / LLM.int8 as transformers serializes them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

# quantize.method -> the checkpoint format it writes by default (DESIGN.md §4); see format_of_quantize.
FORMAT_OF_METHOD: dict[str, str] = {
    "none": "hf",  # the unquantized reference in its original dtype (or whatever the source folder declares)
    "rtn": "awq",  # round-to-nearest INT4, written in the AWQ GEMM layout
    "awq": "awq",
    "gptq": "gptq",
    "smoothquant": "w8a8",
    "fp8": "fp8",
    "bnb-nf4": "bnb",
    "bnb-int8": "bnb",
}

METHODS_NEEDING_CALIBRATION = frozenset({"awq", "gptq", "smoothquant"})


def format_of_quantize(method: str, smoothquant_layout: str = "lmdeploy", fp8_layout: str = "fp8") -> str:
    """The format a quantize section writes (layout options included)."""
    if method == "smoothquant" and smoothquant_layout == "compressed-tensors":
        return "ct-w8a8"
    if method == "fp8" and fp8_layout == "compressed-tensors":
        return "ct-fp8"
    return FORMAT_OF_METHOD[method]


@dataclass(frozen=True)
class FormatRule:
    """Settings of one format that a target loads. ``None``: any."""

    bits: tuple[int, ...] | None = None
    group_sizes: tuple[int, ...] | None = None  # -1 stands for per-channel
    sym: bool | None = None  # True: symmetric only
    in_order_g_idx: bool = False  # True: a permuted g_idx (GPTQ act-order without static groups) is refused
    fp8_block: bool | None = None  # True: 128x128 weight blocks only; False: per-channel only
    why: str = ""  # the loader that says so


@dataclass(frozen=True)
class TargetSpec:
    engine: str  # human name
    module: str  # pipeline.engines.<module>: build / available / serve_command / load (see engines/base.py)
    loads: dict[str, FormatRule]  # format -> constraints
    devices: tuple[str, ...]  # compile.device values it runs on; the first is what 'auto' means without CUDA
    needs: str  # what must be present on the machine to run it
    kv_cache: tuple[str, ...] = ()  # compile.kv_cache values besides 'auto'
    built: bool = True  # False while the target's module is not written yet


_ANY = FormatRule()
# MatMulNBits (onnxruntime docs/ContribOperators.md): block_size a power of two, at least 16.
_ORT_INT4 = FormatRule((4,), (16, 32, 64, 128, 256, 512, 1024, 2048),
                       why="onnxruntime MatMulNBits: block_size is a power of two >= 16")
_TM_INT4 = FormatRule((4,), (128,), why="lmdeploy 0.18 turbomind/converter.py get_tm_config: group size 128")
# GGUF blocks hold 32 input columns with one fp16 scale (ggml-common.h QK4_0/QK4_1/QK8_0 = 32): a group must be a
# multiple of 32 (these are the usual ones; -1 is one group per row, whose width is a multiple of 32 in practice).
_GGUF_GROUPS = (32, 64, 128, 256, -1)
_GGUF_WHY = "llama.cpp Q4_0/Q4_1/Q8_0 blocks of 32 columns (pipeline/formats/gguf_blocks.py)"
_GGUF_INT4 = FormatRule((4,), _GGUF_GROUPS, why=_GGUF_WHY)

TARGETS: dict[str, TargetSpec] = {
    "transformers": TargetSpec(
        "PyTorch through transformers (embedded)", "transformers_engine",
        {"hf": _ANY, "awq": _ANY, "gptq": _ANY, "w8a8": _ANY, "ct-w8a8": _ANY, "bnb": _ANY,
         "fp8": _ANY, "ct-fp8": _ANY, "ct-int4": FormatRule((4,))},  # pipeline/engines/qlinear.py RUNTIME_FORMATS
        ("cpu", "cuda"), "torch and transformers (always installed)",
    ),
    "onnxruntime": TargetSpec(
        "ONNX Runtime", "onnxruntime_engine",
        {"hf": _ANY, "awq": _ORT_INT4,
         "gptq": FormatRule((4,), _ORT_INT4.group_sizes, in_order_g_idx=True,
                            why="onnxruntime-genai 0.18 loaders/gptq.py keeps g_idx only for desc_act; MatMulNBits "
                                "block_size is a power of two >= 16")},
        ("cpu", "cuda"), "onnxruntime (to run; onnxruntime-genai, onnx and onnx_ir to export)",
    ),
    "gguf": TargetSpec(
        "llama.cpp / Ollama", "gguf_engine",
        {"hf": _ANY, "awq": _GGUF_INT4, "gptq": FormatRule((4, 8), _GGUF_GROUPS, in_order_g_idx=True, why=_GGUF_WHY),
         "w8a8": _ANY, "ct-w8a8": _ANY},  # pipeline/formats/gguf_blocks.py: Q4_0 / Q4_1 / Q8_0, our integers
        ("cpu", "cuda"), "gguf (to write) and llama-cpp-python or llama-server (to run)",
    ),
    "lmdeploy-pytorch": TargetSpec(
        "lmdeploy PyTorch engine", "lmdeploy_engine",
        {"hf": _ANY, "awq": FormatRule((4,), why="lmdeploy 0.18 pytorch/backends/cuda/awq_modules.py: 4-bit"),
         "w8a8": _ANY,
         "ct-int4": FormatRule((4,), (32,), sym=True,
                               why="lmdeploy 0.18 pytorch/config.py _parse_compressed_tensors_config: symmetric, group 32"),
         "fp8": FormatRule(fp8_block=True, why="lmdeploy 0.18 pytorch/nn/linear/__init__.py: dynamic fp8 is BlockedF8Linear, "
                           "128x128 blocks")},
        ("cuda", "ascend"), "lmdeploy and a CUDA GPU (or torch_npu and an Ascend NPU with device: ascend)",
        kv_cache=("int8", "int4", "fp8"),
    ),
    "turbomind": TargetSpec(
        "lmdeploy TurboMind", "turbomind_engine",
        {"hf": _ANY, "awq": _TM_INT4,
         "gptq": FormatRule((4,), (128,), sym=True, in_order_g_idx=True,
                            why="lmdeploy 0.18 turbomind/converter.py: desc_act false, sym, group size 128"),
         "ct-int4": FormatRule((4,), (32, 128), why="lmdeploy 0.18 turbomind/converter.py: pack-quantized 4-bit int, "
                               "group size 32 or 128"),
         "fp8": FormatRule(fp8_block=True, why="lmdeploy 0.18 turbomind/weight_format.py FP8Format: 128x128 blocks")},
        ("cuda",), "lmdeploy with its CUDA-12 TurboMind libraries and an NVIDIA GPU",
        kv_cache=("int8", "int4"),
    ),
    "tensorrt-llm": TargetSpec(
        "TensorRT-LLM (PyTorch backend)", "tensorrt_llm_engine",
        {"hf": _ANY,
         "awq": FormatRule((4,), (64, 128), sym=True,
                           why="TensorRT-LLM _torch/modules/linear.py W4A16_AWQ_LinearMethod passes no zero points "
                           "(ModelOpt int4_awq is symmetric): fitted zero points cannot be converted exactly; quantize "
                           "with w_sym: true (awq, rtn or gptq)"),
         "gptq": FormatRule((4,), (64, 128), sym=True, in_order_g_idx=True,
                            why="TensorRT-LLM's PyTorch backend reads no gptq config; symmetric in-order 4-bit GPTQ is "
                            "converted exactly to ModelOpt W4A16_AWQ (pipeline/formats/modelopt.py)"),
         "fp8": FormatRule(why="128x128 blocks read as FP8_BLOCK_SCALES; per-channel converted to "
                           "FP8_PER_CHANNEL_PER_TOKEN (pipeline/formats/modelopt.py)"),
         "ct-fp8": _ANY,
         "w8a8": FormatRule(why="served as W8A16 int8 weight-only (no W8A8 SmoothQuant linear in the PyTorch backend, "
                            "_torch/modules/linear.py get_quant_method); same integers, activations in 16-bit"),
         "ct-w8a8": FormatRule(why="served as W8A16 int8 weight-only like w8a8: symmetric per-channel int8, the same "
                               "integers and scales; activations in 16-bit")},
        ("cuda",), "tensorrt_llm (NVIDIA's package index, not PyPI) and an NVIDIA GPU",
        kv_cache=("fp8",),
    ),
    "vllm": TargetSpec(
        "vLLM", "vllm_engine",
        {"hf": _ANY, "awq": FormatRule((4,)), "gptq": FormatRule((4, 8)), "ct-w8a8": _ANY, "ct-int4": _ANY,
         "ct-fp8": _ANY, "bnb": _ANY,
         "fp8": FormatRule(fp8_block=True, why="vLLM quantization/fp8.py Fp8LinearMethod: weight_block_size blocks or a "
                           "per-tensor weight_scale; per-channel FP8 goes through compressed-tensors")},
        ("cuda",), "vllm and a GPU", kv_cache=("fp8",),
    ),
    "sglang": TargetSpec(
        "SGLang", "sglang_engine",
        {"hf": _ANY, "awq": FormatRule((4,)), "gptq": FormatRule((4, 8)), "ct-w8a8": _ANY, "ct-int4": _ANY,
         "ct-fp8": _ANY,
         "fp8": FormatRule(fp8_block=True, why="SGLang's fp8.py follows vLLM's (blocks or per-tensor; not re-read "
                           "here); per-channel FP8 goes through compressed-tensors")},
        ("cuda",), "sglang and a GPU", kv_cache=("fp8",),
    ),
}


@dataclass(frozen=True)
class FormatSettings:
    """What a quantized checkpoint is, as far as the targets' rules care."""

    fmt: str
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    permuted_g_idx: bool = False
    fp8_block: bool | None = None


def check_target_loads(target: str, s: FormatSettings) -> str | None:
    """Why ``target`` cannot load a checkpoint with settings ``s``, or None when it can (and is built)."""
    spec = TARGETS[target]
    rule = spec.loads.get(s.fmt)
    if rule is None:
        able = sorted(t for t, sp in TARGETS.items() if s.fmt in sp.loads)
        return f"{spec.engine} does not load the {s.fmt} format; targets that do: {', '.join(able)}"
    able = _targets_loading(s)
    alt = f"; targets that load it: {', '.join(able)}" if able else ""
    cite = f" ({rule.why})" if rule.why else ""
    if rule.bits and s.bits is not None and s.bits not in rule.bits:
        return f"{spec.engine} loads {s.fmt} only at {'/'.join(map(str, rule.bits))} bits, not {s.bits}{cite}{alt}"
    if rule.group_sizes and s.group_size is not None and s.group_size not in rule.group_sizes:
        return (f"{spec.engine} loads {s.fmt} only with group size {'/'.join(map(str, rule.group_sizes))}, "
                f"not {s.group_size}{cite}{alt}")
    if rule.sym and s.sym is False:
        return f"{spec.engine} loads {s.fmt} only with symmetric weights (w_sym: true){cite}{alt}"
    if rule.in_order_g_idx and s.permuted_g_idx:
        return (f"{spec.engine} does not read g_idx, so it cannot load act-order with a permuted g_idx "
                f"(desc_act: true needs static_groups: true){cite}{alt}")
    if rule.fp8_block is True and s.fp8_block is False:
        return f"{spec.engine} loads fp8 only with 128x128 weight blocks (fp8.block: true){cite}{alt}"
    if not spec.built:
        built = sorted(t for t, sp in TARGETS.items() if sp.built)
        return f"target {target!r} ({spec.engine}) is not built into this quantship version yet; built: {', '.join(built)}"
    return None


def _targets_loading(s: FormatSettings) -> list[str]:
    out = []
    for name, spec in TARGETS.items():
        rule = spec.loads.get(s.fmt)
        if rule is None:
            continue
        if ((rule.bits and s.bits is not None and s.bits not in rule.bits)
                or (rule.group_sizes and s.group_size is not None and s.group_size not in rule.group_sizes)
                or (rule.sym and s.sym is False) or (rule.in_order_g_idx and s.permuted_g_idx)
                or (rule.fp8_block is True and s.fp8_block is False)):
            continue
        out.append(name)
    return out


def check_target_option(target: str, device: str, kv_cache: str) -> str | None:
    """Why ``target`` cannot take ``compile.device`` / ``compile.kv_cache``, or None."""
    spec = TARGETS[target]
    if device != "auto" and device not in spec.devices:
        return f"compile.device {device!r}: {spec.engine} runs on {' or '.join(spec.devices)}"
    if kv_cache != "auto" and kv_cache not in spec.kv_cache:
        offers = f"offers {', '.join(spec.kv_cache)}" if spec.kv_cache else "offers no KV-cache quantization"
        return f"compile.kv_cache {kv_cache!r}: {spec.engine} {offers} (or 'auto')"
    return None


def engine_module(target: str) -> Any:
    """The module that implements ``target`` (imported on use: vendor imports stay inside its functions)."""
    return importlib.import_module(f"pipeline.engines.{TARGETS[target].module}")
