"""Runtime modules that run quantized linears, and the registry that builds them from a folder's tensors.

``Int4Linear`` computes ``y = x @ ((q - z) * s).T + b`` for group-wise 4-bit weights with PyTorch's own packed
int4 kernels (the "tinygemm" ops gpt-fast and torchao use):

- CPU: ``aten._convert_weight_to_int4pack_for_cpu(int32 [N, K] codes in [0, 16), innerKTiles)`` -> uint8
  [N, K / 2]; ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, scales_and_zeros [K / group, N, 2])``
  with ``x`` and ``scales_and_zeros`` of one dtype (float32, bfloat16 or float16), N % 16 == 0, group in
  {32, 64, 128, 256} (checked on torch 2.13; same op since 2.6, cf. torchao ``Int4CPULayout.from_plain``).
- CUDA (sm80+): ``aten._convert_weight_to_int4pack(uint8 [N, K / 2] with column 2j in the *high* nibble,
  innerKTiles)`` and ``aten._weight_int4pack_mm(x bf16 [M, K], packed, group, scales_and_zeros bf16)``
  (torchao / torchchat: ``(w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)``).

Both kernels dequantize as ``(q - 8) * scale + zero`` with a *float* zero (gpt-fast ``quantize.py``,
``group_quantize_tensor_from_qparams``). Our convention is ``(q - z) * s``, so ``zero = (8 - z) * s``, which is
exact in float32 for fp16 scales and integer ``z``. Where an op is missing or a shape is unsupported, the module
keeps the codes as uint8 and dequantizes on the fly; the chosen path is in ``Int4Linear.kernel`` and logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch
from torch import nn

from pipeline.errors import QuantizationError
from pipeline.formats import awq_gemm
from pipeline.quant.primitives import QuantizedWeight, dequantize_groupwise

log = logging.getLogger(__name__)

KERNEL_CPU = "cpu-int4pack"
KERNEL_CUDA = "cuda-int4pack"
KERNEL_DEQUANT = "dequantize"
_KERNEL_GROUPS = (32, 64, 128, 256)
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aten_op(name: str):
    return getattr(torch.ops.aten, name, None)


def _in_order(qw: QuantizedWeight) -> bool:
    if qw.g_idx is None:
        return True
    in_features = qw.w_int.shape[1]
    return torch.equal(qw.g_idx.long().cpu(), torch.arange(in_features) // qw.group_size)


def _scales_and_zeros(qw: QuantizedWeight, dtype: torch.dtype, device) -> torch.Tensor:
    """[K / group, N, 2]: (scale, float zero) with zero = (8 - z) * s, so (q - 8) * s + zero == (q - z) * s."""
    s = qw.scales.float()
    zero = (8 - qw.zeros.float()) * s
    return torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(device=device, dtype=dtype)


def _choose_kernel(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(kernel, reason) for this weight on this device."""
    out_features, in_features = qw.w_int.shape
    if qw.bits != 4:
        return KERNEL_DEQUANT, f"{qw.bits}-bit weights"
    if not _in_order(qw):
        return KERNEL_DEQUANT, "permuted groups (g_idx)"
    if qw.group_size not in _KERNEL_GROUPS:
        return KERNEL_DEQUANT, f"group size {qw.group_size} not in {_KERNEL_GROUPS}"
    if device.type == "cpu":
        if _aten_op("_convert_weight_to_int4pack_for_cpu") is None or _aten_op("_weight_int4pack_mm_for_cpu") is None:
            return KERNEL_DEQUANT, "this torch has no CPU int4pack ops"
        if out_features % 16:
            return KERNEL_DEQUANT, f"out features {out_features} not a multiple of 16"
        if dtype not in _CPU_DTYPES:
            return KERNEL_DEQUANT, f"dtype {dtype}"
        return KERNEL_CPU, ""
    if device.type == "cuda":
        if _aten_op("_convert_weight_to_int4pack") is None or _aten_op("_weight_int4pack_mm") is None:
            return KERNEL_DEQUANT, "this torch has no CUDA int4pack ops"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return KERNEL_DEQUANT, "the CUDA int4 kernel needs sm80+"
        if out_features % 8 or _inner_k_tiles(in_features) is None:
            return KERNEL_DEQUANT, f"shape [{out_features}, {in_features}] (needs N % 8 == 0, K % 32 == 0)"
        return KERNEL_CUDA, ""
    return KERNEL_DEQUANT, f"no int4 kernel for device {device.type}"


def _inner_k_tiles(in_features: int) -> int | None:
    """The largest innerKTiles (8, 4, 2) with K % (innerKTiles * 16) == 0, as gpt-fast's ``_check_linear_int4_k``."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


class Int4Linear(nn.Module):
    """A linear layer with group-wise 4-bit weights, built from a ``QuantizedWeight`` on its target device."""

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = qw.w_int.shape
        self.group_size = qw.group_size
        self.bits = qw.bits
        self.kernel, reason = _choose_kernel(qw, device, dtype)
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))
        if self.kernel != KERNEL_DEQUANT:
            try:
                self._build_packed(qw, device, dtype)
                self._run_packed(torch.zeros(1, self.in_features, device=device, dtype=self.compute_dtype))
            except RuntimeError as e:  # an op that exists but refuses this build/shape: keep running, slower
                self.kernel, reason = KERNEL_DEQUANT, f"kernel raised: {str(e).splitlines()[0]}"
                for name in ("weight_int4pack", "scales_and_zeros"):
                    self._buffers.pop(name, None)
        if self.kernel == KERNEL_DEQUANT:
            self.compute_dtype = dtype
            self.register_buffer("w_uint8", qw.w_int.to(device=device, dtype=torch.uint8))
            self.register_buffer("scales", qw.scales.to(device=device, dtype=dtype))
            self.register_buffer("zeros", qw.zeros.to(device=device, dtype=torch.uint8))
            self.register_buffer("g_idx", None if qw.g_idx is None else qw.g_idx.to(device=device, dtype=torch.int32))
            log.debug("Int4Linear [%d, %d]: dequantize on the fly (%s)", self.out_features, self.in_features, reason)
        else:
            log.debug("Int4Linear [%d, %d]: %s", self.out_features, self.in_features, self.kernel)
        self.fallback_reason = reason

    def _build_packed(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        w = qw.w_int.to(torch.int32)
        if self.kernel == KERNEL_CPU:
            self.compute_dtype = dtype
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.contiguous(), 1)  # innerKTiles unused on CPU
        else:
            self.compute_dtype = torch.bfloat16  # the CUDA tinygemm kernel takes bfloat16 activations only
            w = w.to(device)
            w_uint8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, _inner_k_tiles(self.in_features))
        self.register_buffer("weight_int4pack", packed.to(device))
        self.register_buffer("scales_and_zeros", _scales_and_zeros(qw, self.compute_dtype, device))

    def _run_packed(self, x2: torch.Tensor) -> torch.Tensor:
        op = torch.ops.aten._weight_int4pack_mm_for_cpu if self.kernel == KERNEL_CPU else torch.ops.aten._weight_int4pack_mm
        return op(x2, self.weight_int4pack, self.group_size, self.scales_and_zeros)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] this module multiplies by (only for the dequantize path and tests)."""
        if self.kernel != KERNEL_DEQUANT:
            raise RuntimeError("the packed kernels do not keep plain codes; dequantize the QuantizedWeight instead")
        return dequantize_groupwise(self.w_uint8, self.scales, self.zeros, self.group_size, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == KERNEL_DEQUANT:
            y = x2 @ self.dequantized_weight().to(x.dtype).t()
        elif x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        else:
            y = self._run_packed(x2.to(self.compute_dtype).contiguous()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel}"
        )


# -- registry: quant_method -> builder of one runtime linear from that linear's tensors ---------------------------------
# A builder gets the tensors stored under one linear's prefix (keys without the prefix, e.g. {"qweight", "qzeros",
# "scales", "bias"}), the folder's quantization_config, the device and the compute dtype, and returns a module.
LinearBuilder = Callable[[dict[str, torch.Tensor], dict, torch.device, torch.dtype], nn.Module]


def _require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], method: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise QuantizationError(
            f"a {method} linear lacks tensor(s) {', '.join(missing)} (it has {', '.join(sorted(tensors))}). The folder "
            "does not match its quantization_config; re-run the quantize stage."
        )


def awq_linear(tensors: dict[str, torch.Tensor], quant_config: dict, device, dtype) -> nn.Module:
    """AWQ GEMM ``qweight``/``qzeros``/``scales`` (+ ``bias``) -> ``Int4Linear``."""
    _require(tensors, awq_gemm.TENSOR_SUFFIXES, "awq")
    _, group_size = awq_gemm.read_quantization_config(quant_config)
    qw = awq_gemm.unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size)
    return Int4Linear(qw, tensors.get("bias"), device=device, dtype=dtype)


RUNTIME_FORMATS: dict[str, LinearBuilder] = {
    "awq": awq_linear,
    # "gptq": lambda t, cfg, device, dtype: Int4Linear(gptq.unpack(...), t.get("bias"), device, dtype),
}


def build_linear(
    quant_method: str, tensors: dict[str, torch.Tensor], quant_config: dict, device, dtype: torch.dtype
) -> nn.Module:
    """The runtime module for one quantized linear, or a QuantizationError naming the supported methods."""
    try:
        builder = RUNTIME_FORMATS[quant_method]
    except KeyError:
        raise QuantizationError(
            f"quant_method {quant_method!r} has no runtime in the transformers engine. Supported: "
            f"{', '.join(sorted(RUNTIME_FORMATS))}. Quantize with a method that writes one of these, or compile for "
            "an engine that reads this format."
        ) from None
    return builder(tensors, quant_config, torch.device(device), dtype)


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many ``Int4Linear`` modules of ``model`` run on each kernel path."""
    return dict(Counter(m.kernel for m in model.modules() if isinstance(m, Int4Linear)))
