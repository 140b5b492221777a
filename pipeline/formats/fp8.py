"""FP8 W8A8 checkpoints: e4m3 weights with float32 scales, activations quantized per token at run time.

Two layouts, one set of codes (``pipeline/quant/fp8.py``):

``quant_method: fp8`` (DeepSeek-V3 style; format ``fp8``). Per linear ``weight`` float8_e4m3fn [out, in] and
``weight_scale_inv`` float32 [ceil(out/128), ceil(in/128)] (the multiplier, despite its name: w = fp8 * scale_inv);
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128], "modules_to_not_convert": [...]}``. What the loaders read:

- lmdeploy 0.16 PyTorch engine (mirror at 1263d5c): ``pytorch/config.py`` ``QuantizationConfig.from_config``
  reads ``fmt`` (e4m3 -> float8_e4m3fn), ``weight_block_size``, ``activation_scheme`` and ``ignored_layers`` or
  else ``modules_to_not_convert``; ``pytorch/nn/linear/__init__.py`` ``build_linear`` builds ``BlockedF8Linear``
  for every dynamic fp8 config, which (``nn/linear/blocked_fp8.py``) fixes ``block_size = 128`` and creates
  ``weight_scale_inv`` float32 ``[div_up(out, 128), div_up(in, 128)]``. Per-channel scales have no place there.
- vLLM (``model_executor/layers/quantization/fp8.py`` at 1436674): ``Fp8Config.from_config`` reads
  ``activation_scheme``, ``weight_block_size``, ``ignored_layers`` or ``modules_to_not_convert``; with a block size
  ``Fp8LinearMethod`` registers ``weight_scale_inv`` (``BlockQuantScaleParameter``, ceil-divided grid), without one
  a per-*tensor* ``weight_scale`` (``PerTensorScaleParameter``, one float per fused shard). Per-channel scales
  under ``quant_method: fp8`` do not load (they do through compressed-tensors, below).
- TensorRT-LLM PyTorch backend (``_torch/model_config.py`` ``load_hf_quant_config``): ``quant_method == "fp8"``
  with ``weight_block_size`` -> ``FP8_BLOCK_SCALES``, asserting (128, 128); ``modules_to_not_convert`` excluded.
  Without a block size it sets no quant algo.
- TurboMind: fp8 with 128 blocks only (DESIGN.md §5, lmdeploy ``turbomind/deploy``).
- transformers 5.24 ``integrations/finegrained_fp8.py``: ``weight_block_size`` blocks, or None = per-tensor.

So per-channel under ``quant_method: fp8`` is written here as ``weight_scale_inv`` float32 [out, 1] without
``weight_block_size`` (and ``"weight_scale_granularity": "channel"``, read only by quantship's own runtime); the
targets' rules (``pipeline/targets.py``, ``fp8_block=True``) refuse it for every engine above before any work.

compressed-tensors ``float-quantized`` (format ``ct-fp8``), as compressed-tensors 0.20.1 writes it
(``compressors/naive_quantized/base.py`` ``NaiveQuantizationCompressor.compress``: ``weight`` cast to the scheme's
dtype, padded for blocks and cropped back; symmetric, so no ``weight_zero_point``): ``weight`` float8_e4m3fn
[out, in], ``weight_scale`` [out, 1] (strategy ``channel``) or [ceil(out/128), ceil(in/128)] (strategy ``block``,
``block_structure [128, 128]``). Scales are written in float32 (exact; llm-compressor writes the model dtype, and
vLLM's ``ChannelQuantScaleParameter`` / ``BlockQuantScaleParameter`` are float32 and copy either). The config
groups equal the package's ``FP8_DYNAMIC`` (channel weights, dynamic per-token activations) and ``FP8_BLOCK``
(block weights, dynamic per-token-group-128 activations, as vLLM's block path quantizes them) presets.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import QuantizationError
from pipeline.formats import compressed_tensors
from pipeline.quant.fp8 import BLOCK, FP8_DTYPE, block_grid

LAYOUTS = ("fp8", "compressed-tensors")
FP8_SCALE = "weight_scale_inv"  # quant_method fp8
CT_SCALE = "weight_scale"  # compressed-tensors


def scale_name(layout: str) -> str:
    if layout not in LAYOUTS:
        raise QuantizationError(f"FP8 layout must be one of {', '.join(LAYOUTS)}, got {layout!r}.")
    return FP8_SCALE if layout == "fp8" else CT_SCALE


def _check(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, where: str = "") -> None:
    if w_fp8.dtype != FP8_DTYPE or w_fp8.ndim != 2:
        raise QuantizationError(
            f"{where}an FP8 weight must be a 2-D float8_e4m3fn tensor [out, in], got {w_fp8.dtype} "
            f"{tuple(w_fp8.shape)}. The checkpoint is damaged or in another format; re-run the quantize stage."
        )
    expected = block_grid(tuple(w_fp8.shape), block) if block else (w_fp8.shape[0], 1)
    if tuple(scale.shape) != expected:
        kind = f"{block[0]}x{block[1]} blocks" if block else "one scale per output channel"
        raise QuantizationError(
            f"{where}FP8 scales of shape {tuple(scale.shape)} do not fit a weight of shape {tuple(w_fp8.shape)} "
            f"with {kind} (expected {expected}). The quantization_config does not match the tensors; re-run the "
            "quantize stage."
        )
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise QuantizationError(f"{where}FP8 scales contain zero, negative or non-finite values; re-quantize.")


def pack(w_fp8: torch.Tensor, scale: torch.Tensor, layout: str = "fp8", block: tuple[int, int] | None = BLOCK,
         bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one linear keyed by suffix: ``weight`` (e4m3), the scale (float32) and ``bias`` if any."""
    _check(w_fp8, scale, block)
    tensors = {"weight": w_fp8.contiguous(), scale_name(layout): scale.to(torch.float32).contiguous()}
    if bias is not None:
        tensors["bias"] = bias.contiguous()
    return tensors


def unpack(
    tensors: dict[str, torch.Tensor], quant_config: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """``(w_fp8 [out, in], scale float32, block or None)`` of one linear, as its folder's config declares it."""
    layout, block = read_quantization_config(quant_config)
    name = scale_name(layout)
    missing = [k for k in ("weight", name) if k not in tensors]
    if missing:
        raise QuantizationError(
            f"an FP8 ({layout}) linear lacks {missing} (it has {sorted(tensors)}): each needs `weight` "
            f"(float8_e4m3fn) and `{name}`. The checkpoint is incomplete or in another format."
        )
    w_fp8, scale = tensors["weight"], tensors[name].to(torch.float32)
    _check(w_fp8, scale, block)
    return w_fp8, scale, block


def quantization_config(block: bool, layout: str = "fp8", ignore: list[str] | None = None) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for FP8 weights with dynamic activations."""
    ignore = list(ignore) if ignore is not None else ["lm_head"]
    if layout == "fp8":
        qc: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        if block:
            qc["weight_block_size"] = list(BLOCK)
        else:
            qc["weight_scale_granularity"] = "channel"  # quantship's own marker; no engine loader reads this form
        qc["modules_to_not_convert"] = ignore
        return qc
    scale_name(layout)
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
               "strategy": "block" if block else "channel", "dynamic": False}
    if block:
        weights["block_structure"] = list(BLOCK)
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": BLOCK[1], "strategy": "group",
                "dynamic": True}
    else:
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                "dynamic": True}
    scheme = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None,
              "format": "float-quantized"}
    return compressed_tensors.quantization_config("float-quantized", scheme, ignore)


def read_quantization_config(qc: dict[str, Any]) -> tuple[str, tuple[int, int] | None]:
    """``(layout, block or None)`` from an FP8 ``quantization_config`` of either layout."""
    method = qc.get("quant_method")
    if method == "fp8":
        if str(qc.get("fmt", "e4m3")) != "e4m3":
            raise QuantizationError(f"FP8 fmt {qc.get('fmt')!r} is not read here; only e4m3 weights are.")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise QuantizationError(
                "this fp8 checkpoint uses static activation scales (activation_scheme: static); quantship runs "
                "dynamic per-token activations only. Compile for vLLM or lmdeploy, which read static scales."
            )
        size = qc.get("weight_block_size")
        return "fp8", (tuple(int(v) for v in size) if size else None)
    if method == "compressed-tensors" and qc.get("format") == "float-quantized":
        groups = list((qc.get("config_groups") or {}).values())
        w = (groups[0].get("weights") or {}) if groups else {}
        if w.get("type") != "float" or w.get("num_bits") != 8 or not w.get("symmetric", True):
            raise QuantizationError(f"compressed-tensors float weights {w} are not symmetric 8-bit FP8.")
        strategy = w.get("strategy")
        if strategy == "block":
            return "compressed-tensors", tuple(int(v) for v in w.get("block_structure") or BLOCK)
        if strategy == "channel":
            return "compressed-tensors", None
        raise QuantizationError(
            f"compressed-tensors FP8 strategy {strategy!r} is not read here (channel and block are); per-tensor "
            "FP8 checkpoints run in vLLM."
        )
    raise QuantizationError(f"not an FP8 quantization_config: quant_method {method!r}, format {qc.get('format')!r}.")
