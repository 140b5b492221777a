"""The one-token FP8 GEMV (pipeline.engines.fp8_cuda): what it refuses (CPU), and on a GPU (marked gpu) that it
quantizes the token exactly as ``quantize_activations_per_token`` does and sums within float32 rounding of the
float64 product, and that ``Fp8Linear`` takes it for one token."""

from __future__ import annotations

import pytest
import torch

from pipeline.engines import fp8_cuda
from pipeline.quant import fp8 as q


def test_problems_are_named():
    assert "device cpu" in fp8_cuda.problem(64, 4096, torch.device("cpu"))
    assert "K = 4100" in fp8_cuda.problem(64, 4100, torch.device("cuda"))


def test_block_widths_the_kernel_cannot_group_are_named_and_the_reference_is_the_dequantize_path():
    from pipeline.engines.fp8_linear import Fp8Linear

    assert "blocks of 96 columns" in fp8_cuda.problem(64, 4096, torch.device("cuda"), block=(128, 96))
    assert "blocks of 2048 columns" in fp8_cuda.problem(64, 4096, torch.device("cuda"), block=(128, 2048))
    w_fp8, scale = q.quantize_fp8_block(torch.randn(200, 384), q.BLOCK)  # partial blocks in both directions
    x = torch.randn(1, 384) * 5
    lin = Fp8Linear(w_fp8, scale, q.BLOCK, kernel="dequantize")  # float32: fq(x) @ (w * s).T
    ref = fp8_cuda.reference(x, w_fp8, scale, q.BLOCK)
    assert torch.allclose(lin(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_a_linear_built_on_the_cpu_keeps_its_path():
    from pipeline.engines.fp8_linear import Fp8Linear

    lin = Fp8Linear(*q.quantize_fp8_per_channel(torch.randn(64, 256)))
    assert not lin.gemv_cuda and lin(torch.randn(1, 256)).shape == (1, 64)


def _need_fp8_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 conversions need sm89+")


@pytest.mark.gpu
def test_the_token_is_quantized_as_quantize_activations_per_token_does_it():
    """One-hot rows (row i is 1 at column j = i * K / N, scale 1): each output is one activation's e4m3 code times
    the token's scale, one product and no sum, so it must equal torch's quantizer's value rounded to the output
    dtype, bit for bit (magnitudes spread over the e4m3 range, subnormals included; an all-zero token)."""
    _need_fp8_gpu()
    gen = torch.Generator().manual_seed(5)
    for n, k, dtype, spread in [(4096, 4096, torch.bfloat16, 30.0), (4096, 4096, torch.float16, 3.0),
                                (1024, 28672, torch.bfloat16, 1.0), (256, 256, torch.bfloat16, 0.0)]:
        cols = torch.arange(n) * (k // n)
        w = torch.zeros(n, k, device="cuda")
        w[torch.arange(n), cols] = 1.0
        x = (torch.randn(1, k, generator=gen) * spread * torch.rand(1, k, generator=gen) ** 4).to(dtype).cuda()
        y = fp8_cuda.gemv(x, w.to(torch.float8_e4m3fn), torch.ones(n, device="cuda"))
        x_fp8, x_scale = q.quantize_activations_per_token(x)
        assert torch.equal(y, (x_fp8.float() * x_scale)[:, cols].to(dtype)), (k, dtype, spread)


@pytest.mark.gpu
def test_one_token_gemv_is_the_float64_product_of_the_same_codes_and_fp8linear_takes_it():
    _need_fp8_gpu()
    from pipeline.engines.fp8_linear import Fp8Linear

    gen = torch.Generator().manual_seed(6)
    for n, k in [(40, 256), (4096, 4096), (1000, 11008), (512, 28672)]:
        w_fp8, scale = q.quantize_fp8_per_channel(torch.randn(n, k, generator=gen))
        bias = torch.randn(n, generator=gen)
        for dtype in (torch.bfloat16, torch.float16):
            lin = Fp8Linear(w_fp8, scale, bias=bias, device="cuda", dtype=dtype)
            assert lin.gemv_cuda, (n, k)
            x = (torch.randn(2, k, generator=gen) * 8).to(dtype).cuda()
            y = fp8_cuda.gemv(x[:1], lin.weight, lin.gemv_scale)
            ref = fp8_cuda.reference(x[:1], lin.weight, lin.gemv_scale)
            # float32 sums of exact products, then one rounding to the output dtype
            tol = 2**-8 * ref.abs() + 1e-4 * float(ref.abs().max())
            assert y.dtype == dtype and bool(((y.double() - ref).abs() <= tol).all()), (n, k, dtype)
            one = lin(x[:1])
            assert torch.equal(one, (y + lin.bias.to(dtype)))
            two = lin(x)  # two tokens: _scaled_mm, FP8 tensor cores: the same codes, a shorter accumulator
            assert torch.allclose(one.float(), two[:1].float(), rtol=2**-6, atol=2**-6 * float(two.abs().max()))


@pytest.mark.gpu
def test_block_scaled_weights_quantize_the_token_per_group_and_fp8linear_takes_the_kernel():
    """128x128 blocks: one-hot rows give each activation's code times its 128-column group's scale, bit for bit
    (groups of very different magnitudes, a partial last group); random weights are the float64 product of the same
    codes and scales; Fp8Linear takes the kernel for one token and agrees with its dequantize path for two."""
    _need_fp8_gpu()
    from pipeline.engines.fp8_linear import Fp8Linear

    gen = torch.Generator().manual_seed(7)
    for n, k, dtype in [(1024, 4096, torch.bfloat16), (512, 4064, torch.float16), (1024, 28672, torch.bfloat16)]:
        cols = torch.arange(n) * (k // n)
        w = torch.zeros(n, k, device="cuda")
        w[torch.arange(n), cols] = 1.0
        ones = torch.ones(-(-n // 128), -(-k // 128), device="cuda")
        spread = torch.logspace(-3, 2, -(-k // 128)).repeat_interleave(128)[:k]  # group maxima 1e-3 .. 1e2
        x = (torch.randn(1, k, generator=gen) * spread).to(dtype).cuda()
        y = fp8_cuda.gemv(x, w.to(torch.float8_e4m3fn), ones, q.BLOCK)
        xq = q.dequantize_activations(*q.quantize_activations_per_token(x, 128), 128)
        assert torch.equal(y, xq[:, cols].to(dtype)), (n, k, dtype)
        w_fp8, scale = q.quantize_fp8_block(torch.randn(n, k, generator=gen), q.BLOCK)
        lin = Fp8Linear(w_fp8, scale, q.BLOCK, device="cuda", dtype=dtype)
        assert lin.gemv_cuda and lin.kernel == "dequantize"
        xs = (torch.randn(2, k, generator=gen) * 4).to(dtype).cuda()
        one = lin(xs[:1])
        ref = fp8_cuda.reference(xs[:1], lin.weight, lin.weight_scale, q.BLOCK)
        tol = 2**-8 * ref.abs() + 1e-4 * float(ref.abs().max())
        assert bool(((one.double() - ref).abs() <= tol).all()), (n, k, dtype)
        two = lin(xs)
        assert torch.allclose(one.float(), two[:1].float(), rtol=2**-6, atol=2**-6 * float(two.abs().max()))


@pytest.mark.gpu
def test_merged_block_scaled_parts_give_each_part_its_own_outputs_on_the_gpu():
    """fused_proj merges block-scaled q|k|v (whole rows of blocks but the last part's) into one product: one token
    through the merged block GEMV gives every part the outputs of its own GEMV (each row's sum reads the same
    codes, scales and token groups), and two tokens agree with the parts' dequantize path."""
    _need_fp8_gpu()
    from pipeline.engines.fp8_linear import Fp8Linear
    from pipeline.serve.fused_proj import FusedLinear

    gen = torch.Generator().manual_seed(9)
    parts = []
    for n in (1024, 256, 200):  # the last part ends in a partial row of blocks
        w_fp8, scale = q.quantize_fp8_block(torch.randn(n, 4096, generator=gen), q.BLOCK)
        parts.append(Fp8Linear(w_fp8, scale, q.BLOCK, device="cuda", dtype=torch.bfloat16))
    xs = (torch.randn(2, 4096, generator=gen) * 4).to(torch.bfloat16).cuda()
    before = [torch.cat([p(x) for p in parts], dim=-1) for x in (xs[:1], xs)]
    fused = FusedLinear(parts)
    assert fused.kind == "fp8" and fused.fp8.gemv_cuda
    assert torch.equal(fused(xs[:1]), before[0])
    torch.testing.assert_close(fused(xs), before[1], rtol=1e-2, atol=1e-2 * float(before[1].abs().max()))
