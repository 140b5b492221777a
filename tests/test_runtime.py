"""The runtime: Int4Linear on PyTorch's int4 kernels (and its fallback), and load_model on quantized folders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_rtn import tiny_llama_folder

from pipeline.engines import qlinear
from pipeline.engines.qlinear import (
    KERNEL_CPU,
    KERNEL_CUDA,
    KERNEL_DEQUANT,
    RUNTIME_FORMATS,
    Int4Linear,
    build_linear,
)
from pipeline.engines.transformers_engine import load_model
from pipeline.errors import ModelFolderError, QuantizationError
from pipeline.formats import awq_gemm
from pipeline.formats.checkpoint import open_checkpoint
from pipeline.quant.arch import arch_spec
from pipeline.quant.primitives import quantize_groupwise
from pipeline.quant.rtn import quantize_checkpoint_rtn


def _qweight(out_features, in_features, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_groupwise(torch.randn(out_features, in_features, generator=g), 4, group_size)
    qw.scales = qw.scales.half().float()  # what an AWQ folder holds
    return qw


def assert_within_dtype(y: torch.Tensor, expected: torch.Tensor, compute_dtype: torch.dtype, n_eps: float):
    """``max |y - expected| <= n_eps * eps(compute_dtype) * max |expected|``.

    For PyTorch's packed int4 CPU kernel, whose numerics are not ours and differ by CPU: aten picks its AVX512,
    AVX2 or scalar code (and oneDNN brgemm/AMX for bf16 where present) at run time, each with its own summation
    order, FMA use and bf16 conversions. What is ours, the codes and scales it is given, is checked exactly
    elsewhere (test_awq_gemm.py, the gptq tests, ``dequantized_weight``). Its error is rounding in the compute
    dtype, so it is bounded relative to the output's scale, not element by element (an entry near 0 is a
    cancelling sum of large products): fp32 accumulation of K products drifts like sqrt(K) unit roundoffs, and a
    bf16 kernel rounds its input, scales and output to 8 significant bits (eps = 2**-7).
    """
    bound = n_eps * torch.finfo(compute_dtype).eps * expected.abs().max()
    err = (y.float() - expected).abs().max()
    assert err <= bound, f"max |error| {err:.3g} > {n_eps:g} eps({compute_dtype}) * max |expected| = {bound:.3g}"


@pytest.mark.parametrize("shape", [(64, 256, 128), (32, 96, 32), (768, 256, 64), (48, 512, 256)])
def test_int4_linear_cpu_kernel_matches_dequantized_matmul(shape):
    out_features, in_features, group_size = shape
    qw = _qweight(out_features, in_features, group_size)
    bias = torch.randn(out_features)
    lin = Int4Linear(qw, bias=bias, kernel=KERNEL_CPU)  # float32 through the packed kernel, forced
    assert lin.kernel == KERNEL_CPU and lin.weight_int4pack.dtype == torch.uint8
    x = torch.randn(3, 5, in_features)
    expected = x @ qw.dequantize().T + bias
    y = lin(x)
    assert y.shape == (3, 5, out_features) and y.dtype == torch.float32
    # fp32 kernel: 2 sqrt(K) eps. Measured on AMD EPYC avx2/fma/f16c (torch's AVX2 path): at most 0.2 of that.
    assert_within_dtype(y, expected, torch.float32, n_eps=2 * math.sqrt(in_features))
    assert lin(torch.zeros(0, in_features)).shape == (0, out_features)


def test_int4_linear_auto_uses_the_cpu_kernel_in_bfloat16_and_exact_dequantize_in_float32():
    qw = _qweight(64, 256, 128, seed=1)
    x = torch.randn(4, 256)
    expected = x @ qw.dequantize().T
    lin_bf16 = Int4Linear(qw, dtype=torch.bfloat16)
    assert lin_bf16.kernel == KERNEL_CPU and lin_bf16.scales_and_zeros.dtype == torch.bfloat16
    y = lin_bf16(x.bfloat16())
    assert y.dtype == torch.bfloat16
    # bf16 kernel (input, scales and output in bf16, fp32 accumulation): 2 eps of bf16 = 1.6% of the output
    # scale. Measured on AMD EPYC avx2/fma/f16c: 0.43 eps.
    assert_within_dtype(y, expected, torch.bfloat16, n_eps=2)

    lin_fp32 = Int4Linear(qw)
    assert lin_fp32.kernel == KERNEL_DEQUANT and "bfloat16 only" in lin_fp32.fallback_reason
    assert lin_fp32.w_packed.dtype == torch.uint8 and tuple(lin_fp32.w_packed.shape) == (64, 128)  # 4 bits/weight
    assert torch.equal(lin_fp32.dequantized_weight(), qw.dequantize())
    torch.testing.assert_close(lin_fp32(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape, reason",
    [((8, 256, 128), "out features 8 not a multiple of 16"), ((32, 64, 16), "group size 16 not in")],
)
def test_int4_linear_falls_back_to_dequantize_for_unsupported_shapes(shape, reason, caplog):
    out_features, in_features, group_size = shape
    qw = _qweight(out_features, in_features, group_size, seed=2)
    with caplog.at_level("DEBUG", logger="pipeline.engines.qlinear"):
        lin = Int4Linear(qw, kernel=KERNEL_CPU)
    assert lin.kernel == KERNEL_DEQUANT and reason in lin.fallback_reason
    assert "dequantize on the fly" in caplog.text and reason in caplog.text
    x = torch.randn(7, in_features)
    torch.testing.assert_close(lin(x), x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)


def test_int4_linear_with_permuted_groups_uses_g_idx():
    qw = _qweight(32, 128, 32, seed=4)
    qw.g_idx = (torch.randperm(128) // 32).to(torch.int32)
    lin = Int4Linear(qw, dtype=torch.bfloat16)
    assert lin.kernel == KERNEL_DEQUANT and "g_idx" in lin.fallback_reason
    lin = Int4Linear(qw)
    x = torch.randn(2, 128)
    torch.testing.assert_close(lin(x), x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)


def test_registry_builds_awq_linears_and_names_supported_methods():
    qw = _qweight(64, 256, 128, seed=5)
    tensors = awq_gemm.pack(qw)
    lin = build_linear("awq", tensors, awq_gemm.quantization_config(4, 128), "cpu", torch.float32)
    assert isinstance(lin, Int4Linear) and "awq" in RUNTIME_FORMATS
    x = torch.randn(3, 256)
    torch.testing.assert_close(lin(x), x @ qw.dequantize().T, rtol=1e-5, atol=1e-4)
    with pytest.raises(QuantizationError, match="lacks tensor"):
        build_linear("awq", {"qweight": tensors["qweight"]}, awq_gemm.quantization_config(), "cpu", torch.float32)
    with pytest.raises(QuantizationError, match="Supported: awq, compressed-tensors, fp8, gptq, smooth_quant"):
        build_linear("nf5", tensors, {}, "cpu", torch.float32)


def test_registry_builds_gptq_and_w8a8_linears():
    from pipeline.engines.int8_linear import Int8Linear
    from pipeline.formats import gptq, w8a8
    from pipeline.quant.primitives import quantize_per_channel_int8

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(9))
    x = torch.randn(3, 256)
    qw = quantize_groupwise(w, 4, 128, sym=True)
    qw.scales = qw.scales.half().float()
    cfg = gptq.quantization_config(4, 128, desc_act=False, sym=True)
    lin = build_linear("gptq", gptq.pack(qw), cfg, "cpu", torch.float32, int4_kernel=KERNEL_CPU)
    assert lin.kernel == KERNEL_CPU
    assert_within_dtype(lin(x), x @ qw.dequantize().T, torch.float32, n_eps=2 * math.sqrt(256))
    qw.g_idx = (torch.randperm(256, generator=torch.Generator().manual_seed(1)) // 128).to(torch.int32)
    lin = build_linear("gptq", gptq.pack(qw), {**cfg, "desc_act": True}, "cpu", torch.float32)
    assert lin.kernel == KERNEL_DEQUANT and lin.g_idx is not None
    torch.testing.assert_close(lin(x), x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)

    w_int8, scale = quantize_per_channel_int8(w)
    direct = Int8Linear(w_int8, scale)(x)
    lin = build_linear("smooth_quant", w8a8.pack_lmdeploy(w_int8, scale), w8a8.quantization_config_lmdeploy(),
                       "cpu", torch.float32)
    assert torch.equal(lin(x), direct)
    ct = w8a8.quantization_config_compressed_tensors()
    lin = build_linear("compressed-tensors", w8a8.pack_compressed_tensors(w_int8, scale), ct, "cpu", torch.float32)
    assert torch.equal(lin(x), direct)
    with pytest.raises(QuantizationError, match="pack-quantized"):
        build_linear("compressed-tensors", {}, {**ct, "format": "pack-quantized"}, "cpu", torch.float32)


def test_load_model_runs_a_gptq_folder(tmp_path):
    from pipeline.formats import gptq
    from pipeline.formats.checkpoint import CheckpointWriter, copy_side_files, write_config

    src = tiny_llama_folder(tmp_path / "src", seed=11, tokenizer=False)
    out = tmp_path / "gptq"
    linears = {f"model.layers.{i}.{lin}.weight" for i in range(2) for lin in arch_spec("LlamaForCausalLM").linears}
    writer = CheckpointWriter(out)
    with open_checkpoint(src) as ck:
        for name in ck.keys():
            if name in linears:
                qw = quantize_groupwise(ck.get(name), 4, 128, sym=True)
                qw.scales = qw.scales.half().float()
                for suffix, t in gptq.pack(qw).items():
                    writer.add(name[: -len("weight")] + suffix, t)
            else:
                writer.add(name, ck.get(name))
    writer.close()
    write_config(src, out, gptq.quantization_config(4, 128, desc_act=False, sym=True))
    copy_side_files(src, out)
    model, _ = load_model(out)
    assert model.quantization_info["kernels"] == {KERNEL_DEQUANT: 14}
    ref = type(model).from_pretrained(src, dtype=torch.float32).eval()
    with open_checkpoint(out) as ck, torch.no_grad():
        for name in linears:
            module = name[: -len(".weight")]
            ref.get_submodule(module).weight.copy_(gptq.unpack(ck.get_prefix(module), 4).dequantize())
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def _dequantized_reference(src, out):
    """The source model with every decoder linear's weight replaced by its dequantized AWQ value (fp32)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    spec = arch_spec("LlamaForCausalLM")
    group_size = json.loads((out / "config.json").read_text())["quantization_config"]["group_size"]
    with open_checkpoint(out) as ck, torch.no_grad():
        for i in range(ref.config.num_hidden_layers):
            for linear in spec.linears:
                t = ck.get_prefix(f"model.layers.{i}.{linear}")
                qw = awq_gemm.unpack(t["qweight"], t["qzeros"], t["scales"], group_size)
                ref.get_submodule(f"model.layers.{i}.{linear}").weight.copy_(qw.dequantize())
    return ref


@pytest.mark.parametrize("tie, int4_kernel", [(False, "auto"), (True, KERNEL_CPU)])
def test_load_model_runs_rtn_folder_like_the_dequantized_model(tmp_path, tie, int4_kernel):
    src = tiny_llama_folder(tmp_path / "src", seed=7, tie_word_embeddings=tie)
    out = tmp_path / "out"
    quantize_checkpoint_rtn(src, out, group_size=64)
    model, tok = load_model(out, int4_kernel=int4_kernel)
    assert not model.training and tok is not None and tok("w1 w2")["input_ids"] == [1, 2]
    expected_kernel = KERNEL_DEQUANT if int4_kernel == "auto" else int4_kernel  # auto in float32 on CPU
    assert model.quantization_info["kernels"] == {expected_kernel: 14}
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight

    ref = _dequantized_reference(src, out)
    # Rotary inv_freq is a non-persistent buffer: it must be computed, not left empty.
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        expected = ref(ids).logits
    assert torch.isfinite(logits).all()
    # fp32 throughout (the CPU int4 kernel where forced, else exact dequantize): 100 eps of fp32 relative to the
    # logits' scale. Measured with the kernel on AMD EPYC avx2/fma/f16c: 4.3 eps (9.8e-7 at max |logit| 1.9).
    assert_within_dtype(logits, expected, torch.float32, n_eps=100)
    # ...and quantization did change the model (the comparison above is not trivially between identical weights).
    src_model = type(ref).from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (src_model(ids).logits - logits).abs().max() > 1e-3


def test_load_model_in_bfloat16_runs_the_cpu_int4_kernel(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", seed=8, tokenizer=False)
    out = tmp_path / "out"
    quantize_checkpoint_rtn(src, out, group_size=128)
    model, _ = load_model(out, dtype=torch.bfloat16)
    assert model.quantization_info["kernels"] == {KERNEL_CPU: 14}
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = _dequantized_reference(src, out)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits.float()
        expected = ref(ids).logits
    assert torch.isfinite(logits).all()
    # The whole model in bf16 (the int4 kernel, and attention, norms, embeddings): 6 eps of bf16 = 4.7% of the
    # logits' scale. Measured on AMD EPYC avx2/fma/f16c: 0.88 eps (0.0089 at max |logit| 1.29).
    assert_within_dtype(logits, expected, torch.bfloat16, n_eps=6)


def test_load_model_plain_folder_and_pickle_refusal(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", tokenizer=False)
    model, tok = load_model(src)
    assert tok is None and not any(isinstance(m, Int4Linear) for m in model.modules())
    pickled = tiny_llama_folder(tmp_path / "pickled", safetensors=False, tokenizer=False)
    with pytest.raises(ModelFolderError, match="allow_pickle: true"):
        load_model(pickled)


def test_load_model_names_supported_methods_for_an_unknown_quant_method(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", tokenizer=False)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "exl9", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"quant_method 'exl9'.*Supported: awq"):
        load_model(src)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int4_linear_cuda_kernel_matches_dequantized_matmul():
    for out_features, in_features, group_size in [(256, 512, 128), (64, 96, 32), (768, 256, 64)]:
        qw = _qweight(out_features, in_features, group_size, seed=out_features)
        lin = Int4Linear(qw, bias=torch.randn(out_features), device="cuda", dtype=torch.float16)
        assert lin.kernel == KERNEL_CUDA, lin.fallback_reason
        x = torch.randn(5, in_features, device="cuda")
        expected = x @ qw.dequantize().cuda().T + lin.bias.float()
        y = lin(x.half()).float()
        assert (y - expected).abs().max() <= 0.02 * expected.abs().max()


def test_kernel_summary_counts_paths():
    a = Int4Linear(_qweight(64, 256, 128), dtype=torch.bfloat16)
    b = Int4Linear(_qweight(64, 256, 128))
    assert qlinear.kernel_summary(torch.nn.Sequential(a, b)) == {KERNEL_CPU: 1, KERNEL_DEQUANT: 1}
