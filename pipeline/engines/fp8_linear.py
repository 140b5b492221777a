"""``Fp8Linear``: FP8 (e4m3) weights with per-channel or 128x128-block scales, activations quantized per token at
run time, as the FP8 engines run them (vLLM, lmdeploy, TensorRT-LLM).

Two paths, chosen per module (``Fp8Linear.kernel``) and logged:

- ``scaled-mm`` (per-channel weights): ``torch._scaled_mm(x_fp8 [M, K], w_fp8.T [K, N] column-major,
  scale_a=x_scale [M, 1], scale_b=w_scale.T [1, N])``, i.e. row-wise scaling: y[m, n] = sx[m] * sw[n] *
  sum_k x_fp8[m, k] * w_fp8[n, k]. "auto" takes it on CUDA sm89+ (FP8 tensor cores; row-wise scaling needs
  bfloat16 output there, so the product comes out in bfloat16 and is cast to the activation dtype). torch 2.13's
  CPU build also runs it (tested here); "auto" keeps the CPU on the dequantize path, which is exact float math.
- ``dequantize``: ``fq(x) @ (w_fp8 * scale).T`` in the compute dtype, where ``fq`` is the same dynamic activation
  quantization (per token; per token and 128-channel group for block weights, vLLM's and lmdeploy's 1x128
  activation groups) quantized and dequantized, so the CPU figures include the activation rounding the engines do.
  Block-scaled weights take this path on the GPU too: torch's block-wise scaled matmul
  (``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x128`` / ``BlockWise128x128``) is not used,
  because it could not be checked on the torch 2.11 of the GPU machine from here.
The weight stays one byte per element in memory on both paths. One bfloat16/float16 token on CUDA (batch-1
decode) runs ``fp8_cuda``'s GEMV instead (unless ``kernel="dequantize"`` was asked for), per channel or in blocks:
the same activation quantizer (per token, or per token and 128-column group) and scales in one kernel, float32
sums (``Fp8Linear.gemv_cuda``; decided at build, where it compiles). On the H200 it took a per-channel FP8
Llama-3-8B from 0.94x to 1.29x bf16 at batch 1.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.quant.fp8 import (
    dequantize_activations,
    dequantize_fp8,
    quantize_activations_per_token,
)

log = logging.getLogger(__name__)

KERNEL_SCALED_MM = "scaled-mm"
KERNEL_DEQUANT = "dequantize"
KERNELS = ("auto", KERNEL_SCALED_MM, KERNEL_DEQUANT)


def _scaled_mm_problem(block, device: torch.device, shape: tuple[int, int]) -> str:
    """Why the row-wise ``_scaled_mm`` path cannot run this weight here, or "" when it can."""
    if block is not None:
        return "block-scaled weights (block-wise scaled_mm not used, see module docstring)"
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no _scaled_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 matmuls need sm89+"
    if device.type not in ("cuda", "cpu"):
        return f"no FP8 matmul on {device.type}"
    if shape[0] % 16 or shape[1] % 16:
        return f"shape {list(shape)} (scaled_mm needs both dimensions divisible by 16)"
    return ""


class Fp8Linear(nn.Module):
    """A linear with FP8 weights ``w_fp8`` [out, in] and float32 scales (``block`` None: [out, 1]; else block
    scales [ceil(out/bo), ceil(in/bi)]). ``kernel``: "auto", "scaled-mm" or "dequantize"; ``act_quant``: quantize
    activations dynamically (what the engines do) or run them in the compute dtype (weight-only)."""

    def __init__(self, w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
                 bias: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, kernel: str = "auto", act_quant: bool = True):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        device = torch.device(device)
        self.out_features, self.in_features = w_fp8.shape
        self.block = tuple(block) if block else None
        self.act_group = self.block[1] if self.block else None
        self.act_quant = act_quant
        self.compute_dtype = dtype
        self.register_buffer("weight", w_fp8.to(device).contiguous())
        self.register_buffer("weight_scale", scale.to(device=device, dtype=torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))
        problem = _scaled_mm_problem(self.block, device, (self.out_features, self.in_features))
        if kernel == KERNEL_SCALED_MM and problem:
            raise ValueError(f"kernel 'scaled-mm' cannot run this weight: {problem}")
        if not act_quant and kernel == KERNEL_SCALED_MM:
            raise ValueError("kernel 'scaled-mm' quantizes activations; act_quant=False needs 'dequantize'")
        auto_cuda = kernel == "auto" and act_quant and device.type == "cuda" and not problem
        wanted = kernel == KERNEL_SCALED_MM or auto_cuda
        self.kernel, reason = (KERNEL_SCALED_MM, "") if wanted else (KERNEL_DEQUANT, problem or "asked for")
        if self.kernel == KERNEL_SCALED_MM:
            self.register_buffer("scale_row", self.weight_scale.reshape(1, -1).contiguous())
            self.mm_dtype = torch.bfloat16 if device.type == "cuda" else dtype
            try:
                self._scaled_mm(torch.zeros(1, self.in_features, device=device, dtype=dtype))
            except RuntimeError as e:  # an op that exists but refuses this build/shape: keep running, exactly
                if kernel == KERNEL_SCALED_MM:
                    raise
                self.kernel, reason = KERNEL_DEQUANT, f"scaled_mm raised: {str(e).splitlines()[0]}"
                self._buffers.pop("scale_row", None)
        self.fallback_reason = reason
        # one token: our GEMV with dynamic activations, unless the dequantize path was asked for (per channel at
        # any width, scaled_mm's refusals included, or in blocks)
        self.gemv_cuda = (kernel != KERNEL_DEQUANT and act_quant and device.type == "cuda"
                          and self._gemv_compiles(device))  # fmt: skip
        log.debug("Fp8Linear [%d, %d] %s: %s%s", self.out_features, self.in_features,
                  "block" if self.block else "channel", self.kernel, f" ({reason})" if reason else "")

    def _gemv_compiles(self, device: torch.device) -> bool:
        """One token through ``fp8_cuda``'s GEMV where it compiles (decided here, not in ``forward``, so compiled
        graphs see a constant)."""
        from pipeline.engines import fp8_cuda

        why = fp8_cuda.problem(self.out_features, self.in_features, device, block=self.block) or (
            fp8_cuda.compile_problem(self.in_features, self.block is not None))
        if why:
            log.debug("Fp8Linear [%d, %d]: one token through scaled_mm (%s)", self.out_features, self.in_features,
                      why)
            return False
        fp8_cuda.custom_op()  # registered now; forward calls it as torch.ops.quantship.fp8_gemv
        self.register_buffer("gemv_scale", self._gemv_layout().contiguous(), persistent=False)
        return True

    def _gemv_layout(self) -> torch.Tensor:
        """``weight_scale`` as ``fp8_cuda``'s GEMV reads it: the block scales, or one per row."""
        return self.weight_scale if self.block else self.weight_scale.reshape(-1)

    def rebind_scale_views(self) -> None:
        """Point the buffers derived from ``weight_scale`` (``scale_row`` for ``_scaled_mm``, ``gemv_scale`` for
        the one-token GEMV) at it again, after it was replaced (``fused_proj`` makes it a view of merged scales)."""
        if "scale_row" in self._buffers:
            self._buffers["scale_row"] = self.weight_scale.reshape(1, -1)
        if "gemv_scale" in self._buffers:
            self._buffers["gemv_scale"] = self._gemv_layout()

    def _scaled_mm(self, x2: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = quantize_activations_per_token(x2)
        return torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.scale_row,
                                out_dtype=self.mm_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in] = w_fp8 * scale."""
        return dequantize_fp8(self.weight, self.weight_scale, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        elif self.gemv_cuda and x2.shape[0] == 1 and x2.dtype in (torch.bfloat16, torch.float16):
            y = torch.ops.quantship.fp8_gemv(x2, self.weight, self.gemv_scale, *(self.block or (0, 0)))  # one kernel
        elif self.kernel == KERNEL_SCALED_MM:
            y = self._scaled_mm(x2).to(x.dtype)
        else:
            if self.act_quant:
                x2 = dequantize_activations(*quantize_activations_per_token(x2, self.act_group), self.act_group)
            y = x2.to(x.dtype) @ self.dequantized_weight().to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        granularity = f"block={list(self.block)}" if self.block else "per-channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {granularity}, "
                f"act_quant={self.act_quant}, bias={self.bias is not None}, kernel={self.kernel}")
