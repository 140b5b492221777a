"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel layout) that TurboMind, vLLM, TensorRT-LLM and
transformers (through GPTQModel) load: per quantized linear ``<name>.qweight``, ``.qzeros``, ``.scales``,
``.g_idx``, and ``quantization_config`` with ``quant_method: gptq`` in ``config.json``.

Layout, with ``pf = 32 // bits`` codes per int32 word (8 for 4 bits, 4 for 8 bits), code ``j`` of a word in
bits ``[bits·j, bits·(j+1))`` (lowest bits first):

- ``qweight`` int32 [in / pf, out]: packed along the INPUT dim; word ``(r, n)`` holds ``w_int[n, r·pf + j]``.
- ``qzeros``  int32 [in / group, out / pf]: packed along the OUTPUT dim; word ``(g, c)`` holds the zero of
  output ``c·pf + j``. Format ``gptq`` ("v1", what every loader reads by default) stores ``zero - 1``;
  ``gptq_v2`` (GPTQModel only) stores the zero itself.
- ``scales``  fp16 [in / group, out];  ``g_idx`` int32 [in]: the group of each input column.

Verified against the loaders:
- lmdeploy ``lmdeploy/turbomind/weight_format.py`` (commit 1263d5cd, 2026-08) ``GPTQFormat.normalize``: it
  unpacks nibbles lowest-first (``_get_u4_slices``), stacks them along dim 1 for ``qweight`` ([K//8, 8, N] ->
  [K, N]) and along the last dim for ``qzeros`` ([K//g, N//8, 8] -> [K//g, N]) and adds ``+ 1`` to the zeros.
  It never reads ``g_idx``.
- vLLM ``model_executor/layers/quantization/gptq.py``: ``qweight`` [in // pack_factor, out] (``packed_dim=0``),
  ``qzeros`` [groups, out // pack_factor] (``packed_dim=1``), ``scales`` [groups, out], ``g_idx`` [in];
  ``use_v2_format = checkpoint_format == "gptq_v2"``, otherwise the kernels add 1 to the zeros (the Ascend
  kernel does ``if not self.use_v2_format: layer.qzeros += 1``). Act-order: ``torch.argsort(g_idx)``.
- GPTQModel ``gptqmodel/utils/model.py`` ``convert_gptq_v1_to_v2_format_module``: adds ``0x11111111``
  (4-bit) / ``0x01010101`` (8-bit) to the packed qzeros on load of a ``gptq`` (v1) checkpoint, i.e. +1 per
  code, and subtracts it on save; ``nn_modules/qlinear/__init__.py`` ``pack_block`` packs with shifts
  ``arange(pf) * bits`` along the input dim.
- TensorRT-LLM's GPTQ weight loaders (``load_weights_from_gptq``): ``zeros·scales = (-qzeros_nibble + 8 - 1)
  · scales`` with ``GPTQ_FLAG = 1``, the same ``zero = stored + 1``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.errors import QuantizationError
from pipeline.quant.primitives import QuantizedWeight

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PACKABLE_BITS = (2, 4, 8)  # 3 bits uses a 10-1-10-1-10 word layout in GPTQModel/vLLM; not written here
TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")

# What each engine accepts in a GPTQ checkpoint, as data (the recipe validator checks it before any work).
# A key absent from an entry means "any". group_size -1 means one group per output channel.
LOADER_CONSTRAINTS: dict[str, dict] = {
    "turbomind": {
        "bits": (4,),
        "group_size": (128,),
        "desc_act": (False,),
        "sym": (True,),
        "checkpoint_format": ("gptq",),
        # get_tm_config: `assert not quant_config.get('desc_act', False) and quant_config.get('sym', True)`;
        # _SUPPORTED_GROUP_SIZES = {'gptq': frozenset({128})}; GPTQFormat: weight_dtype TYPE_UINT4, zeros +1.
        "source": "lmdeploy/turbomind/converter.py (get_tm_config, _SUPPORTED_GROUP_SIZES) and "
        "lmdeploy/turbomind/weight_format.py (GPTQFormat), lmdeploy main @1263d5cd",
    },
    "vllm-gptq-marlin": {
        "bits": (4, 8),
        "group_size": (-1, 32, 64, 128),
        "sym": (True,),
        # is_gptq_marlin_compatible needs bits, group_size, sym and desc_act present in the config;
        # TYPE_MAP = {(4, True): uint4b8, (8, True): uint8b128}; MARLIN_SUPPORTED_GROUP_SIZES.
        "source": "vllm/model_executor/layers/quantization/gptq_marlin.py (is_gptq_marlin_compatible), "
        "utils/marlin_utils.py (MARLIN_SUPPORTED_GROUP_SIZES)",
    },
    "vllm-gptq": {
        "bits": (2, 3, 4, 8),
        "checkpoint_format": ("gptq", "gptq_v2"),
        "source": "vllm/model_executor/layers/quantization/gptq.py (GPTQConfig.__init__, from_config)",
    },
    "transformers": {
        "bits": (2, 3, 4, 8),
        "checkpoint_format": ("gptq", "gptq_v2"),
        "source": "transformers utils/quantization_config.py GPTQConfig.post_init; loads through gptqmodel",
    },
}


def loader_violations(loader: str, bits: int, group_size: int, desc_act: bool, sym: bool,
                      checkpoint_format: str = "gptq") -> list[str]:
    """The ways a GPTQ checkpoint with these settings breaks ``LOADER_CONSTRAINTS[loader]`` (empty: loadable)."""
    if loader not in LOADER_CONSTRAINTS:
        raise QuantizationError(
            f"No GPTQ loader constraints are known for {loader!r}; known: {', '.join(sorted(LOADER_CONSTRAINTS))}."
        )
    rules = LOADER_CONSTRAINTS[loader]
    given = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
             "checkpoint_format": checkpoint_format}
    return [f"{key}={value!r} (it accepts {', '.join(map(repr, rules[key]))})"
            for key, value in given.items() if key in rules and value not in rules[key]]


def _pack_factor(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise QuantizationError(
            f"The GPTQ checkpoint format is written here for {PACKABLE_BITS} bits, not {bits}: 3-bit GPTQ uses "
            f"an irregular word layout and other widths have no GPTQ layout. Choose w_bits 4 (or 8, or 2)."
        )
    return 32 // bits


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [R, C] (values < 2**bits) along dim 0 into int32 [R / pf, C], code j at bits·j."""
    pf = 32 // bits
    shifts = (torch.arange(pf, device=codes.device, dtype=torch.int64) * bits).view(1, pf, 1)
    words = (codes.to(torch.int64).reshape(-1, pf, codes.shape[1]) << shifts).sum(dim=1)
    # Words are unsigned 32-bit patterns; store them as the int32 with the same bits.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: int32 [R / pf, C] -> int32 codes [R, C]."""
    pf = 32 // bits
    shifts = (torch.arange(pf, device=words.device, dtype=torch.int32) * bits).view(1, pf, 1)
    codes = (words.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)  # arithmetic shift, then mask
    return codes.reshape(-1, words.shape[1])


def pack(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear: ``{"qweight", "qzeros", "scales", "g_idx"}``, on ``qw``'s device.

    ``checkpoint_format="gptq"`` (v1) stores ``zero - 1``, so a zero point of 0 (asymmetric groups that are
    all non-negative) cannot be stored: that raises, pointing at ``sym=True`` or ``gptq_v2``.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise QuantizationError(
            f"Unknown GPTQ checkpoint format {checkpoint_format!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}."
        )
    bits = qw.bits
    pf = _pack_factor(bits)
    n_out, n_in = qw.w_int.shape
    if n_in % pf or n_out % pf:
        raise QuantizationError(
            f"A {n_out}x{n_in} linear cannot be packed as {bits}-bit GPTQ: both its input and output widths must "
            f"be multiples of {pf}. Leave this layer unquantized."
        )
    zeros = qw.zeros.to(torch.int32)
    if checkpoint_format == "gptq":
        # AutoGPTQ v1 convention: stored = zero - 1; every loader adds 1 back (see the module docstring).
        if bool((zeros <= 0).any()):
            raise QuantizationError(
                "This layer has zero points equal to 0, which the classic GPTQ format (it stores zero - 1, "
                "and loaders add 1) cannot represent. Quantize with sym: true, or write checkpoint_format "
                "gptq_v2 (read by vLLM and GPTQModel, not by TurboMind)."
            )
        zeros = zeros - 1
    scales_fp16 = qw.scales.t().contiguous().to(torch.float16)
    if not bool(torch.isfinite(scales_fp16).all()):
        raise QuantizationError("A GPTQ scale overflows float16; the layer's weights are out of range.")
    if qw.g_idx is not None:
        g_idx = qw.g_idx.to(torch.int32)
    else:
        g_idx = (torch.arange(n_in, device=qw.w_int.device) // qw.group_size).to(torch.int32)
    return {
        "qweight": _pack_rows(qw.w_int.t().contiguous(), bits),  # [in, out] packed along in
        "qzeros": _pack_rows(zeros.contiguous(), bits).t().contiguous(),  # [out, G] packed along out -> [G, out/pf]
        "scales": scales_fp16,
        "g_idx": g_idx.contiguous(),
    }


def unpack(tensors: Mapping[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq") -> QuantizedWeight:
    """Inverse of :func:`pack`: integer codes, fp32 scales (the stored fp16 values) and zeros of one linear.

    ``g_idx`` is returned only when it is not the in-order ``i // group_size`` (i.e. for act-order).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise QuantizationError(
            f"Unknown GPTQ checkpoint format {checkpoint_format!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}."
        )
    _pack_factor(bits)
    w_int = _unpack_rows(tensors["qweight"], bits).t().contiguous()  # [out, in]
    zeros = _unpack_rows(tensors["qzeros"].t().contiguous(), bits).t().contiguous()  # [G, out]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    scales = tensors["scales"].float()
    n_groups, n_out = scales.shape
    n_in = w_int.shape[1]
    if w_int.shape[0] != n_out or zeros.shape != (n_groups, n_out) or n_in % n_groups:
        raise QuantizationError(
            f"Inconsistent GPTQ tensors: qweight unpacks to {tuple(w_int.shape)} [out, in], scales are "
            f"{tuple(scales.shape)} [groups, out], qzeros unpack to {tuple(zeros.shape)}. The checkpoint is "
            f"damaged or was written with another bit width than {bits}."
        )
    group_size = n_in // n_groups
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
        in_order = torch.arange(n_in, device=g_idx.device, dtype=torch.int32) // group_size
        if torch.equal(g_idx, in_order):
            g_idx = None
    return QuantizedWeight(
        w_int=w_int,
        scales=scales.t().contiguous(),
        zeros=zeros.t().contiguous(),
        bits=bits,
        group_size=group_size,
        g_idx=g_idx,
    )


def declared_desc_act(desc_act: bool, static_groups: bool) -> bool:
    """The ``desc_act`` a checkpoint declares to loaders: true only when its ``g_idx`` is permuted.

    Static act-order (``desc_act`` with ``static_groups``, llm-compressor's ``actorder: static``) quantizes the
    columns in act-order but fixes every group on the original column order, so ``g_idx`` is ``i // group_size``
    (``pipeline/quant/gptq.py`` ``_finish`` returns none and :func:`pack` writes the in-order one). For loaders
    ``desc_act`` only means "the groups are permuted, follow ``g_idx``": TurboMind asserts it is false
    (``lmdeploy/turbomind/converter.py`` ``get_tm_config``) and never reads ``g_idx``; vLLM's gptq and
    gptq_marlin (``gptq.py`` / ``gptq_marlin.py``) and GPTQModel / transformers take the act-order path
    (``argsort(g_idx)``, an extra permutation) only when it is true. With an in-order ``g_idx`` both paths compute
    the same weights, so declaring false is exact and loads everywhere; the truth goes under ``meta``.
    """
    return desc_act and not static_groups


def quantization_config(
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    *,
    checkpoint_format: str = "gptq",
    damp_percent: float = 0.01,
    static_groups: bool = False,
    true_sequential: bool = True,
    lm_head: bool = False,
    quantizer: str = "quantship",
) -> dict:
    """``config.json``'s ``quantization_config`` for a GPTQ checkpoint, with the fields GPTQModel writes.

    ``desc_act`` and ``static_groups`` are the quantizer's settings; the top-level ``desc_act`` is
    :func:`declared_desc_act` (false for static act-order, whose ``g_idx`` is in order), and ``meta`` records
    both settings as run (``act_order``, ``static_groups``).

    GPTQModel (``gptqmodel/quantization/config.py`` ``to_dict`` + ``GPTQConfig._update_output_payload``,
    ``models/writer.py``) writes ``bits, group_size, desc_act, sym, lm_head, method, quant_method, format,
    checkpoint_format, pack_dtype`` at the top and the settings that do not affect inference (``damp_percent,
    static_groups, true_sequential, mse, act_group_aware, quantizer``) under ``meta``; its reader lifts those
    back from ``meta``. vLLM reads ``bits, group_size, desc_act, lm_head, checkpoint_format`` (gptq) and ``sym``
    (gptq_marlin); lmdeploy reads ``quant_method, group_size, desc_act, sym``; transformers' GPTQConfig reads
    ``format`` and ``act_group_aware`` (default True), so ``act_group_aware: false`` is written at the top too.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise QuantizationError(
            f"Unknown GPTQ checkpoint format {checkpoint_format!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}."
        )
    _pack_factor(bits)
    return {
        "quant_method": "gptq",
        "method": "gptq",
        "bits": bits,
        "group_size": group_size,
        # What loaders read: true only for a permuted g_idx (see declared_desc_act for the loaders' code).
        "desc_act": declared_desc_act(desc_act, static_groups),
        "sym": sym,
        "lm_head": lm_head,
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "act_group_aware": False,
        "meta": {
            "quantizer": [_quantizer_version(quantizer)],
            "damp_percent": damp_percent,
            "act_order": desc_act,  # the quantizer's column order (the top-level desc_act is what loaders need)
            "static_groups": static_groups,
            "true_sequential": true_sequential,
            "mse": 0.0,
            "act_group_aware": False,
        },
    }


def _quantizer_version(name: str) -> str:
    """``name:version`` as GPTQModel's ``meta.quantizer`` entries are written."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name}:{version(name)}"
    except PackageNotFoundError:
        return f"{name}:0+unknown"
