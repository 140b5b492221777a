"""Folding per-channel scales into a model, function-preserving: the previous op (a norm or a linear) divides its
output channels by ``s`` and the linears that read them multiply their input columns by ``s``. Shared by AWQ and
SmoothQuant; checked against lmdeploy ``lite/quantization/awq.py`` (``smooth_ln_fcs`` / ``smooth_fc_fcs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from pipeline.errors import QuantizationError

# ---------------------------------------------------------------------------------------------------------------
# Folding the scales into the model (function-preserving)
# ---------------------------------------------------------------------------------------------------------------


class FoldedScales(NamedTuple):
    """New tensors after :func:`fold_scales`, in the dtypes of the inputs."""

    prev_weight: torch.Tensor
    prev_bias: torch.Tensor | None
    linears: list[torch.Tensor]


@torch.no_grad()
def fold_scales(
    prev_weight: torch.Tensor,
    prev_bias: torch.Tensor | None,
    linears: Sequence[torch.Tensor],
    scales: torch.Tensor,
    prev_is_norm: bool,
) -> FoldedScales:
    """Move per-input-channel ``scales`` into the model without changing its function.

    The linears' input columns are multiplied by ``s`` and the module producing their input is divided by
    ``s``: a norm's weight (and bias) when ``prev_is_norm``, else the previous linear's OUTPUT rows (and bias).
    ``(y / s) (W diag(s))^T = y W^T``. This is the fold of both AWQ and SmoothQuant (SmoothQuant eq. 3,
    lmdeploy ``smooth_ln_fcs`` / ``smooth_fc_fcs``). It holds for RMSNorm/LayerNorm (``y = w ⊙ norm(x) + b``),
    for v_proj -> o_proj (attention mixes tokens, not channels) and for up_proj -> down_proj (the gate
    multiplies element-wise). It does not hold for norms of the form ``(1 + w) ⊙ x`` (Gemma): such a layer map
    must not name the norm as ``prev``.

    The arithmetic is done in at least fp32 and cast back, so a half-precision model rounds once per tensor.
    """
    s = scales.reshape(-1)
    width = s.numel()
    if prev_is_norm:
        if prev_weight.dim() != 1 or prev_weight.numel() != width:
            raise QuantizationError(
                f"cannot fold {width} scales into a norm weight of shape {tuple(prev_weight.shape)}: a norm "
                "feeding the linears must have one weight per input channel. Check the layer map's `prev`."
            )
    elif prev_weight.dim() != 2 or prev_weight.shape[0] != width:
        raise QuantizationError(
            f"cannot fold {width} scales into the output rows of a linear of shape {tuple(prev_weight.shape)}: "
            "its output width differs from the next linears' input width (grouped-query v_proj -> o_proj is "
            "the usual case). Such a group is skipped by setting needs_equal_width=True in pipeline/quant/arch.py."
        )
    if prev_bias is not None and prev_bias.numel() != width:
        raise QuantizationError(
            f"cannot fold {width} scales into a bias of {prev_bias.numel()} elements: the bias must match the "
            "output width of the module feeding the linears."
        )
    for w in linears:
        if w.dim() != 2 or w.shape[1] != width:
            raise QuantizationError(
                f"cannot fold {width} scales into the input columns of a linear of shape {tuple(w.shape)}."
            )

    def compute_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.promote_types(t.dtype, torch.float32)

    def divide(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        sd = s.to(device=t.device, dtype=compute_dtype(t)).reshape(shape)
        return (t.to(compute_dtype(t)) / sd).to(t.dtype)

    new_prev = divide(prev_weight, (-1,) if prev_is_norm else (-1, 1))
    new_bias = divide(prev_bias, (-1,)) if prev_bias is not None else None
    new_linears = [
        (w.to(compute_dtype(w)) * s.to(device=w.device, dtype=compute_dtype(w)).reshape(1, -1)).to(w.dtype)
        for w in linears
    ]
    return FoldedScales(prev_weight=new_prev, prev_bias=new_bias, linears=new_linears)
