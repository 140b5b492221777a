"""What a model folder is: its format and settings, read from ``config.json``'s ``quantization_config``.

The quantized folder declares itself (as lmdeploy, vLLM and transformers read it), so compile never parses a
file name or asks which method wrote it. The format names are those of ``pipeline/targets.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import QuantizationError
from pipeline.targets import FormatSettings


def detect_format(model_dir: Path) -> FormatSettings:
    """The format settings of the model folder ``model_dir``."""
    path = Path(model_dir) / "config.json"
    try:  # read here, not through formats.checkpoint: validation and planning must not import torch
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QuantizationError(f"{path}: cannot read the model's config ({e}); is {model_dir} a model folder?") from e
    return format_of_config(config.get("quantization_config"), where=str(path))


def format_of_config(qc: dict[str, Any] | None, where: str = "config.json") -> FormatSettings:
    """The format settings a ``quantization_config`` block declares (None: unquantized)."""
    if not qc:
        return FormatSettings("hf")
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return FormatSettings("awq", qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size")),
                              sym=not qc.get("zero_point", True) or bool((qc.get("meta") or {}).get("sym")))
    if method == "gptq":
        desc_act = bool(qc.get("desc_act", False))
        return FormatSettings("gptq", qc.get("bits"), qc.get("group_size"), sym=bool(qc.get("sym", True)),
                              permuted_g_idx=desc_act)
    if method == "smooth_quant":
        return FormatSettings("w8a8", 8)
    if method == "fp8":
        block = qc.get("weight_block_size")
        return FormatSettings("fp8", 8, fp8_block=bool(block))
    if method == "bitsandbytes":
        return FormatSettings("bnb", 4 if qc.get("load_in_4bit") else 8)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    raise QuantizationError(
        f"{where}: quantization_config.quant_method {method!r} is not a format quantship knows; known: awq, gptq, "
        "smooth_quant, fp8, bitsandbytes, compressed-tensors (int-quantized W8A8, pack-quantized INT4, "
        "float-quantized FP8)."
    )


def _compressed_tensors(qc: dict[str, Any], where: str) -> FormatSettings:
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise QuantizationError(f"{where}: a compressed-tensors quantization_config without config_groups")
    w = groups[0].get("weights") or {}
    kind, bits = w.get("type", "int"), w.get("num_bits")
    fmt = qc.get("format") or ""
    if kind == "float":
        return FormatSettings("ct-fp8", bits, fp8_block=w.get("strategy") == "block")
    if fmt == "pack-quantized" and bits == 4:
        return FormatSettings("ct-int4", 4, w.get("group_size"), sym=bool(w.get("symmetric", True)))
    if fmt == "int-quantized" and bits == 8:
        return FormatSettings("ct-w8a8", 8)
    raise QuantizationError(
        f"{where}: compressed-tensors format {fmt!r} with {bits}-bit {kind} weights is not one quantship reads; "
        "known: int-quantized 8-bit (W8A8), pack-quantized 4-bit int, float-quantized FP8."
    )
