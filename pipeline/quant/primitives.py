"""Group-wise integer quantization primitives: pure tensor functions shared by every weight-only method.

Convention (the one AWQ, GPTQ and TurboMind use): for a weight ``w`` of shape [out, in] split along ``in``
into groups of ``group_size`` columns, each (row, group) has a scale ``s`` and an integer zero point ``z``;
``q = clamp(round(w / s) + z, 0, 2**bits - 1)`` and ``w ≈ (q - z) * s``. Symmetric quantization fixes
``z = 2**(bits-1)`` (GPTQ ``sym=True``), asymmetric (AWQ) fits ``s, z`` to each group's min and max.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """An integer weight with its group-wise scales and zero points (unpacked, one integer per element)."""

    w_int: torch.Tensor  # [out, in] int32, values in [0, 2**bits)
    scales: torch.Tensor  # [out, in // group_size] float32
    zeros: torch.Tensor  # [out, in // group_size] int32, values in [0, 2**bits)
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None  # [in] int32: group of each input column (GPTQ act-order); None = in order

    def dequantize(self) -> torch.Tensor:
        return dequantize_groupwise(self.w_int, self.scales, self.zeros, self.group_size, self.g_idx)


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = w.shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {in_features}")
    return w.reshape(out_features, in_features // group_size, group_size)


def compute_qparams(
    w_min: torch.Tensor, w_max: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and integer zero points that map [w_min, w_max] onto [0, 2**bits - 1]."""
    qmax = 2**bits - 1
    if sym:
        absmax = torch.maximum(w_min.abs(), w_max.abs()).clamp(min=1e-8)
        # GPTQ's symmetric grid (gptq/quant.py, Quantizer.find_params): range [-absmax, absmax] over qmax
        # steps with the zero fixed at the middle code (qmax + 1) / 2.
        scales = 2 * absmax / qmax
        zeros = torch.full_like(scales, (qmax + 1) // 2, dtype=torch.int32)
        return scales, zeros
    w_min = w_min.clamp(max=0)  # keep 0 exactly representable, as AWQ and GPTQ do
    w_max = w_max.clamp(min=0)
    scales = ((w_max - w_min) / qmax).clamp(min=1e-8)
    zeros = torch.round(-w_min / scales).clamp(0, qmax).to(torch.int32)
    return scales, zeros


def quantize_with_qparams(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` given broadcastable ``scales`` and ``zeros``."""
    return torch.clamp(torch.round(w / scales) + zeros, 0, 2**bits - 1).to(torch.int32)


def _fit_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool, clip_ratio) -> tuple[torch.Tensor, ...]:
    """The fp32 group view [out, groups, group_size] of ``w`` and each group's (optionally clipped) grid."""
    g = _group_view(w.float(), group_size)
    ratio = clip_ratio if isinstance(clip_ratio, float) else clip_ratio.unsqueeze(-1)
    scales, zeros = compute_qparams(g.amin(dim=-1, keepdim=True) * ratio, g.amax(dim=-1, keepdim=True) * ratio,
                                    bits, sym)
    return g, scales, zeros


def quantize_groupwise(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False, clip_ratio: torch.Tensor | float = 1.0
) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of ``w`` [out, in]. ``clip_ratio`` shrinks each group's range
    (a float, or a [out, in // group_size] tensor from a clipping search)."""
    g, scales, zeros = _fit_groups(w, bits, group_size, sym, clip_ratio)
    q = quantize_with_qparams(g, scales, zeros, bits)
    return QuantizedWeight(
        w_int=q.reshape(w.shape),
        scales=scales.squeeze(-1),
        zeros=zeros.squeeze(-1),
        bits=bits,
        group_size=group_size,
    )


def dequantize_groupwise(
    w_int: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(q - z) * s`` in float32, [out, in]. With ``g_idx``, column j uses group ``g_idx[j]``.

    In-order groups (no ``g_idx``) are computed on the group view with broadcast scales and zeros: the same values
    as the gather below, without its two [out, in] index copies (1.8 GiB on a 70B down_proj)."""
    if g_idx is None and group_size > 0 and w_int.shape[1] % group_size == 0 and scales.shape[1] * group_size == w_int.shape[1]:
        q = _group_view(w_int, group_size).float()
        q -= zeros.float().unsqueeze(-1)
        q *= scales.float().unsqueeze(-1)
        return q.reshape(w_int.shape)
    if g_idx is None:
        g_idx = torch.arange(w_int.shape[1], device=w_int.device) // group_size
    g_idx = g_idx.long()
    return (w_int.float() - zeros[:, g_idx].float()) * scales[:, g_idx].float()


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = False, clip_ratio=1.0) -> torch.Tensor:
    """Quantize then dequantize, in ``w``'s dtype: what a search compares against the original. The same values as
    ``quantize_groupwise(...).dequantize()``, computed on the group view (no integer copy, no per-column gather):
    the AWQ searches call it ~30 times per linear. On a GPU (fp32 weight, power-of-two groups, a float clip ratio)
    it is one Triton kernel with the same values (``fake_quant_triton``)."""
    if not isinstance(clip_ratio, torch.Tensor) and _fused(w, group_size):
        return fake_quantize_fused(w, bits, group_size, sym, clip_ratio)
    g, scales, zeros = _fit_groups(w, bits, group_size, sym, clip_ratio)
    q = g / scales  # then in place: one [out, in] temporary instead of a chain of them, the same values
    q.round_().add_(zeros).clamp_(0, 2**bits - 1).sub_(zeros).mul_(scales)
    return q.reshape(w.shape).to(w.dtype)


def fake_quantize_scaled(w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> torch.Tensor:
    """``fake_quantize(w * s) / s`` for column scales ``s`` [in] (fp32): AWQ's candidate weight seen from the
    unscaled input. One pass where the fused kernel runs, the eager chain otherwise; the same values."""
    w = w.float()
    if _fused(w, group_size):
        return fake_quantize_fused(w, bits, group_size, sym, 1.0, s)
    return fake_quantize(w * s, bits, group_size, sym).div_(s)


def _fused(w: torch.Tensor, group_size: int) -> bool:
    """Whether ``fake_quant_triton`` takes ``w`` (a CUDA fp32 weight, or any under Triton's interpreter)."""
    if not w.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False  # not even imported: a CPU run never pays for importing Triton
    from pipeline.quant import fake_quant_triton

    return fake_quant_triton.eligible(w, group_size)


def fake_quantize_fused(w, bits, group_size, sym, clip_ratio=1.0, s=None) -> torch.Tensor:
    from pipeline.quant import fake_quant_triton

    return fake_quant_triton.fake_quantize(w, bits, group_size, sym, float(clip_ratio), s)


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Let CUDA fp32 matmuls use TF32 inside the block when ``enabled`` (the searches' many candidate products:
    several times faster, ~1e-3 relative error, far below the 4-bit noise they rank); restored on exit."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = previous or enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``w ≈ w_int8 * scale``, scale [out, 1] float32 (SmoothQuant W8)."""
    scale = (w.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8)
    w_int8 = torch.clamp(torch.round(w.float() / scale), -128, 127).to(torch.int8)
    return w_int8, scale
