"""W8A8 checkpoint layouts: int8 weights per output channel, int8 activations per token at run time.

Two layouts of the same numbers (``w ≈ w_int8 * scale``, symmetric, no zero point); the SmoothQuant smoothing is
already folded into the norms, which stay ordinary float ``weight`` tensors under their usual names, as do the
embeddings, the final norm and ``lm_head`` (not quantized).

**lmdeploy** (``lite smooth_quant`` writes it, the PyTorch engine loads it). Per quantized linear ``<name>``:
``<name>.weight`` int8 [out, in], ``<name>.scale`` float32 [out, 1], optional ``<name>.bias`` in the model dtype;
``config.json`` ``quantization_config = {"quant_method": "smooth_quant", "quant_dtype": "int8"}`` (plus
``modules_to_not_convert`` when some linears are skipped). Checked against lmdeploy (InternLM/lmdeploy commit
1263d5c):

- ``lmdeploy/lite/apis/smooth_quant.py``: replaces every decoder-layer ``nn.Linear`` by ``QLinear.from_float`` and
  every RMSNorm by ``QRMSNorm.from_float`` (which keeps the float weight), then writes
  ``quantization_config = dict(quant_method='smooth_quant', quant_dtype='int8')`` and ``save_pretrained``
  (safetensors). lm_head is outside the decoder layers and stays float.
- ``lmdeploy/pytorch/models/q_modules.py`` ``QLinear``: buffers ``weight`` (quant dtype, [out, in]),
  ``scale`` (float32, [out, 1]), ``bias`` (model dtype, [out]); ``from_float`` fills them with ``per_channel_quant``.
- ``lmdeploy/pytorch/kernels/default/w8a8_kernels.py`` ``per_channel_quant``: ``scale = absmax_row / 127`` in
  float32, ``round``, ``clamp(-128, 127)`` — what ``primitives.quantize_per_channel_int8`` computes.
- ``lmdeploy/pytorch/config.py`` ``QuantizationConfig.from_config``: ``quant_method == 'smooth_quant'`` with
  ``quant_dtype`` defaulting to ``'int8'`` (resolved as ``getattr(torch, quant_dtype)``); ignored layers come from
  ``ignored_layers`` or ``modules_to_not_convert``.
- ``lmdeploy/pytorch/nn/linear/w8a8.py`` ``W8A8Linear.create_weights``: loads ``weight`` [out, in] int8 and ``scale``
  [out, 1] float32; ``lmdeploy/pytorch/nn/norm.py``: under smooth_quant the RMSNorm becomes the fused
  norm-and-quantize ``RMSNormW8A8`` with a float ``weight``.

**compressed-tensors ``int-quantized``** (vLLM's loader for llm-compressor's W8A8 checkpoints). Per linear:
``<name>.weight`` int8 [out, in], ``<name>.weight_scale`` [out, 1] (float32 here; llm-compressor writes the model
dtype, and vLLM copies either into a float32 parameter), no ``weight_zero_point`` for symmetric weights. Checked
against neuralmagic/compressed-tensors (commit 52792be and the 0.20.0 wheel):

- ``compressors/quantized_compressors/naive_quantized.py``: ``IntQuantizationCompressor`` is registered as
  ``int-quantized``; its compressed params are ``weight`` (in ``args.pytorch_dtype()`` = int8) and
  ``weight_scale``; ``decompress_weight`` is ``dequantize(weight, weight_scale)``.
- ``compressors/quantized_compressors/base.py`` ``_skip_zp``: zero points of symmetric args are not saved.
- ``quantization/lifecycle/initialize.py``: channel strategy scale shape ``(out, 1)``.
- ``quantization/quant_scheme.py`` preset ``W8A8``/``INT8``: weights ``{num_bits 8, type int, strategy channel,
  symmetric, dynamic false}``, input_activations ``{num_bits 8, type int, strategy token, symmetric, dynamic true}``.
- ``compressors/model_compressors/model_compressor.py`` ``update_config``: ``quantization_config`` =
  ``{version, quant_method: "compressed-tensors", sparsity_config, transform_config, **QuantizationConfig dump}``.
- vLLM ``compressed_tensors/schemes/compressed_tensors_w8a8_int8.py`` (``weight`` int8 [out, in],
  ``weight_scale`` float32 [out, 1] for the channel strategy) and ``compressed_tensors.py``
  ``_is_dynamic_token_w8a8`` (8-bit, weight strategy channel or tensor, input strategy token, input dynamic,
  weights symmetric).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import QuantizationError
from pipeline.formats import compressed_tensors

LMDEPLOY_SUFFIXES = ("weight", "scale")
COMPRESSED_TENSORS_SUFFIXES = ("weight", "weight_scale")
# The compressed-tensors release whose source the dict below was checked against; the field is informational
# (ModelCompressor.update_config records the writer's version; no loader compares it).


def _check_int8_weight(w_int8: torch.Tensor, scale: torch.Tensor) -> None:
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise QuantizationError(
            f"a W8A8 weight must be a 2-D int8 tensor [out, in], got {w_int8.dtype} of shape {tuple(w_int8.shape)}. "
            "Quantize it with pipeline.quant.primitives.quantize_per_channel_int8 first."
        )
    if scale.shape != (w_int8.shape[0], 1) or not scale.is_floating_point():
        raise QuantizationError(
            f"a W8A8 weight scale must be a float tensor of shape [out, 1] = {(w_int8.shape[0], 1)}, got "
            f"{scale.dtype} of shape {tuple(scale.shape)} (one scale per output channel)."
        )
    if not torch.isfinite(scale).all() or bool((scale <= 0).any()):
        raise QuantizationError(
            "a W8A8 weight scale is zero, negative or not finite: the quantizer met an all-zero or corrupt row. "
            "Check the source weights; quantize_per_channel_int8 clamps scales to at least 1e-8."
        )


# ------------------------------------------------------------------------------------------------ lmdeploy


def pack_lmdeploy(
    w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of one lmdeploy ``QLinear``, keyed by suffix: ``weight`` int8 [out, in], ``scale`` fp32 [out, 1],
    and ``bias`` (kept in its own dtype) when given."""
    _check_int8_weight(w_int8, scale)
    tensors = {"weight": w_int8.contiguous(), "scale": scale.to(torch.float32).contiguous()}
    if bias is not None:
        tensors["bias"] = bias.contiguous()
    return tensors


def unpack_lmdeploy(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_int8 [out, in], scale fp32 [out, 1])`` from one QLinear's suffix-keyed tensors."""
    missing = [k for k in LMDEPLOY_SUFFIXES if k not in tensors]
    if missing:
        raise QuantizationError(
            f"an lmdeploy smooth_quant linear lacks {missing}: each quantized linear needs `weight` (int8) and "
            "`scale` (float32 [out, 1]). The checkpoint is incomplete or not a smooth_quant checkpoint."
        )
    w_int8, scale = tensors["weight"], tensors["scale"]
    _check_int8_weight(w_int8, scale)
    return w_int8, scale.to(torch.float32)


def quantization_config_lmdeploy(modules_to_not_convert: list[str] | None = None) -> dict[str, Any]:
    """``config.json`` ``quantization_config`` of an lmdeploy smooth_quant W8A8 folder (lite/apis/smooth_quant.py)."""
    config: dict[str, Any] = {"quant_method": "smooth_quant", "quant_dtype": "int8"}
    if modules_to_not_convert:
        config["modules_to_not_convert"] = list(modules_to_not_convert)
    return config


# ------------------------------------------------------------------------------------------------ compressed-tensors


def pack_compressed_tensors(
    w_int8: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The tensors of one ``int-quantized`` linear, keyed by suffix: ``weight`` int8 [out, in], ``weight_scale``
    [out, 1] in ``scale_dtype`` (float32 keeps the scales exact; llm-compressor writes the model dtype), ``bias``."""
    _check_int8_weight(w_int8, scale)
    if not scale_dtype.is_floating_point:
        raise QuantizationError(f"weight_scale must be a float dtype, got {scale_dtype}.")
    tensors = {"weight": w_int8.contiguous(), "weight_scale": scale.to(scale_dtype).contiguous()}
    if bias is not None:
        tensors["bias"] = bias.contiguous()
    return tensors


def unpack_compressed_tensors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_int8 [out, in], scale fp32 [out, 1])`` from one int-quantized linear's suffix-keyed tensors."""
    missing = [k for k in COMPRESSED_TENSORS_SUFFIXES if k not in tensors]
    if missing:
        raise QuantizationError(
            f"a compressed-tensors int-quantized linear lacks {missing}: each needs `weight` (int8) and "
            "`weight_scale` ([out, 1]). The checkpoint is incomplete or in another compressed-tensors format."
        )
    zero_point = tensors.get("weight_zero_point")
    if zero_point is not None and bool((zero_point != 0).any()):
        raise QuantizationError(
            "this int-quantized linear has a non-zero weight_zero_point (asymmetric weights); W8A8 here is "
            "symmetric only, as vLLM's dynamic per-token int8 path requires."
        )
    w_int8, scale = tensors["weight"], tensors["weight_scale"]
    _check_int8_weight(w_int8, scale)
    return w_int8, scale.to(torch.float32)


def quantization_config_compressed_tensors(
    ignore: list[str] | None = None, targets: list[str] | None = None
) -> dict[str, Any]:
    """``config.json`` ``quantization_config`` of a compressed-tensors ``int-quantized`` W8A8 folder.

    One config group: int8 symmetric per-channel weights, int8 symmetric dynamic per-token input activations
    (the ``W8A8`` preset), targeting ``Linear`` modules except ``ignore`` (default ``["lm_head"]``).
    """
    # Only the fields that define the scheme: observer/actorder/block_structure are left to the reader's defaults,
    # which differ across compressed-tensors releases (the Oct-2025 source fills observer "minmax" for static
    # weights, 0.20.0 leaves None).
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
               "dynamic": False}
    input_activations = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
                         "dynamic": True}
    scheme = {
        "targets": list(targets) if targets else ["Linear"],
        "weights": weights,
        "input_activations": input_activations,
        "output_activations": None,
        "format": "int-quantized",
    }
    return compressed_tensors.quantization_config("int-quantized", scheme, ignore)


def dequantize(w_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w_int8 * scale`` in float32 [out, in] (both layouts)."""
    return w_int8.float() * scale.float()
