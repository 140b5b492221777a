"""AWQ, activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978), as plain tensor functions.

AWQ protects the weight columns that meet large activations: it scales input channel ``j`` of the weights up by
``s_j`` and the activations down by the same factor, which leaves the float function unchanged
(``(X diag(s)^-1)(W diag(s))^T = X W^T``) but shrinks the relative rounding error of the salient columns.
``s = mean|X|^alpha`` (paper eq. 5) with ``alpha`` found by a grid search on the block output error
(eq. 4), then a per-group clipping search of the weight range (paper §3.3, "clipping").

Checked against AutoAWQ ``awq/quantize/quantizer.py`` (``_search_best_scale``, ``_compute_best_scale``,
``_compute_best_clip``; commit 93d7e8e of casper-hansen/AutoAWQ) and lmdeploy ``lite/quantization/awq.py``
(``smooth_ln_fcs``/``smooth_fc_fcs``, which fold the scales as :func:`fold_scales` does).

The walk over a model (which module feeds which linears, the calibration activations of each decoder layer)
lives in the quantize stage; here everything takes and returns tensors. The calibration statistics are in
``awq_inputs``, the folding of the scales into the model (shared with SmoothQuant) in ``fold``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from pipeline.errors import QuantizationError
from pipeline.quant import awq_inputs
from pipeline.quant.awq_inputs import (_direct_tokens, _flatten_tokens, _subsample_tokens, input_channel_magnitude,
                                       weight_magnitude)
from pipeline.quant.primitives import fake_quantize, fake_quantize_scaled, tf32_matmuls

log = logging.getLogger(__name__)
# ---------------------------------------------------------------------------------------------------------------
# Scale search (paper eq. 4-5)
# ---------------------------------------------------------------------------------------------------------------


class ScaleSearch(NamedTuple):
    """Result of :func:`search_scales`: unpacks as ``scales, best_ratio, losses``."""

    scales: torch.Tensor  # [in] float32, multiply weight columns, divide activations (fold_scales does both)
    best_ratio: float  # the alpha that won; 0.0 means scaling did not beat plain round-to-nearest
    losses: list[float]  # output MSE for each grid point alpha = i / n_grid


def _check_widths(weights: Sequence[torch.Tensor], in_features: int, group_size: int) -> None:
    if not weights:
        raise QuantizationError("AWQ scale search got no linear weights: a LinearGroup must list at least one.")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != in_features:
            raise QuantizationError(
                f"AWQ scale search: a weight of shape {tuple(w.shape)} does not read the {in_features} input "
                "channels of its group. Every linear of a LinearGroup must take the same input; check the layer "
                "map in pipeline/quant/arch.py."
            )
    if group_size > 0 and in_features % group_size:
        raise QuantizationError(
            f"AWQ group size {group_size} does not divide the input width {in_features}. Pick a group size "
            "that divides every linear's input width (128 and 64 divide the usual hidden sizes)."
        )


def _candidate_scales(
    x_mag: torch.Tensor, w_mag: torch.Tensor | None, ratio: float
) -> torch.Tensor:
    """s = mag^alpha (or AutoAWQ's duo scaling mag^alpha / w_mag^(1-alpha)), normalised by sqrt(max·min)."""
    if w_mag is None:
        s = x_mag.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mag.pow(ratio) / (w_mag.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    # Centre the scales geometrically (AutoAWQ _compute_best_scale): only their ratios matter to the function,
    # and centring keeps the folded norm weights and scaled columns in a representable range.
    s = s / (s.max() * s.min()).sqrt()
    s[~torch.isfinite(s)] = 1.0
    return s


@torch.no_grad()
def search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    forward: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    *,
    magnitude: torch.Tensor | None = None,
    max_tokens: int = 4096,
    duo_scaling: bool = False,
    sym: bool = False,
    n_tokens: int | None = None,
    gram: torch.Tensor | None = None,
) -> ScaleSearch:
    """Grid-search AWQ's per-input-channel scales for the linears that share the input ``x``.

    For alpha in ``{0, 1/n_grid, ..., (n_grid-1)/n_grid}``: ``s = mag^alpha / sqrt(max·min)``, fake-quantize
    ``W diag(s)`` group-wise, and measure the MSE between the float output and ``(X/s) Q(W s)^T`` (paper eq. 4).
    alpha = 0 is plain round-to-nearest, so the winner is never worse than RTN on the search data.

    Args:
        x: the linears' input activations [..., in] (the calibration tokens of this layer).
        weights: the weights [out_i, in] of the linears that read ``x`` (q/k/v, or gate/up, or one linear).
        forward: optional block forward. It receives the *effective* weights ``Q(W_i s) / s`` (in the original
            input basis, one per entry of ``weights``) and returns the block output, so the caller can run the
            unchanged module (attention, MLP) on its own inputs — AutoAWQ's ``module2inspect``. It is also called
            once with the original weights for the reference. Without it the loss is over the concatenated
            linear outputs ``x W_i^T``.
        bits, group_size, sym: the weight quantization the scales are searched for.
        n_grid: number of alpha grid points in [0, 1).
        magnitude: precomputed mean |x| per channel [in] (from :func:`update_magnitude` over all calibration
            batches); computed from ``x`` when None.
        max_tokens: subsample ``x`` (evenly strided) to this many tokens for the built-in loss, bounding memory;
            when the input is narrower than that, the loss goes through the Gram matrix of every token instead
            (:func:`_gram_loss`: the same objective, cheaper per candidate).
        duo_scaling: use AutoAWQ's ``mag^alpha / w_mag^(1-alpha)`` instead of the paper's ``mag^alpha``.
        n_tokens, gram: when ``x`` is not every calibration token but :class:`StreamingInputs`' strided sample of
            ``n_tokens`` of them, with ``magnitude`` and (where the Gram loss applies) ``gram`` from the same
            object: the search is then the one it would be on all the tokens, bit for bit.

    Returns:
        ``ScaleSearch(scales [in] fp32, best_ratio, losses)``.
    """
    x2 = _flatten_tokens(x)
    in_features = x2.shape[1]
    _check_widths(weights, in_features, group_size)
    group_size = group_size if group_size > 0 else in_features  # -1: one group per row (per-channel)
    device = weights[0].device
    x_mag = (magnitude if magnitude is not None else input_channel_magnitude(x2)).float().to(device)
    w_mag = weight_magnitude(weights, group_size).to(device) if duo_scaling else None
    w_fp32 = [w.float() for w in weights]

    n_total = x2.shape[0] if n_tokens is None else n_tokens
    n_direct = _direct_tokens(n_total, max_tokens)
    with tf32_matmuls(device.type == "cuda"):
        if forward is not None:
            reference = forward(list(weights)).float()

            def loss_of(ws: list[torch.Tensor]) -> float:
                out = forward([w.to(weights[i].dtype) for i, w in enumerate(ws)]).float()
                return float((out - reference).pow(2).mean())

        elif in_features < n_direct:
            if gram is None and n_total != x2.shape[0]:
                raise QuantizationError(
                    "AWQ scale search: the inputs are a sample of the calibration tokens, but the Gram loss needs "
                    "all of them; pass the Gram matrix gathered with them (StreamingInputs.finish())."
                )
            loss_of = _loss_from_gram(gram.to(device) if gram is not None else _gram(x2, device), w_fp32)
        else:
            loss_of = _output_loss(_subsample_tokens(x2, max_tokens).to(device=device, dtype=torch.float32), w_fp32)
        return _grid(loss_of, w_fp32, x_mag, w_mag, bits, group_size, sym, n_grid, in_features, device)


class _Separable:
    """A loss that is a sum of one term per linear: ``part(i, w)`` for linear ``i``, the terms combined by
    ``combine``. ``_grid`` evaluates it one linear at a time (one candidate weight alive, not the group's);
    calling it on the list gives the same float."""

    def __init__(self, part, combine):
        self.part, self.combine = part, combine

    def __call__(self, ws: list[torch.Tensor]) -> float:
        return self.combine([self.part(i, w) for i, w in enumerate(ws)])


def _loop_sum(values: list[float]) -> float:
    """Left-to-right float addition, as the Gram loss always summed; not ``sum()``, which Python 3.12 made
    compensated for floats, so results would differ between CI (3.11) and the GPU machine (3.12)."""
    total = 0.0
    for v in values:
        total += v
    return total


def _output_loss(x_s: torch.Tensor, w_ref: list[torch.Tensor]):
    """Mean squared output error over the tokens ``x_s``: ``mean((x ΔWᵀ)²)`` over tokens and outputs."""
    reference = [x_s @ w.t() for w in w_ref]
    numel = sum(r.numel() for r in reference)
    return _Separable(lambda i, w: float((x_s @ w.t() - reference[i]).pow(2).sum()), lambda parts: sum(parts) / numel)


def _gram(x2: torch.Tensor, device: torch.device, chunk: int | None = None) -> torch.Tensor:
    """``XᵀX / n`` in fp32 over every row of ``x2``, ``chunk`` (default ``awq_inputs._GRAM_CHUNK``) rows per GEMM."""
    n, width = x2.shape
    chunk = chunk or awq_inputs._GRAM_CHUNK
    G = torch.zeros(width, width, dtype=torch.float32, device=device)
    for i in range(0, n, chunk):
        xc = x2[i : i + chunk].to(device=device, dtype=torch.float32)
        G.addmm_(xc.t(), xc)
    G /= n
    return G


def _loss_from_gram(G: torch.Tensor, w_ref: list[torch.Tensor]):
    outputs = sum(w.shape[0] for w in w_ref)

    def part(i: int, w: torch.Tensor) -> float:
        d = w - w_ref[i]
        return float(((d @ G) * d).sum())

    return _Separable(part, lambda parts: _loop_sum(parts) / outputs)


def _gram_loss(x2: torch.Tensor, w_ref: list[torch.Tensor], device: torch.device, chunk: int | None = None):
    """The same loss through the Gram matrix ``G = XᵀX / n`` of *every* calibration token:
    ``mean((x ΔWᵀ)²) = tr(ΔW G ΔWᵀ) / outputs``. Each candidate then costs ``outputs × in²`` instead of
    ``tokens × in × outputs``: cheaper whenever the input is narrower than the token sample, and it sees all
    tokens rather than a subsample."""
    return _loss_from_gram(_gram(x2, device, chunk), w_ref)


def _grid(loss_of, w_fp32, x_mag, w_mag, bits, group_size, sym, n_grid, in_features, device) -> ScaleSearch:
    losses: list[float] = []
    best = (float("inf"), 0.0, torch.ones(in_features, device=device))
    for i in range(n_grid):
        ratio = i / n_grid
        s = _candidate_scales(x_mag, w_mag, ratio)
        # Q(W diag(s)) diag(s)^-1: the quantized weight seen from the unscaled input, so (X/s) Q(Ws)^T == X (.)^T.
        if isinstance(loss_of, _Separable):  # one linear's candidate at a time
            parts = []
            for j, w in enumerate(w_fp32):
                parts.append(loss_of.part(j, fake_quantize_scaled(w, s, bits, group_size, sym)))
            loss = loss_of.combine(parts)
        else:
            effective = [fake_quantize_scaled(w, s, bits, group_size, sym) for w in w_fp32]
            loss = loss_of(effective)
        losses.append(loss)
        if loss < best[0]:  # strict: ties keep the smaller alpha (RTN at alpha = 0)
            best = (loss, ratio, s.clone())
    log.debug("AWQ scale search: best alpha %.2f, loss %.4g (RTN %.4g)", best[1], best[0], losses[0])
    return ScaleSearch(scales=best[2], best_ratio=best[1], losses=losses)


# ---------------------------------------------------------------------------------------------------------------
# Clipping search (paper §3.3; AutoAWQ _compute_best_clip)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def search_clip(
    x: torch.Tensor,
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    *,
    sym: bool = False,
    out_batch: int = 64,
) -> torch.Tensor:
    """Per-(row, group) clip ratio of ``w`` [out, in] minimising each group's partial output error.

    For ratio r in ``{1, 1 - 1/n_grid, ..., > 1 - max_shrink}`` each group's range is shrunk to ``r·[min, max]``
    (the convention of ``primitives.quantize_groupwise(clip_ratio=...)``, so the result feeds it directly),
    and the ratio with the lowest ``mean_t (x_tg · (Q(w_g) - w_g))^2`` is kept per group. Call it on the
    AWQ-scaled weight ``W diag(s)`` with the scaled input ``x / s``. Rows are processed ``out_batch`` at a time
    and the group products go through einsum, so memory is ``out_batch × tokens × groups``.

    Returns: clip ratios [out, in // group_size], float32 (1.0 = no clipping).
    """
    out_features, in_features = w.shape
    g = group_size if group_size > 0 else in_features
    _check_widths([w], in_features, g)
    x2 = _flatten_tokens(x)
    if x2.shape[1] != in_features:
        raise QuantizationError(
            f"AWQ clip search: activations have {x2.shape[1]} channels but the weight reads {in_features}."
        )
    n_groups = in_features // g
    # AutoAWQ samples every (n_tokens // n_sample_token)-th token; same idea, capped at n_sample_tokens.
    xg = _subsample_tokens(x2, n_sample_tokens).to(device=w.device, dtype=torch.float32)
    xg = xg.reshape(-1, n_groups, g)  # [tokens, groups, group_size]
    ratios = [1.0 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]

    best_ratio = torch.ones(out_features, n_groups, dtype=torch.float32, device=w.device)
    with tf32_matmuls(w.is_cuda):
        for start in range(0, out_features, out_batch):
            _clip_rows(w, xg, start, out_batch, ratios, bits, g, sym, n_groups, best_ratio)
    return best_ratio


def _clip_rows(w, xg, start, out_batch, ratios, bits, g, sym, n_groups, best_ratio) -> None:
    """The clip search for rows ``start : start + out_batch`` of ``w``, written into ``best_ratio``."""
    wb = w[start : start + out_batch].float()
    wg = wb.reshape(-1, n_groups, g)
    reference = torch.einsum("tgk,ogk->otg", xg, wg)  # per-group partial outputs [rows, tokens, groups]
    min_err = torch.full((wb.shape[0], n_groups), float("inf"), device=w.device)
    for r in ratios:
        q = fake_quantize(wb, bits, g, sym, clip_ratio=r).reshape(-1, n_groups, g)
        err = (torch.einsum("tgk,ogk->otg", xg, q) - reference).pow(2).mean(dim=1)  # [rows, groups]
        better = err < min_err
        min_err = torch.where(better, err, min_err)
        best_ratio[start : start + out_batch][better] = r
