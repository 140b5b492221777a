"""AWQ as tensor functions: statistics, scale and clip search against round-to-nearest, the function-preserving fold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import QuantizationError
from pipeline.quant.awq import search_clip, search_scales
from pipeline.quant.awq_inputs import input_channel_magnitude, update_magnitude
from pipeline.quant.fold import fold_scales
from pipeline.quant.primitives import fake_quantize

from tests.conftest import OUTLIER_WIDTH as WIDTH
from tests.conftest import OUTLIERS, make_outlier_activations, make_weight


def output_mse(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    return float((x @ w_q.t() - x @ w.t()).pow(2).mean())


def awq_effective_weight(x_calib, w, bits, group_size, clip=True, n_grid=10):
    """Scale search, then clip search on the scaled weight, returned in the unscaled basis (Q(W s) / s)."""
    scales, ratio, _ = search_scales(x_calib, [w], bits=bits, group_size=group_size, n_grid=n_grid)
    ws = w * scales
    clip_ratio = search_clip(x_calib / scales, ws, bits, group_size, n_grid=n_grid) if clip else 1.0
    return fake_quantize(ws, bits, group_size, clip_ratio=clip_ratio) / scales, scales, ratio


# ------------------------------------------------------------------------------------------ statistics


def test_magnitude_is_mean_abs_per_channel():
    x = torch.tensor([[1.0, -2.0, 0.0], [-3.0, 2.0, 4.0]])
    assert torch.equal(input_channel_magnitude(x), torch.tensor([2.0, 2.0, 2.0]))
    assert input_channel_magnitude(x.half()).dtype == torch.float32


def test_running_magnitude_equals_magnitude_of_all_batches():
    batches = [make_outlier_activations(n, seed=i) for i, n in enumerate((7, 64, 1, 33))]
    acc, count = None, 0
    for b in batches:
        acc, count = update_magnitude(acc, count, b.reshape(1, *b.shape))  # leading batch dims are tokens too
    assert count == 105
    torch.testing.assert_close(acc, input_channel_magnitude(torch.cat(batches)), rtol=1e-6, atol=0)


def test_empty_activations_raise():
    with pytest.raises(QuantizationError, match="no calibration tokens"):
        input_channel_magnitude(torch.empty(0, WIDTH))


# ------------------------------------------------------------------------------------------ scale + clip vs RTN


@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 64), (3, 128), (3, 64)])
def test_awq_beats_rtn_on_one_linear(bits, group_size):
    # Measured over seeds: AWQ (scales + clip) lands at 0.18-0.25x the RTN output MSE; 0.5 leaves a 2x margin.
    x_calib = make_outlier_activations(512, seed=0)
    x_eval = make_outlier_activations(512, seed=1)  # held out: same outlier channels, fresh tokens
    w = make_weight(128)
    rtn = output_mse(x_eval, w, fake_quantize(w, bits, group_size))
    w_awq, scales, ratio = awq_effective_weight(x_calib, w, bits, group_size)
    awq = output_mse(x_eval, w, w_awq)
    assert ratio > 0
    # The salient (outlier) input channels get the largest scales.
    assert set(scales.topk(len(OUTLIERS)).indices.tolist()) == set(OUTLIERS)
    assert awq < 0.5 * rtn, f"AWQ {awq:.3g} vs RTN {rtn:.3g}"
    if bits == 3:  # at 3 bits the clip search adds a clear gain on top of the scales (measured 15-30%)
        w_scaled_only, _, _ = awq_effective_weight(x_calib, w, bits, group_size, clip=False)
        assert awq < 0.95 * output_mse(x_eval, w, w_scaled_only)


def test_awq_beats_rtn_on_a_two_linear_group():
    x_calib = make_outlier_activations(512, seed=2)
    x_eval = make_outlier_activations(512, seed=3)
    ws = [make_weight(128, seed=4), make_weight(256, seed=5)]  # e.g. gate_proj and up_proj reading one norm
    scales, ratio, losses = search_scales(x_calib, ws, bits=4, group_size=128)
    assert len(losses) == 20 and ratio > 0
    assert min(losses) < 0.5 * losses[0]  # losses[0] is alpha = 0, i.e. RTN on the search tokens
    rtn = sum(output_mse(x_eval, w, fake_quantize(w, 4, 128)) for w in ws)
    awq = sum(output_mse(x_eval, w, fake_quantize(w * scales, 4, 128) / scales) for w in ws)
    assert awq < 0.5 * rtn, f"AWQ {awq:.3g} vs RTN {rtn:.3g}"


def test_block_forward_sees_effective_weights_and_matches_builtin_loss():
    x = make_outlier_activations(512, seed=6)
    ws = [make_weight(128, seed=7), make_weight(64, seed=8)]
    seen = []

    def concat_forward(weights):
        seen.append([w.shape for w in weights])
        return torch.cat([x @ w.t() for w in weights], dim=1)

    with_forward = search_scales(x, ws, concat_forward, bits=4, group_size=64, n_grid=10)
    builtin = search_scales(x, ws, None, bits=4, group_size=64, n_grid=10)
    assert len(seen) == 11 and seen[0] == [(128, WIDTH), (64, WIDTH)]  # reference + one call per grid point
    assert with_forward.best_ratio == builtin.best_ratio
    torch.testing.assert_close(torch.tensor(with_forward.losses), torch.tensor(builtin.losses), rtol=1e-4, atol=0)
    torch.testing.assert_close(with_forward.scales, builtin.scales)


def test_block_forward_through_a_gated_mlp_beats_rtn():
    """The stage passes the MLP forward (module2inspect): the loss is on silu(x Wg^T) * (x Wu^T)."""
    x_calib = make_outlier_activations(512, seed=9)
    wg, wu = make_weight(256, seed=10), make_weight(256, seed=11)

    def mlp(xx, weights):
        return F.silu(xx @ weights[0].t()) * (xx @ weights[1].t())

    result = search_scales(x_calib, [wg, wu], lambda w: mlp(x_calib, w), bits=3, group_size=128, n_grid=10)
    x_eval = make_outlier_activations(512, seed=12)
    ref = mlp(x_eval, [wg, wu])
    rtn = float((mlp(x_eval, [fake_quantize(w, 3, 128) for w in (wg, wu)]) - ref).pow(2).mean())
    s = result.scales
    awq = float((mlp(x_eval, [fake_quantize(w * s, 3, 128) / s for w in (wg, wu)]) - ref).pow(2).mean())
    assert awq < 0.5 * rtn, f"AWQ {awq:.3g} vs RTN {rtn:.3g}"


def test_alpha_zero_is_rtn_so_search_never_loses_on_its_data():
    x = torch.randn(256, WIDTH, generator=torch.Generator().manual_seed(13))  # no outliers: little to gain
    w = make_weight(128, seed=14)
    scales, ratio, losses = search_scales(x, [w], bits=4, group_size=128, n_grid=5)
    rtn = output_mse(x, w, fake_quantize(w, 4, 128))
    assert losses[0] == pytest.approx(rtn, rel=1e-5)
    assert min(losses) <= losses[0]
    if ratio == 0.0:
        assert torch.equal(scales, torch.ones(WIDTH))


def test_token_subsampling_bounds_the_search_inputs():
    x = make_outlier_activations(5000, seed=15)
    w = make_weight(64, seed=16)
    assert WIDTH > 100
    full = search_scales(x, [w], bits=4, group_size=128, n_grid=4, max_tokens=0)
    # A sample narrower than the input: the output form on the strided tokens (1 in 50).
    sub = search_scales(x, [w], bits=4, group_size=128, n_grid=4, max_tokens=100)
    x_strided = x[::50]
    assert x_strided.shape[0] == 100
    assert sub.losses[0] == pytest.approx(output_mse(x_strided, w, fake_quantize(w, 4, 128)), rel=1e-5)
    # A sample wider than the input: the Gram form, over every token, so the same losses as no subsampling.
    gram = search_scales(x, [w], bits=4, group_size=128, n_grid=4, max_tokens=1000)
    assert gram.losses[0] == pytest.approx(output_mse(x, w, fake_quantize(w, 4, 128)), rel=1e-4)
    assert gram.best_ratio == full.best_ratio
    torch.testing.assert_close(torch.tensor(gram.losses), torch.tensor(full.losses), rtol=1e-4, atol=0)


def test_precomputed_magnitude_is_used():
    x = make_outlier_activations(256, seed=17)
    w = make_weight(64, seed=18)
    flat = torch.ones(WIDTH)  # a flat magnitude makes every alpha give s = 1: all losses equal RTN
    _, _, losses = search_scales(x, [w], bits=4, group_size=128, n_grid=4, magnitude=flat)
    assert max(losses) == pytest.approx(min(losses), rel=1e-6)


def test_duo_scaling_also_beats_rtn():
    x_calib, x_eval = make_outlier_activations(512, seed=19), make_outlier_activations(512, seed=20)
    w = make_weight(128, seed=21)
    s = search_scales(x_calib, [w], bits=4, group_size=128, n_grid=10, duo_scaling=True).scales
    assert output_mse(x_eval, w, fake_quantize(w * s, 4, 128) / s) < 0.5 * output_mse(
        x_eval, w, fake_quantize(w, 4, 128)
    )


def test_clip_search_lowers_error_at_3_bits():
    x_calib, x_eval = make_outlier_activations(512, seed=22), make_outlier_activations(512, seed=23)
    w = make_weight(160, seed=24)
    clip = search_clip(x_calib, w, bits=3, group_size=64, out_batch=48)  # 160 rows in uneven batches
    assert clip.shape == (160, WIDTH // 64) and clip.dtype == torch.float32
    assert float(clip.min()) > 0.5 - 1e-6 and float(clip.max()) == 1.0
    assert bool((clip < 1).any())  # 3-bit groups of Gaussian weights do gain from clipping
    no_clip = output_mse(x_eval, w, fake_quantize(w, 3, 64))
    clipped = output_mse(x_eval, w, fake_quantize(w, 3, 64, clip_ratio=clip))
    assert clipped < 0.9 * no_clip, f"clipped {clipped:.3g} vs unclipped {no_clip:.3g}"


def test_search_rejects_bad_widths():
    x = make_outlier_activations(64)
    with pytest.raises(QuantizationError, match="does not read the 256 input channels"):
        search_scales(x, [make_weight(64, in_features=128)], bits=4, group_size=128)
    with pytest.raises(QuantizationError, match="group size 96 does not divide"):
        search_scales(x, [make_weight(64)], bits=4, group_size=96)
    with pytest.raises(QuantizationError, match="activations have 256 channels"):
        search_clip(x, make_weight(64, in_features=128), bits=4, group_size=128)


# ------------------------------------------------------------------------------------------ fold


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama's RMSNorm: weight * h / rms(h)."""
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def positive_scales(width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(width, generator=g, dtype=torch.float64))  # spans ~0.05..20


def test_fold_into_norm_preserves_qkv_outputs_exactly():
    g = torch.Generator().manual_seed(30)
    h = torch.randn(64, WIDTH, generator=g, dtype=torch.float64)
    norm_w = 1 + 0.1 * torch.randn(WIDTH, generator=g, dtype=torch.float64)
    qkv = [torch.randn(o, WIDTH, generator=g, dtype=torch.float64) for o in (256, 128, 128)]
    s = positive_scales(WIDTH, 31)
    folded = fold_scales(norm_w, None, qkv, s, prev_is_norm=True)
    assert folded.prev_bias is None
    for w, w_new in zip(qkv, folded.linears):
        before = rms_norm(h, norm_w) @ w.t()
        after = rms_norm(h, folded.prev_weight) @ w_new.t()
        torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-9)
    assert not torch.allclose(folded.prev_weight, norm_w)  # the fold did change the tensors


def test_fold_into_layernorm_with_bias():
    g = torch.Generator().manual_seed(32)
    h = torch.randn(16, WIDTH, generator=g, dtype=torch.float64)
    ln_w = torch.randn(WIDTH, generator=g, dtype=torch.float64)
    ln_b = torch.randn(WIDTH, generator=g, dtype=torch.float64)
    fc = torch.randn(96, WIDTH, generator=g, dtype=torch.float64)
    s = positive_scales(WIDTH, 33)
    folded = fold_scales(ln_w, ln_b, [fc], s, prev_is_norm=True)
    before = F.layer_norm(h, (WIDTH,), ln_w, ln_b) @ fc.t()
    after = F.layer_norm(h, (WIDTH,), folded.prev_weight, folded.prev_bias) @ folded.linears[0].t()
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-9)


def test_fold_linear_into_linear_preserves_a_gated_mlp():
    """up_proj -> down_proj: the scales go into up's output rows (and bias) and down's input columns."""
    g = torch.Generator().manual_seed(34)
    inter = 512
    x = torch.randn(32, WIDTH, generator=g, dtype=torch.float64)
    gate = torch.randn(inter, WIDTH, generator=g, dtype=torch.float64)
    up = torch.randn(inter, WIDTH, generator=g, dtype=torch.float64)
    up_b = torch.randn(inter, generator=g, dtype=torch.float64)
    down = torch.randn(WIDTH, inter, generator=g, dtype=torch.float64)
    s = positive_scales(inter, 35)

    def mlp(up_w, up_bias, down_w):
        return (F.silu(x @ gate.t()) * (x @ up_w.t() + up_bias)) @ down_w.t()

    folded = fold_scales(up, up_b, [down], s, prev_is_norm=False)
    torch.testing.assert_close(mlp(folded.prev_weight, folded.prev_bias, folded.linears[0]), mlp(up, up_b, down),
                               rtol=1e-10, atol=1e-9)


def test_fold_keeps_dtypes_and_is_close_in_half_precision():
    g = torch.Generator().manual_seed(36)
    h = torch.randn(8, WIDTH, generator=g)
    norm_w = torch.ones(WIDTH, dtype=torch.float16)
    w = (torch.randn(64, WIDTH, generator=g) * 0.05).half()
    s = positive_scales(WIDTH, 37).float()
    folded = fold_scales(norm_w, None, [w], s, prev_is_norm=True)
    assert folded.prev_weight.dtype == torch.float16 and folded.linears[0].dtype == torch.float16
    before = rms_norm(h, norm_w.float()) @ w.float().t()
    after = rms_norm(h, folded.prev_weight.float()) @ folded.linears[0].float().t()
    torch.testing.assert_close(after, before, rtol=2e-3, atol=2e-3)  # two fp16 roundings


def test_fold_refuses_a_width_mismatch():
    """Grouped-query attention: v_proj writes 128 channels but o_proj reads 256, so no per-channel fold exists."""
    v_proj = make_weight(128)
    o_proj = make_weight(WIDTH)
    with pytest.raises(QuantizationError, match="needs_equal_width"):
        fold_scales(v_proj, None, [o_proj], torch.ones(WIDTH), prev_is_norm=False)
    with pytest.raises(QuantizationError, match="one weight per input channel"):
        fold_scales(torch.ones(128), None, [o_proj], torch.ones(WIDTH), prev_is_norm=True)
    with pytest.raises(QuantizationError, match="input columns"):
        fold_scales(torch.ones(WIDTH), None, [make_weight(8, in_features=64)], torch.ones(WIDTH), prev_is_norm=True)


def test_gram_form_of_the_search_loss_equals_the_output_form():
    # tr(ΔW G ΔWᵀ)/outputs with G = XᵀX/n is mean((X ΔWᵀ)²): the two forms must agree on any candidate.
    from pipeline.quant.awq import _gram_loss, _output_loss

    x = make_outlier_activations(3000, seed=21)
    ws = [make_weight(96, seed=22), make_weight(32, seed=23)]
    gram = _gram_loss(x, ws, torch.device("cpu"), chunk=1024)  # several chunks
    direct = _output_loss(x.float(), ws)
    for seed in range(3):
        cand = [w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) for w in ws]
        assert gram(cand) == pytest.approx(direct(cand), rel=1e-4)
    assert gram(ws) == 0.0 and direct(ws) == 0.0
