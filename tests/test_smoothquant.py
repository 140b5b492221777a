"""SmoothQuant W8A8: smoothing statistics and scales, the int8 runtime linear, and both checkpoint layouts."""

from __future__ import annotations

import pytest
import torch

from pipeline.engines.int8_linear import KERNEL_FLOAT, KERNEL_INT_MM, Int8Linear, int8_matmul
from pipeline.errors import QuantizationError
from pipeline.formats import w8a8
from pipeline.quant.primitives import quantize_per_channel_int8
from pipeline.quant.smoothquant import (
    quantize_per_token_int8,
    smooth_and_quantize,
    smooth_scales,
    update_act_absmax,
)

from tests.conftest import OUTLIER_WIDTH as WIDTH
from tests.conftest import make_outlier_activations, make_weight


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


# ------------------------------------------------------------------------------------------ statistics and scales


def test_act_absmax_accumulates_over_batches_and_leading_dims():
    batches = [make_outlier_activations(n, seed=i).reshape(1, n, WIDTH) for i, n in enumerate((5, 40, 17))]
    acc = None
    for b in batches:
        acc = update_act_absmax(acc, b)
    assert acc.shape == (WIDTH,) and acc.dtype == torch.float32
    assert torch.equal(acc, torch.cat(batches, dim=1).abs().amax(dim=(0, 1)))


def test_smooth_scales_follow_equation_4():
    # s_j = max|X_j|^a / max|W_j|^(1-a), max over the rows of all linears (here two).
    act = torch.tensor([4.0, 1.0, 0.25, 9.0])
    w1 = torch.tensor([[1.0, -4.0, 0.5, 0.0], [0.5, 1.0, -2.0, 0.0]])
    w2 = torch.tensor([[-0.25, 0.0, 0.0, 1.0]])
    s = smooth_scales(act, [w1, w2], alpha=0.5)
    expected = torch.tensor([2.0 / 1.0, 1.0 / 2.0, 0.5 / 2**0.5, 3.0 / 1.0])
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(smooth_scales(act, [w1, w2], alpha=1.0), act)  # alpha 1: all onto the weights
    torch.testing.assert_close(smooth_scales(act, [w1, w2], alpha=0.0), 1 / torch.tensor([1.0, 4.0, 2.0, 1.0]))


def test_mean_weight_statistic_is_lmdeploys_row_normalised_mean():
    # lmdeploy get_weight_scale(w, -1): mean over rows of |W| / max_row|W|, over the linears stacked.
    act = torch.tensor([4.0, 1.0, 0.25, 9.0])
    w1 = torch.tensor([[1.0, -4.0, 0.5, 0.0], [0.5, 1.0, -2.0, 0.0]])
    w2 = torch.tensor([[-0.25, 0.0, 0.0, 1.0]])
    w_stat = torch.tensor([(0.25 + 0.25 + 0.25) / 3, (1.0 + 0.5 + 0.0) / 3, (0.125 + 1.0 + 0.0) / 3, (0 + 0 + 1.0) / 3])
    s = smooth_scales(act, [w1, w2], alpha=0.5, weight_stat="mean")
    torch.testing.assert_close(s, act.sqrt() / w_stat.sqrt(), rtol=1e-5, atol=0)
    with pytest.raises(QuantizationError, match="'median' is not known; choose 'mean'"):
        smooth_scales(act, [w1, w2], weight_stat="median")


def test_silent_channels_and_dead_weight_columns_are_clamped():
    act = torch.tensor([0.0, 2.0, 2.0])
    w = torch.tensor([[1.0, 0.0, 1.0]])
    s = smooth_scales(act, [w], alpha=0.5)
    assert float(s[0]) == 1.0  # never-active channel: nothing to smooth, norm weight left alone
    assert float(s[1]) == pytest.approx(2**0.5 / 1e-5**0.5)  # max|W| clamped at 1e-5 as in the official code
    assert torch.isfinite(s).all()


def test_smooth_scales_reject_bad_input():
    with pytest.raises(QuantizationError, match="alpha must be in"):
        smooth_scales(torch.ones(WIDTH), [make_weight(8)], alpha=1.5)
    with pytest.raises(QuantizationError, match="does not read the 256 channels"):
        smooth_scales(torch.ones(WIDTH), [make_weight(8, in_features=128)])


# ------------------------------------------------------------------------------------------ W8A8 quality


def test_smoothing_lowers_w8a8_error_on_outlier_activations():
    """Measured: smoothed W8A8 error is ~0.09x the unsmoothed one at alpha 0.5; 0.25 leaves a wide margin."""
    x_calib, x_eval = make_outlier_activations(512, seed=1), make_outlier_activations(512, seed=2)
    norm_w = 1 + 0.1 * torch.randn(WIDTH, generator=torch.Generator().manual_seed(3))
    h_eval = x_eval / norm_w  # pre-norm-weight activations: the layer computes norm_w * h
    qkv = [make_weight(o, seed=4 + i) for i, o in enumerate((256, 128, 128))]
    reference = [x_eval @ w.t() for w in qkv]

    plain = [Int8Linear(*quantize_per_channel_int8(w))(x_eval) for w in qkv]
    group = smooth_and_quantize(norm_w, None, qkv, update_act_absmax(None, x_calib), prev_is_norm=True, alpha=0.5)
    x_smoothed = h_eval * group.prev_weight  # the folded norm now emits x / s
    smoothed = [Int8Linear(q, sc)(x_smoothed) for q, sc in zip(group.w_int8, group.w_scales)]

    err_plain = sum(mse(y, r) for y, r in zip(plain, reference))
    err_smooth = sum(mse(y, r) for y, r in zip(smoothed, reference))
    assert err_smooth < 0.25 * err_plain, f"smoothed {err_smooth:.3g} vs plain {err_plain:.3g}"
    assert all(q.dtype == torch.int8 for q in group.w_int8)
    assert all(sc.shape == (w.shape[0], 1) and sc.dtype == torch.float32 for sc, w in zip(group.w_scales, qkv))


def test_smooth_and_quantize_folds_into_a_previous_linear():
    """up_proj -> down_proj: up's output rows are divided by s, and down's dequantized int8 weight is W s."""
    x = make_outlier_activations(64, seed=6).double()
    up, down = make_weight(512, seed=7).double(), make_weight(WIDTH, 512, seed=8).double()
    hidden = x @ up.t()
    group = smooth_and_quantize(up, None, [down], update_act_absmax(None, hidden), prev_is_norm=False)
    assert group.scales.shape == (512,) and group.prev_bias is None
    torch.testing.assert_close(group.prev_weight, up / group.scales.double().unsqueeze(1), rtol=1e-12, atol=0)
    w_smoothed = group.w_int8[0].double() * group.w_scales[0].double()
    out = (x @ group.prev_weight.t()) @ w_smoothed.t()
    ref = hidden @ down.t()
    rel = float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert rel < 0.015  # only the int8 weight rounding remains (measured 0.0075; activations not quantized here)


# ------------------------------------------------------------------------------------------ runtime


def test_per_token_quantization_matches_lmdeploy_reference():
    x = torch.tensor([[0.5, -1.27, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.0049, 0.0051]])
    q, scale = quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale[:, 0], torch.tensor([1.27 / 127, 1e-7 / 127, 2.0 / 127]))
    assert q[0].tolist() == [50, -127, 0, 10]
    assert q[1].tolist() == [0, 0, 0, 0]
    assert q[2].tolist() == [-127, 64, 0, 0]  # 63.5 rounds half to even, 0.31 and 0.32 round to 0


def test_int8_linear_matches_its_dequantized_arithmetic_exactly():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 9, WIDTH, generator=g)
    w, b = make_weight(96, seed=10), torch.randn(96, generator=g)
    w_int8, w_scale = quantize_per_channel_int8(w)
    layer = Int8Linear(w_int8, w_scale, b)
    y = layer(x)
    assert y.shape == (2, 9, 96) and y.dtype == torch.float32
    x_int8, a = quantize_per_token_int8(x.reshape(-1, WIDTH))
    expected = (x_int8.double() @ w_int8.double().t()) * a.double() * w_scale.double().t() + b.double()
    torch.testing.assert_close(y.reshape(-1, 96).double(), expected, rtol=1e-6, atol=1e-6)


def test_int8_linear_is_within_int8_error_of_float():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, WIDTH, generator=g)
    linear = torch.nn.Linear(WIDTH, 128)
    with torch.no_grad():
        linear.weight.copy_(make_weight(128, seed=12))
    y_ref = linear(x).detach()
    y = Int8Linear.from_float(linear)(x)
    rel = (y - y_ref).pow(2).mean().sqrt() / y_ref.pow(2).mean().sqrt()
    # Two int8 roundings (x per token, w per channel) on Gaussian data: ~1% relative RMS error.
    assert 0 < float(rel) < 0.02
    assert Int8Linear.from_float(linear)(x.half()).dtype == torch.float16


@pytest.mark.skipif(not hasattr(torch, "_int_mm"), reason="this torch has no torch._int_mm")
def test_int_mm_path_is_taken_and_equals_the_float_path():
    g = torch.Generator().manual_seed(13)
    x_int8 = torch.randint(-128, 128, (5, 1000), generator=g, dtype=torch.int8)
    w_int8 = torch.randint(-128, 128, (24, 1000), generator=g, dtype=torch.int8)
    acc, kernel = int8_matmul(x_int8, w_int8)
    exact = x_int8.long() @ w_int8.long().t()
    if kernel == KERNEL_INT_MM:
        assert acc.dtype == torch.int32 and torch.equal(acc.long(), exact)
    else:  # an older CPU build without the kernel: the fallback must still be exact at K = 1000
        assert kernel == KERNEL_FLOAT and torch.equal(acc.long(), exact)
    layer = Int8Linear(w_int8, torch.ones(24, 1))
    layer(torch.randn(3, 1000, generator=g))
    assert layer.kernel == kernel


def test_int8_linear_rejects_float_weights():
    with pytest.raises(QuantizationError, match="int8 weight"):
        Int8Linear(make_weight(8), torch.ones(8, 1))
    with pytest.raises(QuantizationError, match="one weight scale per output channel"):
        Int8Linear(torch.zeros(8, 4, dtype=torch.int8), torch.ones(4, 1))


# ------------------------------------------------------------------------------------------ formats


def quantized_linear(out_features: int = 48, seed: int = 14):
    w_int8, scale = quantize_per_channel_int8(make_weight(out_features, seed=seed))
    return w_int8, scale, torch.randn(out_features, generator=torch.Generator().manual_seed(seed)).half()


def test_lmdeploy_layout_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    w_int8, scale, bias = quantized_linear()
    packed = w8a8.pack_lmdeploy(w_int8, scale, bias)
    assert set(packed) == {"weight", "scale", "bias"}
    assert packed["weight"].dtype == torch.int8 and packed["weight"].shape == (48, WIDTH)
    assert packed["scale"].dtype == torch.float32 and packed["scale"].shape == (48, 1)
    assert packed["bias"].dtype == torch.float16
    prefix = "model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.{k}": v for k, v in packed.items()}, tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    w_back, scale_back = w8a8.unpack_lmdeploy({k.removeprefix(prefix + "."): v for k, v in loaded.items()})
    assert torch.equal(w_back, w_int8) and torch.equal(scale_back, scale)
    assert torch.equal(loaded[f"{prefix}.bias"], bias)


def test_compressed_tensors_layout_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    w_int8, scale, _ = quantized_linear(seed=15)
    packed = w8a8.pack_compressed_tensors(w_int8, scale)
    assert set(packed) == {"weight", "weight_scale"}  # symmetric: no weight_zero_point
    assert packed["weight_scale"].dtype == torch.float32 and packed["weight_scale"].shape == (48, 1)
    save_file(packed, tmp_path / "t.safetensors")
    w_back, scale_back = w8a8.unpack_compressed_tensors(load_file(tmp_path / "t.safetensors"))
    assert torch.equal(w_back, w_int8) and torch.equal(scale_back, scale)
    # The model-dtype variant (what llm-compressor writes) keeps the integers exactly.
    half = w8a8.pack_compressed_tensors(w_int8, scale, scale_dtype=torch.float16)
    assert half["weight_scale"].dtype == torch.float16 and torch.equal(w8a8.unpack_compressed_tensors(half)[0], w_int8)


def test_format_errors_name_the_problem():
    w_int8, scale, _ = quantized_linear()
    with pytest.raises(QuantizationError, match="2-D int8 tensor"):
        w8a8.pack_lmdeploy(w_int8.float(), scale)
    with pytest.raises(QuantizationError, match=r"shape \[out, 1\]"):
        w8a8.pack_compressed_tensors(w_int8, scale.reshape(-1))
    with pytest.raises(QuantizationError, match="zero, negative or not finite"):
        w8a8.pack_lmdeploy(w_int8, torch.zeros_like(scale))
    with pytest.raises(QuantizationError, match=r"lacks \['scale'\]"):
        w8a8.unpack_lmdeploy({"weight": w_int8})
    with pytest.raises(QuantizationError, match="non-zero weight_zero_point"):
        w8a8.unpack_compressed_tensors({"weight": w_int8, "weight_scale": scale, "weight_zero_point": scale})


def test_quantization_configs():
    assert w8a8.quantization_config_lmdeploy() == {"quant_method": "smooth_quant", "quant_dtype": "int8"}
    assert w8a8.quantization_config_lmdeploy(["vision"])["modules_to_not_convert"] == ["vision"]
    ct = w8a8.quantization_config_compressed_tensors()
    assert ct["quant_method"] == "compressed-tensors" and ct["format"] == "int-quantized"
    assert ct["ignore"] == ["lm_head"]
    group = ct["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["dynamic"] is False
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True


def test_compressed_tensors_package_parses_our_config_and_agrees_on_the_integers():
    """Cross-check against the real package (optional: skipped where compressed-tensors is not installed)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    parsed = QuantizationConfig.model_validate(w8a8.quantization_config_compressed_tensors())
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights == preset.weights and scheme.input_activations == preset.input_activations
    assert parsed.format == "int-quantized" and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"]

    w = make_weight(48, seed=16)
    w_int8, scale = quantize_per_channel_int8(w)
    theirs = quantize(x=w, scale=scale, zero_point=None, args=preset.weights, dtype=torch.int8)
    assert torch.equal(theirs, w_int8)
    assert torch.equal(dequantize(x_q=w_int8, scale=scale, args=preset.weights), w8a8.dequantize(w_int8, scale))
