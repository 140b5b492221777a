"""The AutoAWQ "GEMM" checkpoint layout for 4-bit group-wise weights (W4A16), read by TurboMind, vLLM, transformers.

Per quantized linear ``<name>`` the folder holds (checked against the loaders below):

- ``<name>.qweight`` int32 [in, out / 8]: the integer weight *transposed* to [in, out], then 8 neighbouring output
  columns per int32. Nibble slot ``i`` (bits 4i..4i+3) holds column ``8c + AWQ_ORDER[i]`` with
  ``AWQ_ORDER = 0,2,4,6,1,3,5,7``.
- ``<name>.qzeros`` int32 [in / group, out / 8]: the integer zero points, packed the same way (stored as is, no -1).
- ``<name>.scales`` fp16 [in / group, out].
- ``<name>.bias`` (optional) fp16 [out].

Dequantization is ``w[k, n] = (q[k, n] - z[k // group, n]) * s[k // group, n]``, the convention of
``pipeline.quant.primitives`` (transposed).

Sources checked:
- AutoAWQ ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM.__init__`` buffer shapes/dtypes; ``from_linear`` packs with
  ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``, ``qweight[:, col] |= intweight[:, col*8 + order_map[i]] << (4*i)``, the
  same for zeros, ``scales.half()``, ``bias.half()``; only ``w_bit == 4``).
- AutoAWQ ``awq/utils/packing_utils.py`` (``unpack_awq`` shifts by 0,4,..,28 then ``reverse_awq_order`` with
  ``AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]``; ``dequantize_gemm`` = ``(iweight - izeros) * scales``).
- lmdeploy ``lmdeploy/turbomind/weight_format.py`` (``AWQFormat``: suffixes ``.qweight/.scales/.qzeros/.bias``,
  ``qweight`` int32 [K, N//8] and ``scales.shape[-1] == qweight.shape[-1] * 8``; ``_unpack_awq_gemm`` takes the 8
  nibbles LSB first and reorders them with ``[0, 4, 1, 5, 2, 6, 3, 7]``; zeros are *not* offset by one, unlike GPTQ)
  and ``lmdeploy/turbomind/converter.py`` (``get_tm_config``: ``quant_method == 'awq'`` requires
  ``version == 'gemm'``; ``_SUPPORTED_GROUP_SIZES['awq'] == {128}``).
- vLLM ``vllm/model_executor/layers/quantization/awq.py`` (``AWQConfig.from_config`` reads ``bits``/``w_bit``,
  ``group_size``/``q_group_size``, ``zero_point``, optional ``modules_to_not_convert``; ``bits != 4`` is rejected;
  ``qweight`` [in, out // 8], ``qzeros`` [in // group, out // 8], ``scales`` [in // group, out]) and
  ``awq_marlin.py`` (``is_awq_marlin_compatible`` needs ``bits``, ``group_size``, ``zero_point`` present) and
  ``awq_triton.py`` (``reverse_awq_order_tensor`` = [0, 4, 1, 5, 2, 6, 3, 7]).
- transformers ``utils/quantization_config.py`` (``AwqConfig``: ``version`` is the legacy name of ``format``, lower
  case ``gemm``; ``modules_to_not_convert`` may be null).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import QuantizationError
from pipeline.quant.primitives import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble slot i holds logical column AWQ_ORDER[i] (AutoAWQ gemm.py order_map)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column j sits in nibble slot AWQ_REVERSE_ORDER[j]
PACK = 8  # 4-bit values per int32
BITS = 4
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales")


def check_bits(bits: int) -> None:
    """AWQ GEMM is 4-bit only (AutoAWQ ``WQLinear_GEMM``, vLLM ``AWQConfig``); anything else is a QuantizationError."""
    if bits != BITS:
        raise QuantizationError(
            f"the AWQ GEMM checkpoint format stores 4-bit weights only, but {bits}-bit was asked for: AutoAWQ's "
            "WQLinear_GEMM, vLLM's AWQConfig and TurboMind all reject other widths. Use w_bits: 4, or a method that "
            "writes another format (gptq for other bit widths, smoothquant for 8-bit)."
        )


def quantization_config(bits: int = 4, group_size: int = 128, modules_to_not_convert: list[str] | None = None,
                         sym: bool = False) -> dict:
    """The ``quantization_config`` block of ``config.json`` for an AWQ GEMM folder.

    Same keys as AutoAWQ's ``AwqConfig.to_transformers_dict`` (``awq/models/_config.py``); vLLM needs ``bits``,
    ``group_size`` and ``zero_point`` present to pick its Marlin kernel, TurboMind needs ``version: gemm``.
    """
    check_bits(bits)
    config = {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert,
    }
    if sym:  # symmetric grid: every zero point is 2**(bits-1); the layout is unchanged, readers ignore ``meta``
        config["meta"] = {"sym": True}
    return config


def _pack_rows(v: torch.Tensor) -> torch.Tensor:
    """[rows, cols] integers in [0, 16) -> int32 [rows, cols / 8] in the AWQ interleaved nibble order."""
    rows, cols = v.shape
    v = v.to(torch.int64).reshape(rows, cols // PACK, PACK)
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int64, device=v.device)
    for slot, column in enumerate(AWQ_ORDER):
        packed |= v[..., column] << (BITS * slot)
    # Values up to 2**32 - 1 in int64; reinterpret as two's-complement int32 explicitly (no reliance on cast wrap).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_rows(p: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] -> int32 [rows, cols], inverse of ``_pack_rows``."""
    p = p.to(torch.int64) & 0xFFFFFFFF
    slots = [(p >> (BITS * slot)) & 0xF for slot in range(PACK)]  # slot i, LSB first
    columns = [slots[AWQ_REVERSE_ORDER[j]] for j in range(PACK)]
    return torch.stack(columns, dim=-1).reshape(p.shape[0], -1).to(torch.int32)


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight`` int32 [in, out/8], ``qzeros`` int32 [in/group, out/8], ``scales`` fp16 [in/group, out]."""
    check_bits(qw.bits)
    out_features, in_features = qw.w_int.shape
    if qw.g_idx is not None and not torch.equal(
        qw.g_idx.long().cpu(), torch.arange(in_features) // qw.group_size
    ):
        raise QuantizationError(
            "the AWQ GEMM format has no g_idx: its groups are consecutive input columns, but this weight uses a "
            "permuted group order (GPTQ act-order). Write it in the GPTQ format, or quantize without act-order."
        )
    if out_features % PACK:
        raise QuantizationError(
            f"the AWQ GEMM format packs 8 output columns per int32, but this weight has {out_features} outputs, not "
            "a multiple of 8. Leave this linear unquantized (modules_to_not_convert) or use another format."
        )
    if in_features % qw.group_size:
        raise QuantizationError(
            f"group size {qw.group_size} does not divide the input width {in_features}. Choose a group size that "
            "divides every linear's input width."
        )
    for name, t in (("weight", qw.w_int), ("zero point", qw.zeros)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 15):
            raise QuantizationError(f"a 4-bit {name} lies outside [0, 15]: the quantizer produced an invalid code.")
    scales_fp16 = qw.scales.t().contiguous().to(torch.float16)
    if not torch.isfinite(scales_fp16).all():
        raise QuantizationError(
            "a group scale does not fit float16 (|s| > 65504) and AWQ stores scales in float16: the weight has "
            "values around 1e6. Check the source checkpoint for corrupt or unnormalised weights."
        )
    return {
        "qweight": _pack_rows(qw.w_int.t().contiguous()),
        "qzeros": _pack_rows(qw.zeros.t().contiguous()),
        "scales": scales_fp16,
    }


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> QuantizedWeight:
    """The bit-exact inverse of ``pack``: integers [out, in], scales float32 [out, in/group], zeros int32."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise QuantizationError(
            f"AWQ GEMM qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}: this is not an AWQ GEMM "
            "checkpoint (GPTQ and compressed-tensors use other layouts)."
        )
    in_features, out_packed = qweight.shape
    if group_size == -1:  # AutoAWQ's "one group over the whole input" (gemm.py: group_size != -1 else in_features)
        group_size = in_features
    groups = in_features // group_size if group_size > 0 else 0
    if (
        group_size <= 0
        or in_features % group_size
        or tuple(qzeros.shape) != (groups, out_packed)
        or tuple(scales.shape) != (groups, out_packed * PACK)
    ):
        raise QuantizationError(
            f"AWQ GEMM tensor shapes disagree with group size {group_size}: qweight {tuple(qweight.shape)}, qzeros "
            f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}; expected qzeros [in/group, out/8] and scales "
            "[in/group, out]. Check quantization_config.group_size in config.json."
        )
    return QuantizedWeight(
        w_int=_unpack_rows(qweight).t().contiguous(),
        scales=scales.float().t().contiguous(),
        zeros=_unpack_rows(qzeros).t().contiguous(),
        bits=BITS,
        group_size=group_size,
    )


def read_quantization_config(config: dict[str, Any]) -> tuple[int, int]:
    """``(bits, group_size)`` from an AWQ ``quantization_config``; raises for what the GEMM layout cannot be."""
    version = str(config.get("version", config.get("format", "gemm"))).lower()
    if version != "gemm":
        raise QuantizationError(
            f"AWQ version {version!r} is not the GEMM layout this runtime reads (GEMV, Marlin and exllama AWQ "
            "checkpoints pack their nibbles differently). Re-export the model with version: gemm."
        )
    bits = int(config.get("bits", config.get("w_bit", BITS)))
    check_bits(bits)
    if not config.get("zero_point", True):
        raise QuantizationError("AWQ with zero_point: false is not the GEMM layout (it stores no qzeros).")
    return bits, int(config.get("group_size", config.get("q_group_size", 128)))
