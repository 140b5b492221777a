"""FP8 (e4m3) weight quantization, per output channel or in 128x128 blocks, and per-token dynamic activations.

The recipe every FP8 loader shares: ``scale = amax / 448`` over the weights one scale covers (448 is the largest
finite ``float8_e4m3fn``), ``w_fp8 = cast_e4m3(clamp(w / scale, -448, 448))`` (round to nearest even), and
``w ~= w_fp8 * scale``. What each source does, read from:

- lmdeploy 0.16 (mirror at 1263d5c) ``lite/quantization/weight/quant_utils.py`` ``quant_blocked_fp8``: the
  weight is padded with zeros to multiples of 128 on both axes, reshaped into blocks, ``scale = amax / 448`` with
  ``amax.clamp_min(1e-6)``, and the codes cropped back; the scale has ``ceil(out/128) x ceil(in/128)`` entries.
- compressed-tensors 0.20.1 ``quantization/utils/helpers.py`` ``maybe_pad_tensor_for_block_quant`` (the same
  zero padding) and ``calculate_qparams`` (symmetric: ``max|w| / (896 / 2)``; a zero scale becomes the scale
  dtype's eps), ``lifecycle/forward_helpers.py`` ``_quantize`` (``x / scale``, clamp to +-448, cast to e4m3).

Zero padding never changes a partial block's amax (|0| <= amax), so the padded and the masked computation agree;
here partial blocks are handled by padding, as both do. A block or channel of zeros gets compressed-tensors'
scale (float32 eps) rather than lmdeploy's 1e-6 / 448: its codes are 0 either way, and blocks whose amax is below
1e-6 keep their precision.

Activations (dynamic, per token): ``scale = max(amax / 448, 1 / (448 * 512))``, the floor of vLLM's and FBGEMM's
per-token kernels (``min_scaling_factor`` in vLLM ``csrc/quantization/fp8``), so a row of zeros divides by a
positive number.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = (128, 128)  # (output rows, input columns) per weight block: DeepSeek-V3 / TurboMind / lmdeploy / vLLM
MIN_ACT_SCALE = 1.0 / (FP8_MAX * 512.0)
_ZERO_SCALE = torch.finfo(torch.float32).eps  # compressed-tensors calculate_qparams: scale 0 -> eps


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    scale = amax.float() / FP8_MAX
    return torch.where(scale == 0, torch.full_like(scale, _ZERO_SCALE), scale)


def cast_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``cast_e4m3(clamp(x / scale, -448, 448))`` in float32 arithmetic; ``scale`` broadcasts against ``x``."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def block_grid(shape: tuple[int, int], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """Scale entries of a [out, in] weight: ``(ceil(out / block_out), ceil(in / block_in))``."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def expand_block_scales(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """Block scales [ceil(out/bo), ceil(in/bi)] -> one scale per weight element [out, in] (partial blocks cropped)."""
    if tuple(scale.shape) != block_grid(shape, block):
        raise ValueError(
            f"block scales of shape {tuple(scale.shape)} do not fit a weight of shape {tuple(shape)} with "
            f"{block[0]}x{block[1]} blocks (expected {block_grid(shape, block)})"
        )
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[: shape[0], : shape[1]]


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_fp8 [out, in] float8_e4m3fn, scale float32 [out, 1])`` with one scale per output channel."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    scale = _scale_of(w.abs().amax(dim=1, keepdim=True))
    return cast_fp8(w, scale), scale


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_fp8 [out, in] float8_e4m3fn, scale float32 [ceil(out/bo), ceil(in/bi)])``: one scale per block,
    partial blocks at the right and bottom edges padded with zeros for their amax (lmdeploy / compressed-tensors)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    rows, cols = block_grid((out_features, in_features), block)
    pad = (0, cols * block[1] - in_features, 0, rows * block[0] - out_features)
    padded = torch.nn.functional.pad(w.float().abs(), pad)
    amax = padded.reshape(rows, block[0], cols, block[1]).amax(dim=(1, 3))
    scale = _scale_of(amax)
    return cast_fp8(w, expand_block_scales(scale, (out_features, in_features), block)), scale


def dequantize_fp8(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 ``w_fp8 * scale``; ``block`` None: ``scale`` is per channel [out, 1] (or a scalar), else block scales."""
    if block is not None:
        scale = expand_block_scales(scale, tuple(w_fp8.shape), block)
    return w_fp8.float() * scale.float()


def _div_exact(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b`` rounded once, on every device: CUDA turns division by a Python scalar into a multiplication by
    its reciprocal (one more rounding), which moved activation scales by an ulp against the CPU and flipped e4m3
    codes (seen on an H200); a tensor divisor keeps the true division."""
    return a / torch.full_like(a, b)


def quantize_activations_per_token(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8 [..., K] float8_e4m3fn, scale float32)``, dynamic: one scale per token (``[..., 1]``), or with
    ``group`` one per ``group`` consecutive channels of a token (``[..., ceil(K / group)]``, vLLM's and lmdeploy's
    1x128 activation groups for block-quantized weights; a partial last group covers what is left)."""
    if group is None:
        scale = _div_exact(x.abs().amax(dim=-1, keepdim=True).float(), FP8_MAX).clamp(min=MIN_ACT_SCALE)
        return cast_fp8(x, scale), scale
    k = x.shape[-1]
    n = math.ceil(k / group)
    padded = torch.nn.functional.pad(x.float().abs(), (0, n * group - k))
    scale = _div_exact(padded.unflatten(-1, (n, group)).amax(dim=-1).float(), FP8_MAX).clamp(min=MIN_ACT_SCALE)
    return cast_fp8(x, scale.repeat_interleave(group, dim=-1)[..., :k]), scale


def dequantize_activations(x_fp8: torch.Tensor, scale: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """float32 ``x_fp8 * scale`` for the scales of :func:`quantize_activations_per_token`."""
    if group is not None:
        scale = scale.repeat_interleave(group, dim=-1)[..., : x_fp8.shape[-1]]
    return x_fp8.float() * scale


def fake_quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """``w`` rounded to its FP8 grid and back (float32): per channel, or in ``block`` blocks."""
    if block is None:
        w_fp8, scale = quantize_fp8_per_channel(w)
    else:
        w_fp8, scale = quantize_fp8_block(w, block)
    return dequantize_fp8(w_fp8, scale, block)
