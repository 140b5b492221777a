"""bitsandbytes NF4 and LLM.int8 checkpoints: what transformers + bitsandbytes write, and the small readers of it.

Both formats are defined by what ``transformers`` + ``bitsandbytes`` write and read, so they are produced by
their own path (``pipeline.engines.bnb_engine.quantize_checkpoint_bnb``) and loaded by it (``load_bnb_model``);
this module holds only the vendor-free knowledge of the files. What lands on disk, per quantized linear (checked
against the files written by transformers 5.24 + bitsandbytes 0.50.2, and against
``Bnb4BitHfQuantizer.serialized_names`` / ``Bnb8BitHfQuantizer.serialized_names`` in
transformers/quantizers/quantizer_bnb_{4,8}bit.py, which the loader matches; vLLM's pre-quantized path in
vllm/model_executor/model_loader/bitsandbytes_loader.py reads the same names and ``load_in_8bit``):

- ``nf4``: ``weight`` uint8 [out*in/2, 1] (two 4-bit codes per byte, the first element in the high nibble),
  ``weight.absmax`` fp32 [out*in/64] (one scale per block of 64 consecutive elements), ``weight.quant_map`` fp32 [16]
  (the NF4 levels, QLoRA appendix E), ``weight.quant_state.bitsandbytes__nf4`` uint8 (a JSON blob: shape, dtype,
  blocksize, quant_type); with double quantization also ``weight.nested_absmax`` / ``weight.nested_quant_map``.
  ``config.json`` gets ``quantization_config = {quant_method: bitsandbytes, _load_in_4bit: true,
  bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype, ...}``.
- ``int8``: ``weight`` int8 [out, in] (row-wise absmax, ``round(w * 127 / SCB)``), ``SCB`` fp32 [out] (each row's
  absmax), ``weight_format`` uint8 scalar (0 = row-major); ``quantization_config`` has ``_load_in_8bit: true`` and
  ``llm_int8_threshold`` (activations above it take the fp16 outlier path of LLM.int8, Dettmers et al. 2022 §3.2).

The output head stays unquantized (transformers' ``get_modules_to_not_convert`` keeps the output embeddings), and
so do embeddings and norms, in the source's dtype.
"""

from __future__ import annotations

import json
from typing import Any

QUANT_METHOD = "bitsandbytes"


def is_bnb_checkpoint(quantization_config: dict[str, Any] | None) -> bool:
    """Whether a folder's ``quantization_config`` says it is a bitsandbytes checkpoint."""
    return bool(quantization_config) and quantization_config.get("quant_method") == QUANT_METHOD


def read_nf4_quant_state(blob) -> dict[str, Any]:
    """The JSON dict stored in a ``weight.quant_state.bitsandbytes__nf4`` tensor (uint8 bytes of UTF-8 JSON)."""
    return json.loads(bytes(blob.tolist()).decode("utf-8"))


__all__ = ["QUANT_METHOD", "is_bnb_checkpoint", "read_nf4_quant_state"]
