"""Our integer weights as llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks, bit for bit (no re-quantization).

A GGUF block holds 32 consecutive input columns of one output row with one fp16 scale. Our group of
``group_size`` columns (a multiple of 32) therefore splits into ``group_size / 32`` blocks that repeat the
group's scale, and the integers are copied, not recomputed:

- **Q4_0** ``{fp16 d; uint8 qs[16]}`` (18 bytes), ``x = (q - 8) * d``: exactly our symmetric INT4
  (zero point 8, GPTQ ``sym=True``; also any AWQ tensor whose zeros are all 8), with ``d = s``.
- **Q4_1** ``{fp16 d; fp16 m; uint8 qs[16]}`` (20 bytes), ``x = q * d + m``: our asymmetric INT4
  ``w = (q - z) * s = q * s - z * s``, so ``d = s`` and ``m = -z * s``. ``d`` is exact (our scales are stored
  fp16); ``-z * s`` is exact in fp32 (a 4-bit integer times an 11-bit significand fits in 24 bits) but needs up
  to 15 significant bits, so storing it as fp16 rounds it: ``|m16 - (-z s)| <= 2**-11 * |z s|`` (half an
  fp16 ulp, unit roundoff 2**-11) while ``|z s| >= 2**-14`` (fp16 normal range), else ``<= 2**-25`` (half the
  subnormal spacing 2**-24). As ``z <= 15`` that is at most ``15 * 2**-11 * s ~= 0.0073 s``: under 1% of one
  quantization step, one constant offset per block. :func:`q4_1_offset_error` gives the exact figure.
- **Q8_0** ``{fp16 d; int8 qs[32]}`` (34 bytes), ``x = q * d``: our symmetric INT8 (GPTQ 8-bit ``sym``, codes
  ``q - 128``; exact) and lmdeploy W8A8 (int8 weight, fp32 per-channel scale repeated per block; ``d`` is the
  scale rounded to fp16: relative error ``<= 2**-11`` per row, :func:`q8_0_scale_error` gives the figure).

Nibble order within a 4-bit block: byte ``j`` (0..15) holds element ``j`` in its low nibble and element
``j + 16`` in its high nibble. Sources checked:

- llama.cpp ``ggml/src/ggml-common.h`` (``block_q4_0``, ``block_q4_1``, ``block_q8_0``; ``QK4_0 = QK4_1 = QK8_0 =
  32``) and ``ggml/src/ggml-quants.c`` ``dequantize_row_q4_0`` (``x0 = (qs[j] & 0x0F) - 8; x1 = (qs[j] >> 4) - 8;
  y[j] = x0*d; y[j + qk/2] = x1*d``), ``dequantize_row_q4_1`` (``y = x*d + m``), ``dequantize_row_q8_0``.
- the ``gguf`` package 0.19.0 ``gguf/quants.py`` (``Q4_0.dequantize_blocks``: ``d, qs = hsplit(blocks, [2])``,
  nibbles shifted by ``[0, 4]``, minus 8; ``Q4_1``: ``d, m, qs``; ``Q8_0``: ``d, int8 x``) and
  ``gguf/constants.py`` ``GGML_QUANT_SIZES`` (32, 18) / (32, 20) / (32, 34); the tests dequantize our blocks
  with ``gguf.quants.dequantize`` and compare with :meth:`QuantizedWeight.dequantize`.

Functions here are pure (torch in, numpy ``uint8 [out, in / 32 * block_bytes]`` out: the byte shape that
``gguf.GGUFWriter.add_tensor(..., raw_dtype=...)`` turns back into the element shape [out, in]).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import QuantizationError
from pipeline.quant.primitives import QuantizedWeight

QK = 32  # elements per block (ggml-common.h QK4_0 = QK4_1 = QK8_0)
BLOCK_BYTES = {"Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2, "Q8_0": 2 + QK}
FP16_UNIT_ROUNDOFF = 2.0**-11  # half an ulp of a normal fp16, relative
FP16_MIN_NORMAL = 2.0**-14
FP16_HALF_SUBNORMAL_STEP = 2.0**-25


def _check_blocks(n_in: int, group_size: int) -> int:
    """Blocks per group; raises unless 32 divides the group size (and the input width)."""
    if group_size <= 0 or group_size % QK or n_in % group_size:
        raise QuantizationError(
            f"GGUF's Q4_0/Q4_1/Q8_0 blocks hold {QK} consecutive input columns with one scale, so a group must "
            f"be a multiple of {QK} columns that divides the input width; this weight has group size {group_size} "
            f"and input width {n_in}. Quantize with w_group_size 32, 64, 128 (or per channel on widths that are "
            "multiples of 32), or compile for another target."
        )
    return group_size // QK


def _per_block(qparam: torch.Tensor, group_size: int, n_in: int) -> torch.Tensor:
    """[out, groups] -> [out, in / 32]: each group's value repeated for each of its blocks."""
    return qparam.repeat_interleave(_check_blocks(n_in, group_size), dim=1)


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """[out, nb] float -> uint8 [out, nb, 2] (little-endian fp16)."""
    return x.to(torch.float16).contiguous().cpu().numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(codes: torch.Tensor) -> np.ndarray:
    """[out, in] integers in [0, 16) -> uint8 [out, in / 32, 16]: byte j = element j | element j + 16 << 4."""
    out, n_in = codes.shape
    c = codes.to(torch.int64).cpu().numpy().astype(np.uint8).reshape(out, n_in // QK, 2, QK // 2)
    return c[:, :, 0, :] | (c[:, :, 1, :] << np.uint8(4))


def _exact_fp16(scales: torch.Tensor, what: str) -> torch.Tensor:
    """The scales as fp16, refusing any that fp16 cannot hold exactly (ours are stored fp16: they can)."""
    s16 = scales.to(torch.float16)
    if not torch.isfinite(s16).all() or not torch.equal(s16.float(), scales.float()):
        raise QuantizationError(
            f"{what}: a group scale is not exactly a float16 number, but GGUF blocks store their scale as float16, "
            "so copying it would change the weights. AWQ and GPTQ checkpoints store fp16 scales; this one was "
            "written some other way. Re-quantize with quantship (it stores fp16 scales)."
        )
    return s16


def _check_codes(qw: QuantizedWeight) -> None:
    if qw.g_idx is not None:
        raise QuantizationError(
            "GGUF blocks are consecutive input columns, but this weight uses a permuted group order (GPTQ "
            "act-order with a permuted g_idx). Quantize with desc_act: false or static_groups: true."
        )
    hi = 2**qw.bits - 1
    for name, t in (("code", qw.w_int), ("zero point", qw.zeros)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > hi):
            raise QuantizationError(f"a {qw.bits}-bit {name} lies outside [0, {hi}]: the checkpoint is damaged.")


def q4_0_blocks(qw: QuantizedWeight, what: str = "weight") -> np.ndarray:
    """Symmetric INT4 (every zero point 8) as Q4_0 blocks: ``d = s``, nibbles = our codes (exact)."""
    _check_codes(qw)
    if qw.bits != 4 or not bool((qw.zeros == 8).all()):
        raise QuantizationError(f"{what}: Q4_0 holds symmetric 4-bit weights (zero point 8); use q4_1_blocks.")
    n_out, n_in = qw.w_int.shape
    d = _per_block(_exact_fp16(qw.scales, what), qw.group_size, n_in)
    return np.concatenate([_fp16_bytes(d), _nibbles(qw.w_int)], axis=-1).reshape(n_out, -1)


def q4_1_blocks(qw: QuantizedWeight, what: str = "weight") -> np.ndarray:
    """Asymmetric INT4 as Q4_1 blocks: ``d = s``, ``m = fp16(-z * s)`` (see :func:`q4_1_offset_error`)."""
    _check_codes(qw)
    if qw.bits != 4:
        raise QuantizationError(f"{what}: Q4_1 holds 4-bit weights, not {qw.bits}-bit.")
    n_out, n_in = qw.w_int.shape
    s16 = _exact_fp16(qw.scales, what)
    m = -(qw.zeros.float() * s16.float())  # exact in fp32: |z| < 2**4 times an 11-bit significand
    d = _per_block(s16, qw.group_size, n_in)
    m = _per_block(m, qw.group_size, n_in)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(qw.w_int)], axis=-1).reshape(n_out, -1)


def q8_0_blocks(w_int8: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                what: str = "weight") -> np.ndarray:
    """Symmetric INT8 ``w = q * scale`` as Q8_0 blocks: ``d = fp16(scale)``, ``qs = q``.

    ``scale`` is per channel ([out] or [out, 1], fp32 as lmdeploy W8A8 stores it: rounded to fp16 here, see
    :func:`q8_0_scale_error`) or per group ([out, in / group_size], fp16-exact as GPTQ stores it).
    """
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise QuantizationError(f"{what}: Q8_0 needs a 2-D int8 weight, got {w_int8.dtype} {tuple(w_int8.shape)}.")
    n_out, n_in = w_int8.shape
    scale = scale.reshape(n_out, -1).float()
    gs = group_size or (n_in // scale.shape[1])
    d16 = scale.to(torch.float16)
    if not torch.isfinite(d16).all():
        raise QuantizationError(f"{what}: an int8 scale overflows float16 (> 65504); the weights are corrupt.")
    d = _per_block(d16, gs, n_in)
    qs = w_int8.cpu().numpy().view(np.uint8).reshape(n_out, n_in // QK, QK)
    return np.concatenate([_fp16_bytes(d), qs], axis=-1).reshape(n_out, -1)


def int8_codes(qw: QuantizedWeight, what: str = "weight") -> torch.Tensor:
    """Symmetric 8-bit codes (zero point 128, GPTQ ``sym``) as signed int8 ``q - 128`` for Q8_0."""
    _check_codes(qw)
    if qw.bits != 8 or not bool((qw.zeros == 128).all()):
        raise QuantizationError(
            f"{what}: GGUF's 8-bit block (Q8_0) is symmetric (x = q * d), but this 8-bit weight has zero points "
            "other than 128 (asymmetric). Quantize 8-bit GPTQ with w_sym: true, or use 4 bits (Q4_1 keeps a zero)."
        )
    return (qw.w_int - 128).to(torch.int8)


def blocks_for(qw: QuantizedWeight, what: str = "weight") -> tuple[str, np.ndarray]:
    """``(ggml type name, block bytes)`` for one unpacked linear: Q4_0 when every zero is 8, else Q4_1; Q8_0
    for symmetric 8-bit."""
    if qw.bits == 4:
        if bool((qw.zeros == 8).all()):
            return "Q4_0", q4_0_blocks(qw, what)
        return "Q4_1", q4_1_blocks(qw, what)
    if qw.bits == 8:
        return "Q8_0", q8_0_blocks(int8_codes(qw, what), qw.scales, qw.group_size, what)
    raise QuantizationError(
        f"{what}: {qw.bits}-bit weights have no GGUF block type that holds them exactly (Q4_0/Q4_1 are 4-bit, "
        "Q8_0 is 8-bit). Quantize with w_bits 4 or 8."
    )


def q4_1_offset_error(qw: QuantizedWeight) -> dict[str, float]:
    """How far Q4_1's fp16 ``m`` is from our exact ``-z * s``: the measured maximum, and the bound it obeys.

    ``max_abs``: max |m16 - (-z s)| over all groups; ``bound``: max of the per-group bound (2**-11 |z s| for
    normal fp16, 2**-25 below 2**-14); ``max_in_steps``: max |m16 - (-z s)| / s (fraction of one quantization
    step). Everything in float64, where ``-z * s`` is exact.
    """
    s = qw.scales.to(torch.float16).double()
    exact = -(qw.zeros.double() * s)
    err = (exact.to(torch.float16).double() - exact).abs()
    bound = torch.where(exact.abs() >= FP16_MIN_NORMAL, exact.abs() * FP16_UNIT_ROUNDOFF,
                        torch.full_like(exact, FP16_HALF_SUBNORMAL_STEP))
    steps = torch.where(s > 0, err / s, torch.zeros_like(err))
    return {"max_abs": float(err.max()), "bound": float(bound.max()), "max_in_steps": float(steps.max()),
            "within_bound": bool((err <= bound).all())}


def q8_0_scale_error(scale: torch.Tensor) -> dict[str, float]:
    """Relative error of fp16 ``d`` against an fp32 per-channel scale: max |d16 - s| / s (<= 2**-11 for normal
    fp16 scales; larger only for scales below 2**-14, i.e. rows whose |w| max is below ~0.002)."""
    s = scale.double().reshape(-1)
    rel = ((s.to(torch.float16).double() - s).abs() / s.clamp_min(1e-30))
    return {"max_rel": float(rel.max()), "bound_normal": FP16_UNIT_ROUNDOFF,
            "subnormal_rows": int((s < FP16_MIN_NORMAL).sum())}


def permute_rows_for_rope(rows: np.ndarray | torch.Tensor, n_head: int):
    """llama.cpp's Q/K row order: within each head, interleave the two rotary halves (the inverse of the HF
    checkpoint's permutation), as ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` does to ``q_proj`` (with
    ``n_head``) and ``k_proj`` (with ``n_head_kv``). Rows are output channels, so it applies unchanged to block
    rows (codes, scales and zeros move together)."""
    n = rows.shape[0]
    if n % (2 * n_head):
        raise QuantizationError(f"{n} rows cannot be split into {n_head} heads of two rotary halves.")
    shape = rows.shape
    return rows.reshape(n_head, 2, n // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
