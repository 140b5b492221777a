"""compressed-tensors ``pack-quantized`` INT4 (W4A16): the layout, its config, and a lossless AWQ/GPTQ converter.

What compressed-tensors 0.20.1 writes (``compressors/pack_quantized/base.py`` ``PackedQuantizationCompressor``,
``compressors/pack_quantized/helpers.py`` ``pack_to_int32``), per linear:

- ``weight_packed`` int32 [out, ceil(in / 8)]: the signed codes ``q`` in [-8, 7] (``round(w / s) + zp``, clamped)
  stored as ``q + 8``, element ``i`` of a row at bits ``4 * (i % 8)`` of word ``i // 8`` (little-endian nibbles
  along the input dimension);
- ``weight_scale`` [out, in / group] in the model dtype (llm-compressor's observers keep the weight's dtype);
- ``weight_zero_point`` int32 [ceil(out / 8), in / group] for asymmetric weights only: the signed zero points
  ``zp + 8`` packed the same way along the *output* dimension (``pack_to_int32(zp, 4, packed_dim=0)``); dropped
  for symmetric weights (``_remove_symmetric_zp``);
- ``weight_shape`` int64 [2]: ``torch.tensor(weight.shape)``.

Dequantization is ``(q - zp) * s`` (``lifecycle/forward_helpers.py`` ``_dequantize``). With quantship's unsigned
codes ``w_int = q + 8`` and zeros ``z = zp + 8`` (symmetric: ``z = 8``) that is ``(w_int - z) * s``: the nibbles on
disk are exactly AWQ's and GPTQ's integers, so a folder converts without re-quantizing.

Who reads it: vLLM (``CompressedTensorsWNA16``), SGLang, and lmdeploy TurboMind (4-bit int, group 32 or 128;
DESIGN.md §5). Permuted act-order (``actorder: group`` with ``weight_g_idx``) is not written here.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import QuantizationError
from pipeline.formats import compressed_tensors
from pipeline.quant.primitives import QuantizedWeight

log = logging.getLogger(__name__)

BITS = 4
PACK = 8  # nibbles per int32
OFFSET = 8  # signed int4 code + 8 = stored nibble
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def _pack_last(v: torch.Tensor) -> torch.Tensor:
    """[rows, n] values in [0, 16) -> int32 [rows, ceil(n / 8)], element i at bits 4 * (i % 8) of word i // 8."""
    rows, n = v.shape
    words = -(-n // PACK)
    v = torch.nn.functional.pad(v.to(torch.int64), (0, words * PACK - n)).reshape(rows, words, PACK)
    shifts = torch.arange(PACK, dtype=torch.int64) * BITS
    packed = (v << shifts).sum(dim=-1)  # < 2**32: the nibbles do not overlap
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack_last(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_last`: int32 [rows, words] -> int32 [rows, n] in [0, 16)."""
    shifts = torch.arange(PACK, dtype=torch.int64) * BITS
    v = (p.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return v.reshape(p.shape[0], -1)[:, :n].to(torch.int32)


def pack(qw: QuantizedWeight, sym: bool, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The ``pack-quantized`` tensors of one linear from unsigned 4-bit codes ``(w_int - z) * s``.

    ``sym``: write no zero point; every zero must then be 8 (signed zero point 0), as GPTQ's symmetric codes are.
    """
    if qw.bits != BITS:
        raise QuantizationError(f"pack-quantized INT4 holds 4-bit codes, not {qw.bits}-bit.")
    if qw.g_idx is not None:
        raise QuantizationError(
            "this linear has a permuted g_idx (GPTQ act-order without static groups); pack-quantized is written "
            "here for in-order groups only. Quantize with gptq.static_groups: true (the default)."
        )
    out_features, in_features = qw.w_int.shape
    if bool(((qw.w_int < 0) | (qw.w_int > 15)).any()) or bool(((qw.zeros < 0) | (qw.zeros > 15)).any()):
        raise QuantizationError("4-bit codes and zeros must lie in [0, 15]; the source checkpoint is damaged.")
    if sym and bool((qw.zeros != OFFSET).any()):
        raise QuantizationError(
            "the source declares symmetric weights but has zero points other than 8; write it as asymmetric "
            "(sym=False) or re-quantize."
        )
    tensors = {
        "weight_packed": _pack_last(qw.w_int),
        "weight_scale": qw.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not sym:
        tensors["weight_zero_point"] = _pack_last(qw.zeros.t().contiguous()).t().contiguous()
    return tensors


def unpack(tensors: dict[str, torch.Tensor], group_size: int | None = None) -> QuantizedWeight:
    """Unsigned codes, float32 scales and zeros (8 where symmetric) of one ``pack-quantized`` linear."""
    missing = [k for k in SUFFIXES if k not in tensors]
    if missing:
        raise QuantizationError(
            f"a pack-quantized linear lacks {missing} (it has {sorted(tensors)}); the checkpoint is incomplete or "
            "in another compressed-tensors format."
        )
    out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
    scales = tensors["weight_scale"].float()
    n_groups = scales.shape[1]
    if scales.shape[0] != out_features or in_features % n_groups:
        raise QuantizationError(
            f"weight_scale {tuple(scales.shape)} does not fit weight_shape [{out_features}, {in_features}]."
        )
    group = in_features // n_groups
    if group_size is not None and group_size != group:
        raise QuantizationError(f"weight_scale implies group size {group}, the config says {group_size}.")
    w_int = _unpack_last(tensors["weight_packed"], in_features)
    zp = tensors.get("weight_zero_point")
    if zp is None:
        zeros = torch.full((out_features, n_groups), OFFSET, dtype=torch.int32)
    else:
        zeros = _unpack_last(zp.t().contiguous(), out_features).t().contiguous()
    return QuantizedWeight(w_int=w_int, scales=scales, zeros=zeros, bits=BITS, group_size=group)


def quantization_config(group_size: int, sym: bool, ignore: list[str] | None = None) -> dict[str, Any]:
    """``quantization_config`` of a pack-quantized W4A16 folder (the package's ``W4A16`` / ``W4A16_ASYM`` presets)."""
    weights = {"num_bits": BITS, "type": "int", "symmetric": sym, "group_size": group_size, "strategy": "group",
               "dynamic": False}
    scheme = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
              "format": "pack-quantized"}
    return compressed_tensors.quantization_config("pack-quantized", scheme, ignore)


def read_quantization_config(qc: dict[str, Any]) -> tuple[int, bool]:
    """``(group_size, sym)`` of a pack-quantized INT4 config; raises for what this module does not read."""
    groups = list((qc.get("config_groups") or {}).values())
    w = (groups[0].get("weights") or {}) if groups else {}
    if qc.get("format") != "pack-quantized" or w.get("type", "int") != "int" or w.get("num_bits") != BITS:
        raise QuantizationError(
            f"not a pack-quantized 4-bit int config (format {qc.get('format')!r}, weights {w})."
        )
    if w.get("strategy") != "group" or not w.get("group_size"):
        raise QuantizationError(f"pack-quantized strategy {w.get('strategy')!r} is not read here; group is.")
    if w.get("actorder") == "group":
        raise QuantizationError("pack-quantized with actorder: group (weight_g_idx) is not read here.")
    return int(w["group_size"]), bool(w.get("symmetric", True))


# -- converter: OUR AWQ GEMM or GPTQ folder -> pack-quantized, same integers ---------------------------------------


def _source_reader(qc: dict[str, Any], src_dir: Path):
    """(unpack(tensors) -> QuantizedWeight, sym, group_size) for the source folder's format."""
    from pipeline.formats import awq_gemm, gptq

    method = qc.get("quant_method")
    if method == "awq":
        _, group_size = awq_gemm.read_quantization_config(qc)
        return (lambda t: awq_gemm.unpack(t["qweight"], t["qzeros"], t["scales"], group_size)), False, group_size
    if method == "gptq":
        bits, fmt = int(qc.get("bits", 4)), qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if bits != BITS:
            raise QuantizationError(f"{src_dir} holds {bits}-bit GPTQ weights; pack-quantized INT4 needs 4-bit.")
        return (lambda t: gptq.unpack(t, bits, fmt)), bool(qc.get("sym", True)), int(qc["group_size"])
    raise QuantizationError(
        f"{src_dir} is not an AWQ or GPTQ folder (quant_method {method!r}); convert_folder repacks those two only."
    )


def convert_folder(src_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Repack an AWQ GEMM or GPTQ (4-bit, in-order groups) model folder as compressed-tensors ``pack-quantized``.

    The integers, scales and zeros are carried over unchanged (no re-quantization); scales keep their stored
    dtype (fp16). Other tensors and the side files are copied. Returns ``{"source_format", "linears", "sym",
    "group_size"}``.
    """
    from pipeline.formats.checkpoint import CheckpointWriter, copy_side_files, open_checkpoint, read_config

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = read_config(src_dir)
    qc = config.get("quantization_config") or {}
    unpack_src, sym, group_size = _source_reader(qc, src_dir)
    writer = CheckpointWriter(out_dir)
    linears = 0
    with open_checkpoint(src_dir) as ck:
        by_module: dict[str, list[str]] = defaultdict(list)
        for name in ck.keys():
            by_module[name.rpartition(".")[0]].append(name)
        for module, names in by_module.items():
            tensors = {n.rpartition(".")[2]: ck.get(n) for n in names}
            if "qweight" not in tensors:
                for n in names:
                    writer.add(n, ck.get(n))
                continue
            qw = unpack_src(tensors)
            for suffix, t in pack(qw, sym, scale_dtype=tensors["scales"].dtype).items():
                writer.add(f"{module}.{suffix}", t)
            if "bias" in tensors:
                writer.add(f"{module}.bias", tensors["bias"])
            linears += 1
    writer.close()
    config["quantization_config"] = quantization_config(group_size, sym)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_side_files(src_dir, out_dir)
    log.info("repacked %d %s linears of %s as pack-quantized into %s", linears, qc["quant_method"], src_dir, out_dir)
    return {"source_format": qc["quant_method"], "linears": linears, "sym": sym, "group_size": group_size}
