"""ONNX Runtime's ``MatMulNBits`` weight layout (com.microsoft domain) for 4-bit block-wise weights, as pure
functions: our integer codes, scales and zero points in, the operator's ``B`` / ``scales`` / ``zero_points``
initializers out, and back.

``MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?)`` with attributes ``K`` (input width), ``N`` (output
width), ``bits``, ``block_size`` and ``accuracy_level`` computes ``A @ dequant(B)`` where, per output ``n`` and
input ``k`` in block ``b = k // block_size``, ``w[n, k] = (q[n, k] - zp[n, b]) * scale[n, b]`` (the convention of
``pipeline.quant.primitives``). Read from onnxruntime ``docs/ContribOperators.md`` (MatMulNBits, main
@8b8f7749) and ``docs/contrib_ops`` MatMulNBits page, and checked against onnxruntime-genai 0.18.0
``models/loaders/base.py`` (``pack_ort_format``, ``pack_zeros_ort_format``, ``pack_on_row_for_2_4_8_bits``), the
code that writes them for AWQ/GPTQ checkpoints:

- ``B`` uint8 [N, n_blocks, blob_size], ``n_blocks = ceil(K / block_size)``, ``blob_size = block_size * bits / 8``:
  row ``n`` holds the codes of output ``n`` along K, two per byte, the LOWER nibble first (code ``2j`` in bits
  0..3 of byte ``j``, code ``2j + 1`` in bits 4..7); the last block is padded with zeros when K is not a multiple.
- ``scales`` [N * n_blocks] (the activation's float type), row-major over (n, block).
- ``zero_points`` uint8 [N * ceil(n_blocks * bits / 8)]: per row the block zero points packed two per byte, lower
  nibble first, each row padded to a whole byte; absent means ``2 ** (bits - 1)`` (8 for 4 bits). (It may also be
  given in the scales' float type; onnxruntime-genai writes the packed uint8 form for integer zeros.)
- ``block_size`` is a power of two and at least 16 (the operator's schema), which limits the group sizes we export.
- ``g_idx`` (act-order) is optional; we export only in-order groups (the ``onnxruntime`` row in targets.py).
"""

from __future__ import annotations

import torch

from pipeline.errors import QuantizationError
from pipeline.quant.primitives import QuantizedWeight

BITS = 4
DEFAULT_ZERO_POINT = 2 ** (BITS - 1)  # what MatMulNBits assumes without a zero_points input


def check_block_size(block_size: int, where: str = "") -> None:
    """MatMulNBits' block size: a power of two, at least 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizationError(
            f"{where}group size {block_size} cannot be exported to ONNX Runtime: MatMulNBits needs a block size that "
            "is a power of two and at least 16 (16, 32, 64, 128, 256, ...). Quantize with such a w_group_size."
        )


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes in [0, 16) -> uint8 [rows, ceil(cols / 2)], lower nibble first (odd cols pad with 0)."""
    rows, cols = codes.shape
    c = codes.to(torch.uint8)
    if cols % 2:
        c = torch.cat([c, torch.zeros(rows, 1, dtype=torch.uint8, device=c.device)], dim=1)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``_pack_nibbles``: uint8 [rows, bytes] -> int32 [rows, cols]."""
    p = packed.to(torch.int32)
    return torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).reshape(p.shape[0], -1)[:, :cols]


def pack(qw: QuantizedWeight, scales_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """MatMulNBits initializers of one linear: ``{"B", "scales", "zero_points"}`` plus its attributes
    ``{"K", "N", "bits", "block_size"}`` (ints). ``qw`` holds codes [out, in] (see primitives.QuantizedWeight)."""
    if qw.bits != BITS:
        raise QuantizationError(f"only 4-bit weights are exported to MatMulNBits here, not {qw.bits}-bit.")
    if qw.g_idx is not None:
        raise QuantizationError(
            "this weight has a permuted g_idx (GPTQ act-order without static groups); the ONNX export keeps the "
            "groups in column order only. Quantize with desc_act false, or act-order with static_groups: true."
        )
    n, k = qw.w_int.shape
    block = qw.group_size
    check_block_size(block)
    n_blocks = -(-k // block)
    codes = qw.w_int
    if n_blocks * block != k:  # pad the last block along K with code 0 (its weights are multiplied by nothing)
        codes = torch.cat([codes, codes.new_zeros(n, n_blocks * block - k)], dim=1)
    for name, t in (("weight", qw.w_int), ("zero point", qw.zeros)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 15):
            raise QuantizationError(f"a 4-bit {name} lies outside [0, 15]: the checkpoint holds an invalid code.")
    if tuple(qw.scales.shape) != (n, n_blocks) or tuple(qw.zeros.shape) != (n, n_blocks):
        raise QuantizationError(
            f"scales {tuple(qw.scales.shape)} / zeros {tuple(qw.zeros.shape)} do not match {n} outputs x {n_blocks} "
            f"blocks of {block}: the checkpoint's group size disagrees with its tensors."
        )
    return {
        "B": _pack_nibbles(codes).reshape(n, n_blocks, block // 2).contiguous(),
        "scales": qw.scales.to(scales_dtype).reshape(-1).contiguous(),
        "zero_points": _pack_nibbles(qw.zeros).reshape(-1).contiguous(),
        "K": k, "N": n, "bits": BITS, "block_size": block,
    }


def unpack(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, k: int, n: int,
           block_size: int, bits: int = BITS) -> QuantizedWeight:
    """The codes [N, K], fp32 scales [N, n_blocks] and zeros of MatMulNBits initializers (bit-exact inverse of
    ``pack``). Float zero points are refused: they are not integer codes."""
    if bits != BITS:
        raise QuantizationError(f"only 4-bit MatMulNBits weights are read here, not {bits}-bit.")
    n_blocks = -(-k // block_size)
    if tuple(b.shape) != (n, n_blocks, block_size // 2) or scales.numel() != n * n_blocks:
        raise QuantizationError(
            f"MatMulNBits initializers disagree with K={k}, N={n}, block_size={block_size}: B {tuple(b.shape)}, "
            f"scales {tuple(scales.shape)}; expected B [{n}, {n_blocks}, {block_size // 2}], scales [{n * n_blocks}]."
        )
    w_int = _unpack_nibbles(b.reshape(n, -1), n_blocks * block_size)[:, :k].contiguous()
    if zero_points is None:
        zeros = torch.full((n, n_blocks), DEFAULT_ZERO_POINT, dtype=torch.int32)
    elif zero_points.dtype != torch.uint8:
        raise QuantizationError(
            f"MatMulNBits zero points of type {zero_points.dtype} are float offsets, not integer codes; they cannot "
            "be compared with a checkpoint's codes."
        )
    else:
        zeros = _unpack_nibbles(zero_points.reshape(n, -1), n_blocks).contiguous()
    return QuantizedWeight(w_int=w_int, scales=scales.float().reshape(n, n_blocks), zeros=zeros, bits=bits,
                           group_size=block_size)


def checkpoint_linear(fmt: str, tensors: dict[str, torch.Tensor], quant_config: dict) -> QuantizedWeight:
    """Our codes of one quantized linear of an AWQ GEMM or GPTQ checkpoint (``tensors``: its qweight, qzeros,
    scales, g_idx), through the formats' own unpackers."""
    if fmt == "awq":
        from pipeline.formats import awq_gemm

        _, group_size = awq_gemm.read_quantization_config(quant_config)
        return awq_gemm.unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size)
    if fmt == "gptq":
        from pipeline.formats import gptq

        return gptq.unpack(tensors, int(quant_config.get("bits", BITS)),
                           quant_config.get("checkpoint_format", quant_config.get("format", "gptq")))
    raise QuantizationError(f"format {fmt!r} has no int4 codes to export to MatMulNBits (awq or gptq only).")
