"""The ``quantization_config`` envelope every compressed-tensors folder shares (compressed-tensors 0.20,
``compressed_tensors/config/base.py`` + ``QuantizationConfig``); the schemes themselves are in ``w8a8.py``
(int-quantized W8A8), ``compressed_tensors_int4.py`` (pack-quantized INT4) and ``fp8.py`` (float-quantized)."""

from __future__ import annotations

from typing import Any

COMPRESSED_TENSORS_VERSION = "0.20.1"  # the package version the layouts were checked against


def quantization_config(fmt: str, scheme: dict[str, Any], ignore: list[str] | None) -> dict[str, Any]:
    """One config group ``group_0`` holding ``scheme``, in the ``fmt`` compression format; ``ignore`` defaults to
    ``["lm_head"]``."""
    return {
        "version": COMPRESSED_TENSORS_VERSION,
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme},
        "ignore": list(ignore) if ignore is not None else ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
