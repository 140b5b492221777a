"""``Int8Linear``: the W8A8 runtime linear (int8 weights per output channel, int8 activations per token).

``y = (x_int8 @ w_int8^T) * act_scale * w_scale^T + b``, where ``x_int8, act_scale`` come from dynamic symmetric
per-token quantization of the input at every call (``quant.smoothquant.quantize_per_token_int8``, lmdeploy's
``per_token_quant_int8``) and ``w_int8, w_scale`` are the checkpoint tensors of either W8A8 layout
(``formats.w8a8``). This is the arithmetic of lmdeploy's ``QLinear.forward`` (pytorch/models/q_modules.py:
``per_token_quant_int8`` then ``matmul_kernel_dynamic_quant(x_q, weight, x_scale, scale, bias)``) and of vLLM's
``apply_int8_linear`` for compressed-tensors dynamic-token W8A8.

The integer product runs on ``torch._int_mm`` (int8 x int8 -> int32) where it works:

- CPU: any shape on torch 2.13 (checked); an older torch without the CPU kernel raises, and the module falls
  back once per device type.
- CUDA (cuBLASLt): needs ``M > 16`` and ``K``, ``N`` multiples of 8 (the checks in aten's ``_int_mm_out_cuda``);
  a short input (decode, M <= 16) is padded with zero rows to 17, K or N not a multiple of 8 falls back.

One bfloat16/float16 token on CUDA (batch-1 decode) runs ``int8_cuda``'s GEMV instead: the same per-token
quantizer, int32 sums and float32 epilogue in one kernel, so the same result, without ``_int_mm``'s padding to 17
rows.

The fallback multiplies the same integers in float32 (exact while ``127 * 128 * K < 2**24``, i.e. K <= 1024, and
within float32 rounding beyond), so both paths give the same result up to that rounding. The path of the last
call is in ``Int8Linear.kernel``; each (device type, path) is logged once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.errors import QuantizationError
from pipeline.quant.primitives import quantize_per_channel_int8
from pipeline.quant.smoothquant import quantize_per_token_int8

log = logging.getLogger(__name__)

KERNEL_INT_MM = "int_mm"
KERNEL_FLOAT = "float-matmul"
KERNEL_GEMV = "cuda-gemv"  # one token on CUDA: int8_cuda
_CUDA_MIN_ROWS = 17  # _int_mm on CUDA: "self.size(0) needs to be greater than 16"
_logged: set[tuple[str, str]] = set()
_int_mm_broken: set[str] = set()  # device types where _int_mm raised once


def _log_path(device_type: str, kernel: str, why: str = "") -> None:
    if (device_type, kernel) not in _logged:
        _logged.add((device_type, kernel))
        log.info("Int8Linear on %s: %s%s", device_type, kernel, f" ({why})" if why else "")


def _float_mm(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    return x_int8.float() @ w_int8.float().t()


def int8_matmul(x_int8: torch.Tensor, w_int8: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``x_int8 [M, K] @ w_int8 [N, K]^T`` as int32 (``torch._int_mm``) or float32 (fallback), and the path taken."""
    device_type = x_int8.device.type
    m, k = x_int8.shape
    n = w_int8.shape[0]
    int_mm = getattr(torch, "_int_mm", None)
    if int_mm is None or device_type in _int_mm_broken or m == 0:
        _log_path(device_type, KERNEL_FLOAT, "torch._int_mm unavailable" if int_mm is None else "")
        return _float_mm(x_int8, w_int8), KERNEL_FLOAT
    if device_type == "cuda":
        if k % 8 or n % 8:
            _log_path(device_type, KERNEL_FLOAT, f"K={k} or N={n} not a multiple of 8")
            return _float_mm(x_int8, w_int8), KERNEL_FLOAT
        if m < _CUDA_MIN_ROWS:
            padded = torch.zeros(_CUDA_MIN_ROWS, k, dtype=torch.int8, device=x_int8.device)
            padded[:m] = x_int8
            _log_path(device_type, KERNEL_INT_MM)
            return int_mm(padded, w_int8.t())[:m], KERNEL_INT_MM
    try:
        out = int_mm(x_int8, w_int8.t())
    except (RuntimeError, NotImplementedError) as err:
        _int_mm_broken.add(device_type)
        _log_path(device_type, KERNEL_FLOAT, f"torch._int_mm failed: {str(err).splitlines()[0]}")
        return _float_mm(x_int8, w_int8), KERNEL_FLOAT
    _log_path(device_type, KERNEL_INT_MM)
    return out, KERNEL_INT_MM


class Int8Linear(nn.Module):
    """W8A8 linear: int8 weight [out, in] with fp32 scales [out, 1], activations quantized per token per call."""

    def __init__(self, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
            raise QuantizationError(
                f"Int8Linear needs an int8 weight [out, in], got {w_int8.dtype} of shape {tuple(w_int8.shape)}."
            )
        out_features, in_features = w_int8.shape
        if w_scale.numel() != out_features:
            raise QuantizationError(
                f"Int8Linear needs one weight scale per output channel ({out_features}), got {w_scale.numel()}."
            )
        if bias is not None and bias.numel() != out_features:
            raise QuantizationError(f"Int8Linear bias has {bias.numel()} elements, expected {out_features}.")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", w_int8.contiguous())
        self.register_buffer("scale", w_scale.reshape(out_features, 1).to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel: str | None = None  # path of the last forward: KERNEL_INT_MM, KERNEL_FLOAT or KERNEL_GEMV
        self.gemv_cuda = w_int8.is_cuda and self._gemv_compiles(w_int8.device)

    def _gemv_compiles(self, device: torch.device) -> bool:
        """Built on CUDA: one token goes through ``int8_cuda``'s GEMV where it compiles (decided here, not in
        ``forward``, so compiled graphs see a constant)."""
        from pipeline.engines import int8_cuda

        why = int8_cuda.problem(self.out_features, self.in_features, device) or int8_cuda.compile_problem(
            self.in_features)
        if why:
            _log_path(device.type, KERNEL_INT_MM, f"one token through _int_mm: {why}")
            return False
        int8_cuda.custom_op()  # registered now; forward calls it as torch.ops.quantship.int8_gemv
        return True

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an ``nn.Linear`` symmetric per output channel (no smoothing)."""
        w_int8, w_scale = quantize_per_channel_int8(linear.weight.detach())
        return cls(w_int8, w_scale, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise QuantizationError(
                f"Int8Linear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}."
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.gemv_cuda and x2.shape[0] == 1 and x2.dtype in (torch.bfloat16, torch.float16):
            # the same activation quantizer, int32 sums and float32 epilogue as below, in one kernel (int8_cuda)
            y, self.kernel = torch.ops.quantship.int8_gemv(x2, self.weight, self.scale), KERNEL_GEMV
        else:
            x_int8, act_scale = quantize_per_token_int8(x2)
            acc, self.kernel = int8_matmul(x_int8, self.weight)
            # Dequantize the int32 accumulator: y_tn = acc_tn * a_t * w_n (per-token x per-channel scales).
            y = acc.float() * act_scale * self.scale.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
