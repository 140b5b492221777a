"""SmoothQuant W8A8 (Xiao et al., 2022, arXiv:2211.10438) as plain tensor functions.

Activation outliers sit in a few fixed channels, so per-token int8 activations waste their range on them.
SmoothQuant divides activation channel ``j`` by ``s_j`` and multiplies weight column ``j`` by ``s_j``
(eq. 3, function-preserving), with ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (eq. 4), moving part of the
difficulty from the activations to the weights. Weights are then int8 per output channel and activations int8
per token, quantized at run time.

Checked against the official code (mit-han-lab/smoothquant ``smoothquant/smooth.py``, ``smooth_ln_fcs``) and
lmdeploy ``lite/quantization/awq.py`` (``smooth_ln_fcs``, used by ``lite/apis/smooth_quant.py``). The fold itself
is :func:`pipeline.quant.fold.fold_scales`, shared with AWQ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from pipeline.errors import QuantizationError
from pipeline.quant.fold import FoldedScales, fold_scales
from pipeline.quant.primitives import quantize_per_channel_int8

__all__ = [
    "update_act_absmax",
    "smooth_scales",
    "smooth_and_quantize",
    "quantize_per_token_int8",
    "SmoothedGroup",
]


def update_act_absmax(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Running max |x| per input channel, fp32 [in], over every token of ``x`` [..., in]."""
    batch_max = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
    return batch_max if acc is None else torch.maximum(acc.to(batch_max.device), batch_max)


WEIGHT_STATS = ("mean", "max")


def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5,
                  weight_stat: str = "max") -> torch.Tensor:
    """Per-input-channel smoothing factors, fp32 [in]: ``s = max|X|^alpha / w_j^(1-alpha)`` (eq. 4).

    ``weight_stat="max"`` is the paper's ``w_j = max|W_j|`` over the rows of every linear that reads the input
    (q/k/v together), as in the official ``smooth_ln_fcs``; both maxima and the result are clamped at 1e-5 as
    there. ``"mean"`` is lmdeploy's (``lite/quantization/awq.py`` ``get_weight_scale`` with group size -1, used
    by its ``smooth_ln_fcs``/``smooth_fc_fcs``): the mean over rows of ``|W|`` normalised by each row's max,
    the AWQ weight magnitude. The quantize stage defaults to ``"mean"``: with the same activations it gave lower
    KL on all five quality-bench fixtures (bench/RESULTS.md). A channel whose activation never left zero gets
    ``s = 1``: there is nothing to smooth, and dividing its norm weight by 1e-5 would overflow half precision
    (lmdeploy sets such channels to 1 for the same reason).
    """
    if weight_stat not in WEIGHT_STATS:
        raise QuantizationError(
            f"SmoothQuant weight statistic {weight_stat!r} is not known; choose 'mean' (lmdeploy's, the default) "
            "or 'max' (the paper's eq. 4)."
        )
    if not 0.0 <= alpha <= 1.0:
        raise QuantizationError(
            f"SmoothQuant alpha must be in [0, 1], got {alpha}: it is the share of the quantization difficulty "
            "moved from the activations to the weights (0.5 is the paper's default; 0.75-0.85 for models with "
            "strong outliers)."
        )
    if not weights:
        raise QuantizationError("SmoothQuant got no linear weights: a LinearGroup must list at least one.")
    a = act_absmax.reshape(-1).float()
    for w in weights:
        if w.dim() != 2 or w.shape[1] != a.numel():
            raise QuantizationError(
                f"SmoothQuant: a weight of shape {tuple(w.shape)} does not read the {a.numel()} channels whose "
                "activation maxima were recorded; check the layer map in pipeline/quant/arch.py."
            )
    if weight_stat == "max":
        w_stat = torch.stack([w.detach().float().abs().amax(dim=0).to(a.device) for w in weights]).amax(dim=0)
    else:
        from pipeline.quant.awq_inputs import weight_magnitude

        w_stat = weight_magnitude([w.detach() for w in weights], -1).to(a.device)
    w_stat = w_stat.clamp(min=1e-5)
    s = (a.clamp(min=0).pow(alpha) / w_stat.pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(a > 0, s, torch.ones_like(s))


class SmoothedGroup(NamedTuple):
    """Result of :func:`smooth_and_quantize` for one LinearGroup."""

    scales: torch.Tensor  # [in] fp32, the smoothing factors that were folded
    prev_weight: torch.Tensor  # the norm weight (or previous linear's weight) divided by the scales
    prev_bias: torch.Tensor | None
    w_int8: list[torch.Tensor]  # per linear, [out, in] int8
    w_scales: list[torch.Tensor]  # per linear, [out, 1] fp32: w ≈ w_int8 * w_scale


@torch.no_grad()
def smooth_and_quantize(
    prev_weight: torch.Tensor,
    prev_bias: torch.Tensor | None,
    linears: Sequence[torch.Tensor],
    act_absmax: torch.Tensor,
    prev_is_norm: bool,
    alpha: float = 0.5,
) -> SmoothedGroup:
    """Smooth one LinearGroup (eq. 4 scales, folded by ``fold_scales``) and quantize its weights to int8.

    The linears are smoothed in their own dtype (as lmdeploy does before ``QLinear.from_float``), then
    quantized symmetric per output channel. Without a usable fold (width mismatch) a QuantizationError says so;
    the caller then quantizes that group unsmoothed.
    """
    s = smooth_scales(act_absmax, linears, alpha)
    folded: FoldedScales = fold_scales(prev_weight, prev_bias, linears, s, prev_is_norm)
    packed = [quantize_per_channel_int8(w) for w in folded.linears]
    return SmoothedGroup(
        scales=s,
        prev_weight=folded.prev_weight,
        prev_bias=folded.prev_bias,
        w_int8=[q for q, _ in packed],
        w_scales=[sc for _, sc in packed],
    )


def quantize_per_token_int8(x: torch.Tensor, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per token (row of the last dim): ``x ≈ x_int8 * scale``, scale [..., 1] fp32.

    The run-time activation quantizer of W8A8: ``scale = max(|x_t|, eps) / 127``, round half to even, clamp
    to [-128, 127] — lmdeploy's ``per_token_quant_int8`` (pytorch/kernels/cuda/w8a8_triton_kernels.py, its
    torch reference) and vLLM's dynamic per-token int8 (compressed-tensors ``strategy: token, dynamic: true``).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps) / 127.0
    x_int8 = torch.clamp(torch.round(xf / scale), -128, 127).to(torch.int8)
    return x_int8, scale
