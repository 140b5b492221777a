"""bench/decode_speed.py's bandwidth bound: an INT4 linear holds several 4-bit copies (tinygemm's or our
tensor-core kernel's, the Triton repack our one-token GEMV shares, its scale words), and a decode step reads one of
them; the bound counts that one, by batch size."""

from __future__ import annotations

import torch

from bench.decode_speed import build_model, convert, weight_bytes_per_token
from pipeline.engines.qlinear import Int4Linear


def test_the_bound_counts_the_copy_the_step_reads():
    model = convert(build_model("tiny", "cpu", torch.float32), "int4-gptq", "cpu", torch.float32)
    before = weight_bytes_per_token(model, 1)
    assert before == weight_bytes_per_token(model, 8)  # on the CPU: one copy, read at every batch size
    lins = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert lins
    tiny = gemv = 0
    for m in lins:  # as on CUDA where the one-token GEMV compiled: tinygemm's copy and the GEMV's beside it
        n, k = m.out_features, m.in_features
        copies = dict(weight_int4pack=torch.zeros(n, k // 8, dtype=torch.int32),
                      scales_and_zeros=torch.zeros(k // m.group_size, n, 2, dtype=torch.bfloat16),
                      qweight=torch.zeros(n, k // 8, dtype=torch.int32),
                      scale_zero=torch.zeros(n, k // m.group_size, dtype=torch.int32))  # fmt: skip
        for name, t in copies.items():
            m.register_buffer(name, t)
        m.gemv_cuda = True
        tiny += copies["weight_int4pack"].nbytes + copies["scales_and_zeros"].nbytes
        gemv += copies["qweight"].nbytes + copies["scale_zero"].nbytes
    assert weight_bytes_per_token(model, 8) == before + tiny  # 2-8 tokens: tinygemm's copy only
    assert weight_bytes_per_token(model, 1) == before + gemv  # one token: the GEMV's copy only
    for m in lins:  # our tensor-core kernel for 2-16 tokens in place of tinygemm's copy
        n, k = m.out_features, m.in_features
        for name in ("weight_int4pack", "scales_and_zeros"):
            m._buffers.pop(name)
        m.register_buffer("qmma", torch.zeros(n // 8, k // 128, 32, 4, dtype=torch.int32))
        m.mma_cuda = True
    mma = sum(m.qmma.nbytes + m.scale_zero.nbytes for m in lins)
    assert weight_bytes_per_token(model, 8) == before + mma
    assert weight_bytes_per_token(model, 1) == before + gemv
