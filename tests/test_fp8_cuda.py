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
            y = fp8_cuda.gemv(x[:1], lin.weight, lin.scale_flat)
            ref = fp8_cuda.reference(x[:1], lin.weight, lin.scale_flat)
            # float32 sums of exact products, then one rounding to the output dtype
            tol = 2**-8 * ref.abs() + 1e-4 * float(ref.abs().max())
            assert y.dtype == dtype and bool(((y.double() - ref).abs() <= tol).all()), (n, k, dtype)
            one = lin(x[:1])
            assert torch.equal(one, (y + lin.bias.to(dtype)))
            two = lin(x)  # two tokens: _scaled_mm, FP8 tensor cores: the same codes, a shorter accumulator
            assert torch.allclose(one.float(), two[:1].float(), rtol=2**-6, atol=2**-6 * float(two.abs().max()))
