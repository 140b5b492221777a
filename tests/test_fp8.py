"""FP8 (e4m3) weights: the tensor functions, both checkpoint layouts, the runtime linear and the stage end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import QuantizationError
from pipeline.formats import fp8 as fmt
from pipeline.quant import fp8 as q
from tests.conftest import write_recipe


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ---------------------------------------------------------------------------------------------- tensor functions


def test_per_channel_scale_is_amax_over_448_and_codes_are_the_rounded_quotient():
    w = randn(48, 256, seed=1)
    w_fp8, scale = q.quantize_fp8_per_channel(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and scale.shape == (48, 1) and scale.dtype == torch.float32
    assert torch.equal(scale, w.abs().amax(dim=1, keepdim=True) / 448)
    assert torch.equal(bits(w_fp8), bits((w / scale).to(torch.float8_e4m3fn)))
    assert float(w_fp8.float().abs().amax()) == 448.0  # each row's largest weight lands on the top code
    # e4m3 has 3 mantissa bits: relative error at most 2**-4 above the subnormal range (2**-6 * scale).
    err = (q.dequantize_fp8(w_fp8, scale) - w).abs()
    assert bool((err <= torch.maximum(w.abs() * 2**-4, scale * 2**-9)).all())


def test_block_scales_cover_partial_blocks_like_zero_padding():
    w = randn(200, 300, seed=2)  # 2 x 3 blocks, the last row and column of blocks partial
    w_fp8, scale = q.quantize_fp8_block(w)
    assert scale.shape == (2, 3) == q.block_grid((200, 300))
    for i in range(2):
        for j in range(3):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert scale[i, j] == blk.abs().amax() / 448, (i, j)
    expanded = q.expand_block_scales(scale, (200, 300))
    assert expanded.shape == (200, 300) and expanded[199, 299] == scale[1, 2] and expanded[127, 128] == scale[0, 1]
    assert torch.equal(bits(w_fp8), bits((w / expanded).to(torch.float8_e4m3fn)))


def test_zero_blocks_and_channels_get_a_positive_scale_and_zero_codes():
    w = randn(256, 256, seed=3)
    w[:128, 128:] = 0
    w[5] = 0
    w_fp8, scale = q.quantize_fp8_block(w)
    assert scale[0, 1] == torch.finfo(torch.float32).eps and bool((scale > 0).all())
    assert bool((w_fp8[:128, 128:].float() == 0).all())
    _, ch_scale = q.quantize_fp8_per_channel(w)
    assert ch_scale[5, 0] == torch.finfo(torch.float32).eps
    assert bool(torch.isfinite(q.fake_quantize_fp8(w, q.BLOCK)).all())


def test_values_beyond_the_grid_saturate_instead_of_becoming_nan():
    x = torch.tensor([[1.0, -1000.0, 500.0]])
    assert q.cast_fp8(x, torch.tensor(1.0)).float().tolist() == [[1.0, -448.0, 448.0]]


def test_per_token_activation_scales_and_their_floor():
    x = randn(6, 256, seed=4) * 50
    x[2] = 0
    x_fp8, s = q.quantize_activations_per_token(x)
    assert s.shape == (6, 1)
    assert torch.equal(s[[0, 1, 3]], x[[0, 1, 3]].abs().amax(dim=1, keepdim=True) / 448)
    assert s[2, 0] == q.MIN_ACT_SCALE == 1 / (448 * 512)  # vLLM / FBGEMM min_scaling_factor
    assert bool((x_fp8[2].float() == 0).all())
    # 1x128 groups (block weights): one scale per token and group; a width of 300 leaves a partial last group.
    x = randn(3, 300, seed=5)
    xg, sg = q.quantize_activations_per_token(x, group=128)
    assert sg.shape == (3, 3) and sg[1, 2] == x[1, 256:].abs().amax() / 448
    back = q.dequantize_activations(xg, sg, group=128)
    assert back.shape == x.shape and float((back - x).abs().max()) <= float(x.abs().max()) * 2**-4


# ------------------------------------------------------------------------------------------- checkpoint layouts


@pytest.mark.parametrize("layout, block, scale_name", [
    ("fp8", True, "weight_scale_inv"), ("fp8", False, "weight_scale_inv"),
    ("compressed-tensors", True, "weight_scale"), ("compressed-tensors", False, "weight_scale"),
])
def test_pack_unpack_through_safetensors_keeps_the_fp8_bits(tmp_path, layout, block, scale_name):
    from safetensors.torch import load_file, save_file

    w = randn(320, 384, seed=6)
    b = (q.BLOCK if block else None)
    w_fp8, scale = q.quantize_fp8_block(w) if block else q.quantize_fp8_per_channel(w)
    packed = fmt.pack(w_fp8, scale, layout, b, bias=torch.ones(320, dtype=torch.float16))
    assert set(packed) == {"weight", scale_name, "bias"}
    assert packed["weight"].dtype == torch.float8_e4m3fn and packed[scale_name].dtype == torch.float32
    assert tuple(packed[scale_name].shape) == ((3, 3) if block else (320, 1))
    save_file(packed, tmp_path / "t.safetensors")
    qc = fmt.quantization_config(block, layout)
    w_back, scale_back, block_back = fmt.unpack(load_file(tmp_path / "t.safetensors"), qc)
    assert torch.equal(bits(w_back), bits(w_fp8)) and torch.equal(scale_back, scale) and block_back == b


def test_quant_method_fp8_config_is_what_the_block_loaders_read():
    assert fmt.quantization_config(True) == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"]}
    per_channel = fmt.quantization_config(False, ignore=["lm_head", "model.layers.0.mlp.down_proj"])
    assert "weight_block_size" not in per_channel and per_channel["weight_scale_granularity"] == "channel"
    assert per_channel["modules_to_not_convert"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    assert fmt.read_quantization_config(per_channel) == ("fp8", None)
    assert fmt.read_quantization_config(fmt.quantization_config(True)) == ("fp8", (128, 128))


def test_per_channel_quant_method_fp8_is_refused_by_the_engines_that_read_blocks_only():
    """TensorRT-LLM is not among them: its target converts per-channel FP8 to ModelOpt's FP8_PER_CHANNEL_PER_TOKEN."""
    from pipeline.targets import FormatSettings, check_target_loads

    channel, block = FormatSettings("fp8", 8, fp8_block=False), FormatSettings("fp8", 8, fp8_block=True)
    for target in ("lmdeploy-pytorch", "turbomind", "vllm", "sglang"):
        why = check_target_loads(target, channel)
        assert why and "128x128 weight blocks (fp8.block: true)" in why and "transformers" in why, target
        block_why = check_target_loads(target, block) or ""
        assert "blocks" not in block_why, target  # blocks pass the fp8 rule (the row may still be unbuilt)
    assert check_target_loads("transformers", channel) is None and check_target_loads("transformers", block) is None
    assert check_target_loads("transformers", FormatSettings("ct-fp8", 8, fp8_block=False)) is None


def test_format_errors_name_the_problem():
    w_fp8, scale = q.quantize_fp8_per_channel(randn(16, 128))
    with pytest.raises(QuantizationError, match=r"expected \(1, 1\)"):
        fmt.pack(w_fp8, scale, "fp8", q.BLOCK)
    with pytest.raises(QuantizationError, match="float8_e4m3fn"):
        fmt.pack(w_fp8.float(), scale, "fp8", None)
    with pytest.raises(QuantizationError, match="zero, negative"):
        fmt.pack(w_fp8, torch.zeros_like(scale), "fp8", None)
    with pytest.raises(QuantizationError, match=r"lacks \['weight_scale_inv'\]"):
        fmt.unpack({"weight": w_fp8, "weight_scale": scale}, fmt.quantization_config(False))
    with pytest.raises(QuantizationError, match="activation_scheme: static"):
        fmt.read_quantization_config({"quant_method": "fp8", "activation_scheme": "static"})
    with pytest.raises(QuantizationError, match="layout must be one of"):
        fmt.pack(w_fp8, scale, "modelopt", None)


def test_compressed_tensors_package_parses_our_configs_and_agrees_on_the_codes():
    """Cross-check against the real package (skipped where compressed-tensors is not installed)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    for block, preset in ((False, "FP8_DYNAMIC"), (True, "FP8_BLOCK")):
        parsed = QuantizationConfig.model_validate(fmt.quantization_config(block, "compressed-tensors"))
        scheme, ref = parsed.config_groups["group_0"], preset_name_to_scheme(preset, ["Linear"])
        assert scheme.weights == ref.weights and scheme.input_activations == ref.input_activations, preset
        assert parsed.format == "float-quantized" and parsed.ignore == ["lm_head"]

    w = randn(200, 300, seed=7)
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    w_fp8, scale = q.quantize_fp8_per_channel(w)
    their_scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
    assert torch.equal(their_scale, scale)
    assert torch.equal(bits(quantize(x=w, scale=scale, zero_point=None, args=args, dtype=torch.float8_e4m3fn)),
                       bits(w_fp8))
    assert torch.equal(dequantize(x_q=w_fp8, scale=scale, args=args), q.dequantize_fp8(w_fp8, scale))

    args = preset_name_to_scheme("FP8_BLOCK", ["Linear"]).weights
    w_fp8, scale = q.quantize_fp8_block(w)
    theirs = quantize(x=w, scale=scale, zero_point=None, args=args, dtype=torch.float8_e4m3fn)
    assert torch.equal(bits(theirs), bits(w_fp8))
    assert torch.equal(dequantize(x_q=w_fp8, scale=scale, args=args), q.dequantize_fp8(w_fp8, scale, q.BLOCK))


# ------------------------------------------------------------------------------------------------------ runtime


def _reference(x, w_fp8, scale, block, act_quant=True):
    group = block[1] if block else None
    if act_quant:
        x = q.dequantize_activations(*q.quantize_activations_per_token(x, group), group)
    return x @ q.dequantize_fp8(w_fp8, scale, block).t()


@pytest.mark.parametrize("block", [None, (128, 128)])
def test_fp8_linear_dequantize_path_is_the_engines_math(block):
    from pipeline.engines.fp8_linear import Fp8Linear

    w = randn(256, 384, seed=8)
    w_fp8, scale = q.quantize_fp8_block(w) if block else q.quantize_fp8_per_channel(w)
    bias = randn(256, seed=9)
    lin = Fp8Linear(w_fp8, scale, block, bias)
    assert lin.kernel == "dequantize" and lin.weight.dtype == torch.float8_e4m3fn  # "auto" on the CPU
    x = randn(2, 5, 384, seed=10) * 40
    assert torch.allclose(lin(x), _reference(x.reshape(10, 384), w_fp8, scale, block).reshape(2, 5, 256) + bias,
                          rtol=0, atol=1e-6)
    weight_only = Fp8Linear(w_fp8, scale, block, act_quant=False)
    assert torch.allclose(weight_only(x), x @ q.dequantize_fp8(w_fp8, scale, block).t(), rtol=0, atol=1e-6)
    assert lin(x[:0]).shape == (0, 5, 256)


def test_fp8_linear_scaled_mm_path_runs_rowwise_scales():
    """torch 2.13's CPU build has _scaled_mm with row-wise scales: the same code path as CUDA, checked here."""
    from pipeline.engines.fp8_linear import Fp8Linear

    w_fp8, scale = q.quantize_fp8_per_channel(randn(256, 384, seed=11))
    try:
        lin = Fp8Linear(w_fp8, scale, kernel="scaled-mm")
    except RuntimeError as e:
        pytest.skip(f"this torch has no CPU row-wise _scaled_mm: {e}")
    x = randn(7, 384, seed=12) * 40
    ref = _reference(x, w_fp8, scale, None)
    assert torch.allclose(lin(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="block-scaled"):
        Fp8Linear(*q.quantize_fp8_block(randn(256, 384)), block=q.BLOCK, kernel="scaled-mm")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_linear_scaled_mm_on_cuda_matches_the_dequantized_reference(dtype):
    from pipeline.engines.fp8_linear import Fp8Linear

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need sm89+")
    w_fp8, scale = q.quantize_fp8_per_channel(randn(1024, 2048, seed=13))
    bias = randn(1024, seed=14)
    lin = Fp8Linear(w_fp8, scale, bias=bias, device="cuda", dtype=dtype)
    assert lin.kernel == "scaled-mm", lin.fallback_reason
    x = (randn(33, 2048, seed=15) * 40).to("cuda", dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (33, 1024)
    # The activations are quantized on the GPU exactly as on the CPU (same codes, same scales) ...
    x_fp8, x_scale = q.quantize_activations_per_token(x)
    cpu_fp8, cpu_scale = q.quantize_activations_per_token(x.float().cpu())
    assert torch.equal(x_scale.cpu(), cpu_scale)
    assert torch.equal(x_fp8.cpu().view(torch.uint8), cpu_fp8.view(torch.uint8))
    # ... so what is left is the GEMM: fp32 accumulation, one bf16/fp16 rounding of the output (2**-8 relative)
    # and of the bias add.
    ref = _reference(x.float().cpu(), w_fp8, scale, None) + bias
    assert torch.allclose(y.float().cpu(), ref, rtol=2**-7, atol=2**-7 * float(ref.abs().max()))
    block = Fp8Linear(*q.quantize_fp8_block(randn(1024, 2048, seed=16)), block=q.BLOCK, device="cuda", dtype=dtype)
    assert block.kernel == "dequantize" and block(x).shape == (33, 1024)


# ------------------------------------------------------------------------------------- the stage, end to end

RECIPE = """\
name: fp8
model: {{source: {model}}}
quantize: {{method: fp8, fp8: {{ignore: [lm_head, layers.3.mlp.down_proj]}}}}
compile: {{target: transformers, device: cpu}}
eval: {{text: {eval}, seq_len: 128, max_tokens: 512}}
matrix: {{quantize.fp8.block: [false, true], quantize.fp8.layout: [fp8, compressed-tensors]}}
"""


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory):
    from pipeline.artifacts import MANIFEST
    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("fp8")
    res = CliRunner().invoke(main, ["run", str(write_recipe(tmp, RECIPE)), "-o", str(tmp / "out")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    runs: dict[str, dict] = {}
    for path in (tmp / "out" / "fp8").glob(f"*/{MANIFEST}"):
        m = json.loads(path.read_text())
        for variant in m["variants"]:
            runs.setdefault(variant, {})[m["stage"]] = m | {"dir": path.parent}
    return runs


def test_the_stage_writes_every_layout_and_stays_close_to_the_reference(fp8_runs):
    from safetensors import safe_open

    assert set(fp8_runs) == {"blockfalse-fp8", "blockfalse-compressed-tensors", "blocktrue-fp8",
                             "blocktrue-compressed-tensors"}
    for variant, stages in fp8_runs.items():
        block, layout = variant.startswith("blocktrue"), variant.split("-", 1)[1]
        qm = stages["quantize"]["metrics"]
        expected_format = "fp8" if layout == "fp8" else "ct-fp8"
        assert (qm["quantized_linears"], qm["kept_linears"], qm["format"]) == (27, 1, expected_format)
        folder = stages["quantize"]["dir"] / "model"
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert fmt.read_quantization_config(qc) == (layout, (128, 128) if block else None)
        declared = qc.get("modules_to_not_convert", qc.get("ignore"))
        assert declared == ["lm_head", "model.layers.3.mlp.down_proj"]
        scale_name = fmt.scale_name(layout)
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names = {k.removeprefix("model.layers.0.mlp.gate_proj.") for k in f.keys()
                     if k.startswith("model.layers.0.mlp.gate_proj.")}
            assert names == {"weight", scale_name}
            w = f.get_tensor("model.layers.0.mlp.gate_proj.weight")
            s = f.get_tensor(f"model.layers.0.mlp.gate_proj.{scale_name}")
            assert w.dtype == torch.float8_e4m3fn and w.shape == (768, 256) and s.dtype == torch.float32
            assert tuple(s.shape) == ((6, 2) if block else (768, 1))
            assert f.get_tensor("model.layers.3.mlp.down_proj.weight").dtype == torch.float16  # ignored
            assert f.get_tensor("lm_head.weight").dtype == torch.float16
        assert (folder / "tokenizer.json").is_file()
        em = stages["evaluate"]["metrics"]
        # 8-bit floating point weights and activations: perplexity within 0.5% of the reference, KL tiny.
        assert abs(em["ppl_increase_pct"]) < 0.5 and em["kl_mean"] < 2e-3 and em["top1_agreement"] > 0.95, variant


def test_the_stage_codes_equal_the_tensor_functions(fp8_runs):
    from safetensors import safe_open

    from tests.conftest import TINY_MODEL

    with safe_open(str(TINY_MODEL / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
    for variant, quantize in (("blocktrue-fp8", q.quantize_fp8_block), ("blockfalse-compressed-tensors",
                                                                         q.quantize_fp8_per_channel)):
        folder = fp8_runs[variant]["quantize"]["dir"] / "model"
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            tensors = {k.rpartition(".")[2]: f.get_tensor(k) for k in f.keys()
                       if k.startswith("model.layers.1.self_attn.k_proj.")}
        w_fp8, scale, _ = fmt.unpack(tensors, qc)
        ref_fp8, ref_scale = quantize(w)
        assert torch.equal(bits(w_fp8), bits(ref_fp8)) and torch.equal(scale, ref_scale), variant


def test_per_channel_fp8_for_vllm_is_refused_before_any_work(tmp_path):
    from pipeline.cli import main

    text = "\n".join(line for line in RECIPE.splitlines() if not line.startswith("matrix"))
    recipe = write_recipe(tmp_path, text.replace("target: transformers, device: cpu", "target: vllm"))
    res = CliRunner().invoke(main, ["validate", str(recipe)])
    assert res.exit_code != 0
    assert "128x128 weight blocks (fp8.block: true)" in res.output, res.output


def test_block_grid_is_ceil_division():
    assert q.block_grid((1, 1)) == (1, 1) and q.block_grid((129, 256)) == (2, 2)
    assert q.block_grid((4096, 11008)) == (32, math.ceil(11008 / 128))
