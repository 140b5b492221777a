"""The one-token W8A8 GEMV (pipeline.engines.int8_cuda): what it refuses (CPU), and on a GPU (marked gpu) that
Int8Linear's one-token path gives exactly the _int_mm path's result."""

from __future__ import annotations

import pytest
import torch

from pipeline.engines import int8_cuda


def test_problems_are_named():
    assert "device cpu" in int8_cuda.problem(64, 4096, torch.device("cpu"))
    assert "K = 4100" in int8_cuda.problem(64, 4100, torch.device("cuda"))
    assert "K = 65536" in int8_cuda.problem(64, 65536, torch.device("cuda"))


def test_a_linear_built_on_the_cpu_keeps_the_int_mm_path():
    from pipeline.engines.int8_linear import KERNEL_GEMV, Int8Linear

    lin = Int8Linear(torch.randint(-127, 128, (64, 256), dtype=torch.int8), torch.rand(64) * 1e-2)
    assert not lin.gemv_cuda
    lin(torch.randn(1, 256))
    assert lin.kernel != KERNEL_GEMV


@pytest.mark.gpu
def test_one_token_gemv_equals_the_int_mm_path_exactly():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.engines.int8_linear import KERNEL_GEMV, Int8Linear, int8_matmul
    from pipeline.quant.smoothquant import quantize_per_token_int8

    gen = torch.Generator().manual_seed(0)
    for n, k in [(40, 256), (4096, 4096), (1000, 11008), (512, 28672)]:
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).cuda()
        s = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).cuda()
        bias = torch.randn(n, generator=gen).cuda().to(torch.bfloat16)
        lin = Int8Linear(w, s, bias)
        assert lin.gemv_cuda
        for dtype, scale in [(torch.bfloat16, 3.0), (torch.float16, 3.0), (torch.bfloat16, 0.0)]:
            lin.bias = bias.to(dtype)
            x = (torch.randn(1, k, generator=gen) * scale).cuda().to(dtype)  # scale 0: the eps clamp
            y = lin(x)
            assert lin.kernel == KERNEL_GEMV
            x_int8, a = quantize_per_token_int8(x)
            acc, _ = int8_matmul(x_int8, w)
            ref = ((acc.float() * a * lin.scale.t()) + lin.bias.float()).to(dtype)
            assert torch.equal(y, ref), (n, k, dtype, scale)
