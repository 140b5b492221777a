"""NVIDIA ModelOpt's unified Hugging Face checkpoint layout, as TensorRT-LLM's PyTorch backend reads it.

TensorRT-LLM's TensorRT engine flow (``convert_checkpoint.py`` + ``trtllm-build``) was removed in 2026; its PyTorch
backend serves a Hugging Face folder. What it reads was checked in the source, and decides what this module does:

**Which config it reads** (NVIDIA/TensorRT-LLM ``tensorrt_llm/_torch/model_config.py``, ``ModelConfig.from_pretrained``,
commit 008e0af, 2026): ``hf_quant_config.json`` first (``_build_modelopt_quant_config``: ``quant_algo``,
``kv_cache_quant_algo``, ``group_size``, ``exclude_modules``, ``has_zero_point``, ``pre_quant_scale``), parsed by
``tensorrt_llm/quantization/modelopt_config.py`` in either the legacy nested shape
``{"producer": {...}, "quantization": {...}}`` or the flat one (``quant_method: modelopt``). Only without that file
does it read ``config.json``'s ``quantization_config`` (``load_hf_quant_config``), and there it knows ``fp8`` *with*
``weight_block_size`` (-> ``FP8_BLOCK_SCALES``, 128x128 only) or ``activation_scheme: static``, ``mxfp4``, ``mxfp8``,
``nvfp4`` and ``compressed-tensors`` (``models/quant_config_utils.py``: 8-bit ``channel`` -> ``FP8_PER_CHANNEL_PER_TOKEN``,
``block`` -> ``FP8_BLOCK_SCALES``, 4-bit float -> NVFP4). **It does not know ``awq``, ``gptq`` or ``smooth_quant``**:
such a folder gets no quant algorithm and its ``qweight`` tensors match no parameter. So option (a) of reading our AWQ
folder directly is false; the folder must be converted.

**Which linear kernels exist** (``tensorrt_llm/_torch/modules/linear.py`` ``get_quant_method``, commit 00bbf71):
unquantized, FP8 QDQ (per-tensor), FP8 rowwise (``FP8_PER_CHANNEL_PER_TOKEN``), FP8 block scales, NVFP4, W4A8
variants, int8/int4 weight-only per channel, ``W4A16_AWQ`` and ``W4A8_AWQ``. **There is no W8A8 SmoothQuant method**
(``W8A8_SQ_PER_CHANNEL`` falls through to ``ValueError('unsupported quant mode')``), so our ``w8a8`` folders are
served as ``W8A16`` (below). There is no GPTQ method either: GPTQ goes through ``W4A16_AWQ``.

**W8A16** (``WeightOnlyQuantLinearMethod``, chosen by ``get_quant_method`` for ``is_weight_only()`` without per-group
scaling; ``quantization/mode.py`` ``QuantMode.from_quant_algo(W8A16)`` = ``use_weight_only(use_int4_weights=False)``,
so ``get_weight_dtype_and_id`` gives ``(torch.int8, 1)``): parameter ``weight`` int8 [in, out] filled from the
checkpoint's ``weight`` by ``load_weights_vanilla_helper`` / the fused qkv and gate_up loaders as
``preprocess_weights_for_mixed_gemm(weight.T.to(int8), torch.int8, float16)`` (so the checkpoint holds int8 [out, in]);
``weight_scale`` parameter [out] **in the model dtype**, filled by ``copy_weight``, which casts (fused linears
concatenate the [out] scales); no ``pre_quant_scale``, no ``input_scale``; the GEMM is ``weight_only_quant_gemm``
with 16-bit activations. ModelOpt 0.47 (``quant_utils.py``: ``int8_wo`` -> ``{"quant_algo": "W8A16"}``; scale =
``amax / 127`` per output row, ``round().clamp(-128, 127)``), run on CPU here with ``INT8_WEIGHT_ONLY_CFG`` on the
tiny Llama, writes ``weight`` int8 [out, in], ``weight_scale`` float32 [out] and ``hf_quant_config.json``
``{"quant_algo": "W8A16", "kv_cache_quant_algo": null, "exclude_modules": [...]}`` (no group size). Our W8A8
(lmdeploy ``weight`` int8 [out, in] + ``scale`` float32 [out, 1], or compressed-tensors ``weight_scale`` [out, 1])
is symmetric per output channel with the SmoothQuant scales folded into the norms: it converts to that layout
exactly (the same integers; the scales flattened to float32 [out], the same numbers). What differs at run time is
not the checkpoint: activations stay 16-bit (no per-token int8 rounding), and TensorRT-LLM rounds each scale to the
model dtype when it loads it (as it does for ModelOpt's own W8A16 export), a relative change of at most 2**-11 in
float16 or 2**-8 in bfloat16.

**W4A16_AWQ** (``W4A16_AWQ_LinearMethod``): parameter ``weight`` int8 [in, out/2] filled from the checkpoint's
``weight`` by ``load_weights_vanilla_helper`` as ``preprocess_weights_for_mixed_gemm(weight.T.to(int8), quint4x2)``,
so the checkpoint holds [out/2, in] with two *output* rows per byte; ``weight_scale`` [in/group, out] copied from the
checkpoint's [out, in/group] by ``.T`` (cast to the model dtype); ``pre_quant_scale`` [in] read with
``weights[0]["pre_quant_scale"]`` for every un-fused linear (a KeyError when absent); the GEMM is
``finegrained_mixed_dtype_gemm(..., has_zero_point=quant_config.has_zero_point, zeros=None)`` — **no zero points
are ever passed**, the int4 codes are signed and symmetric. ModelOpt's export is the same
(NVIDIA/TensorRT-Model-Optimizer ``modelopt/torch/export/quant_utils.py``, commit 5a4242f, 2025-12):
``pack_int4_in_uint8`` rounds ``w / scale`` into [-8, 7] and packs rows 2j (low nibble) and 2j+1 (high nibble) of the
[out, in] matrix into one uint8 of a [out/2, in] tensor; ``get_scaling_factor_from_weight`` uses ``amax / 7`` per
[out, in/group] group; ``process_layer_quant_config`` writes ``{"quant_algo": "W4A16_AWQ", "group_size",
"has_zero_point": false, "pre_quant_scale": true}``; ``postprocess_state_dict`` renames
``input_quantizer._pre_quant_scale`` to ``pre_quant_scale``; ``get_quant_config`` wraps it as
``{"producer": {"name": "modelopt", "version"}, "quantization": {...}}`` and ``export_hf_checkpoint`` writes that as
``hf_quant_config.json`` and ``convert_hf_config.convert_hf_quant_config_format``'s flat form into ``config.json``.

So a 4-bit group-wise weight converts **exactly** (no re-quantization) when its zero point is the midpoint
``2**(bits-1) = 8`` in every group: ``q_signed = q - 8`` in [-8, 7] and ``(q - 8) * s`` is the same number. That is
GPTQ with ``sym: true`` (our gptq default; stored zeros 7, unpacked 8) and in-order groups. AutoAWQ-style AWQ with
``zero_point: true`` (what our awq/rtn write) has a fitted zero per group: it **cannot** be represented, so
``targets.py`` admits awq only with symmetric weights and the converter refuses a folder whose zeros are not all 8.
Our AWQ scales are folded into the preceding norms/linears, so ``pre_quant_scale`` is written as ones (exact).

**FP8**: ``quant_method: fp8`` with 128x128 ``weight_block_size`` is read from config.json as is (hard-linked, no
``hf_quant_config.json``); the block method takes ``weight_scale_inv`` or ``weight_scale`` [out/128, in/128]
float32. Per-channel FP8 needs ``hf_quant_config.json`` with ``FP8_PER_CHANNEL_PER_TOKEN``: ``FP8RowwiseLinearMethod``
has ``weight`` e4m3 [out, in] and ``weight_scale`` float32 [out] (read as ``weight_scale_inv`` or ``weight_scale``);
activations are quantized per token at run time. A per-tensor scalar scale maps to ``FP8`` (``FP8QDQLinearMethod``:
scalar ``weight_scale``; without ``input_scale`` the activation scale is dynamic per tensor).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import QuantizationError
from pipeline.quant.primitives import QuantizedWeight

HF_QUANT_CONFIG = "hf_quant_config.json"
W4A16_AWQ = "W4A16_AWQ"
FP8 = "FP8"
FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
W8A16 = "W8A16"
# compile.kv_cache -> kv_cache_quant_algo (TensorRT-LLM quantization/mode.py KV_CACHE_QUANT_ALGO_LIST: FP8, INT8, NVFP4)
KV_CACHE_QUANT_ALGO = {"fp8": "FP8"}
# The ModelOpt release whose export this layout mirrors (informational: TensorRT-LLM reads only producer.name).
MODELOPT_VERSION = "0.47.0"
INT4_MIDPOINT = 8
# Linears TensorRT-LLM's PyTorch models load fused (``qkv_proj``, ``gate_up_proj``: its Llama-style weight mappers).
# Their loader never reads ``pre_quant_scale`` (``load_weights_fused_*``), and ModelOpt folds theirs into the norm;
# every other quantized linear is loaded with ``load_weights_vanilla``, which indexes ``weights[0]["pre_quant_scale"]``.
FUSED_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})


def int4_signed_codes(qw: QuantizedWeight) -> torch.Tensor:
    """Signed int4 codes int8 [out, in] in [-8, 7] of a symmetric 4-bit weight (zero point 8 in every group).

    Raises for what ``W4A16_AWQ`` cannot hold exactly: other widths, a permuted ``g_idx``, or fitted zero points.
    """
    if qw.bits != 4:
        raise QuantizationError(
            f"TensorRT-LLM's W4A16_AWQ kernel holds 4-bit weights, but this checkpoint has {qw.bits}-bit ones. "
            "Quantize with w_bits: 4 for the tensorrt-llm target."
        )
    if qw.g_idx is not None:
        raise QuantizationError(
            "TensorRT-LLM's W4A16_AWQ groups consecutive input columns, but this GPTQ weight has a permuted g_idx "
            "(act-order). Quantize with desc_act: false, or with static_groups: true."
        )
    if not bool((qw.zeros == INT4_MIDPOINT).all()):
        raise QuantizationError(
            "TensorRT-LLM's W4A16_AWQ kernel has no zero points (ModelOpt's int4_awq is symmetric: codes in [-8, 7], "
            "scale = amax / 7), but this checkpoint stores fitted zero points (AWQ with zero_point: true, or GPTQ with "
            "sym: false). Converting would mean re-quantizing. Quantize with method: gptq and w_sym: true for the "
            "tensorrt-llm target, or compile this checkpoint for vllm, sglang, turbomind or transformers."
        )
    return (qw.w_int - INT4_MIDPOINT).to(torch.int8)


def pack_int4_pairs(w_int4: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] in [-8, 7] -> uint8 [out/2, in]: row 2j in the low nibble, row 2j+1 in the high one
    (ModelOpt ``pack_int4_in_uint8``, 2-D case)."""
    out_features = w_int4.shape[0]
    if out_features % 2:
        raise QuantizationError(
            f"W4A16_AWQ packs two output rows per byte, but this linear has {out_features} outputs (odd). Leave it "
            "unquantized or use another target."
        )
    nib = w_int4.to(torch.int16) & 0x0F
    return (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8)


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_pairs`: uint8 [out/2, in] -> int8 [out, in] in [-8, 7]."""
    p = packed.view(torch.uint8).to(torch.int16)
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    rows = torch.stack((lo, hi), dim=1).reshape(-1, p.shape[1])
    return torch.where(rows >= 8, rows - 16, rows).to(torch.int8)


def w4a16_awq_tensors(qw: QuantizedWeight, dtype: torch.dtype, pre_quant_scale: bool = True) -> dict[str, torch.Tensor]:
    """``weight`` uint8 [out/2, in], ``weight_scale`` float32 [out, in/group] (as ModelOpt 0.47 writes it; the stored
    float16 values are exact in float32, and TensorRT-LLM casts to the model dtype on load) and, for a linear that
    TensorRT-LLM loads on its own, ``pre_quant_scale`` ones [in] in the model ``dtype`` (ones: our AWQ scales are
    folded into the weights; the model dtype: ModelOpt writes it so and W4A8_AWQ asserts it)."""
    codes = int4_signed_codes(qw)
    out = {"weight": pack_int4_pairs(codes), "weight_scale": qw.scales.float().contiguous()}
    if pre_quant_scale:
        out["pre_quant_scale"] = torch.ones(codes.shape[1], dtype=dtype)
    return out


def fp8_algo(weight_scale: torch.Tensor, out_features: int) -> str:
    """The TensorRT-LLM algorithm an FP8 weight scale of this shape means (per tensor or per output channel)."""
    if weight_scale.numel() == 1:
        return FP8
    if weight_scale.numel() == out_features and weight_scale.dim() <= 2 and weight_scale.shape[0] == out_features:
        return FP8_PER_CHANNEL_PER_TOKEN
    raise QuantizationError(
        f"an FP8 weight scale of shape {tuple(weight_scale.shape)} is neither per tensor nor per output channel "
        f"({out_features} outputs); 128x128 block scales are read from config.json as they are."
    )


def fp8_tensors(weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight`` e4m3 [out, in] as is and ``weight_scale`` float32: [out] per channel (``FP8RowwiseLinearMethod``
    copies into an [out] parameter) or a scalar per tensor (``FP8QDQLinearMethod``)."""
    if weight.dtype != torch.float8_e4m3fn:
        raise QuantizationError(f"an FP8 weight must be float8_e4m3fn, got {weight.dtype}.")
    algo = fp8_algo(weight_scale, weight.shape[0])
    scale = weight_scale.float().reshape(-1) if algo == FP8_PER_CHANNEL_PER_TOKEN else weight_scale.float().reshape(())
    return {"weight": weight, "weight_scale": scale}


def w8a16_tensors(w_int8: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """A W8A8 linear (``weight`` int8 [out, in], per-channel ``scale`` [out, 1]) as ``W8A16`` reads it: the same
    ``weight`` int8 [out, in] and ``weight_scale`` float32 [out] (the same values, flattened; ModelOpt 0.47 writes
    float32, TensorRT-LLM casts to the model dtype on load)."""
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise QuantizationError(
            f"W8A16 holds int8 weights [out, in], got {w_int8.dtype} of shape {tuple(w_int8.shape)}; this is not an "
            "8-bit integer checkpoint. Quantize with method: smoothquant for this conversion."
        )
    if scale.shape not in ((w_int8.shape[0], 1), (w_int8.shape[0],)) or not scale.is_floating_point():
        raise QuantizationError(
            f"W8A16 has one scale per output channel ({w_int8.shape[0]}), but this weight's scale is {scale.dtype} of "
            f"shape {tuple(scale.shape)}. Only per-channel W8A8 (SmoothQuant) converts exactly; requantize it."
        )
    return {"weight": w_int8.contiguous(), "weight_scale": scale.float().reshape(-1).contiguous()}


def w8a16_to_w8a8(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`w8a16_tensors`: ``(w_int8 [out, in], scale float32 [out, 1])``."""
    return tensors["weight"], tensors["weight_scale"].float().reshape(-1, 1)


def hf_quant_config(quant_algo: str, group_size: int | None = None, kv_cache: str = "auto",
                    exclude_modules: list[str] | None = None) -> dict[str, Any]:
    """``hf_quant_config.json`` in ModelOpt's legacy nested shape (what ``get_quant_config`` returns; both of
    TensorRT-LLM's readers accept it)."""
    quantization: dict[str, Any] = {"quant_algo": quant_algo, "kv_cache_quant_algo": KV_CACHE_QUANT_ALGO.get(kv_cache)}
    if quant_algo == W4A16_AWQ:
        quantization.update(group_size=group_size, has_zero_point=False, pre_quant_scale=True)
    quantization["exclude_modules"] = sorted(exclude_modules or [])
    return {"producer": {"name": "modelopt", "version": MODELOPT_VERSION}, "quantization": quantization}


def inline_quantization_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The flat form ModelOpt writes into ``config.json`` (``convert_hf_quant_config_format``)."""
    q = hf_config["quantization"]
    out: dict[str, Any] = {}
    if q["quant_algo"] == FP8:
        out["config_groups"] = {"group_0": {
            "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
            "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
            "targets": ["Linear"],
        }}
    out["ignore"] = list(q.get("exclude_modules") or [])
    out["quant_algo"] = q["quant_algo"]
    if q.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = hf_config["producer"]
    out["quant_method"] = "modelopt"
    return out
