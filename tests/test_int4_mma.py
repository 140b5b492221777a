"""The tensor-core INT4 product of 2-16 tokens (pipeline.engines.int4_mma): its layout and arithmetic on the CPU
(against an independent dequantize + matmul), the kernel on a GPU (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from pipeline.engines import int4_cuda, int4_mma, int4_triton


def _case(n, k, group, gen):
    q = torch.randint(0, 16, (n, k), generator=gen)
    s = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half().float()
    z = torch.randint(0, 16, (n, k // group), generator=gen)
    return q, s, z


def test_pack_puts_each_lanes_b_fragment_codes_in_its_16_bytes_and_unpack_inverts_it():
    """Lane 4 g + c of tile T, unit U holds row 8 T + g's codes 128 U + 16 t + 2 c + {0, 1} (nibbles i, i + 4 of
    word t // 2, i = 2 (t % 2)) and 16 t + 8 + 2 c + {0, 1} (nibbles i + 1, i + 5): mma.m16n8k16's B fragment."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (16, 256), generator=gen)
    qweight = int4_triton.repack(q, torch.ones(16, 2), torch.zeros(16, 2, dtype=torch.long), "cpu")["qweight"]
    qm = int4_mma.pack(qweight)
    assert qm.shape == (2, 2, 32, 4) and qm.dtype == torch.int32
    assert torch.equal(int4_mma.unpack(qm), q.int())
    words = qm.to(torch.int64) & 0xFFFFFFFF
    for tile, unit, lane, t in [(0, 0, 0, 0), (1, 1, 31, 7), (0, 1, 6, 3), (1, 0, 13, 4)]:
        g, c = divmod(lane, 4)
        word, i = int(words[tile, unit, lane, t // 2]), 2 * (t % 2)
        row, k = 8 * tile + g, 128 * unit + 16 * t + 2 * c
        nib = [(word >> (4 * j)) & 15 for j in range(8)]
        assert [nib[i], nib[i + 4], nib[i + 1], nib[i + 5]] == [int(q[row, k + d]) for d in (0, 1, 8, 9)]


def test_reference_is_the_bf16_dequantized_weight_times_x_and_problem_names_what_it_refuses():
    """int4_mma.reference: the weight (q - z) * s with s rounded to bfloat16 and the product rounded to bfloat16
    (what the kernel's two bfloat16 FMAs give), times the bfloat16 activations in float32; within bfloat16's
    rounding of the exact product. problem() refuses widths, groups, dtypes and devices by name."""
    gen = torch.Generator().manual_seed(2)
    n, k, group = 24, 384, 64
    q, s, z = _case(n, k, group, gen)
    qm = int4_mma.pack(int4_triton.repack(q, s, z, "cpu")["qweight"])
    sz = int4_cuda.pack_scale_zero(s, z)
    x = torch.randn(5, k, generator=gen).bfloat16()
    w = ((q.reshape(n, -1, group) - z[..., None]).float() * s.bfloat16().float()[..., None]).reshape(n, k)
    want = x.float() @ w.bfloat16().float().t()
    assert torch.equal(int4_mma.reference(x, qm, sz, group), want)
    exact = x.double() @ ((q.reshape(n, -1, group) - z[..., None]).double() * s.double()[..., None]).reshape(n, k).t()
    assert ((want.double() - exact).norm() / exact.norm()).item() < 1e-2
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert "device cpu" in int4_mma.problem(8, 128, 128, cpu, bf16)
    cuda = torch.device("cuda")
    assert "bfloat16" in int4_mma.problem(8, 128, 128, cuda, torch.float16)
    assert "N % 8" in int4_mma.problem(12, 128, 128, cuda, bf16)
    assert "K % 128" in int4_mma.problem(8, 192, 64, cuda, bf16)
    assert "group 96" in int4_mma.problem(8, 384, 96, cuda, bf16)


@pytest.mark.gpu
def test_tensor_core_kernel_matches_its_reference_for_2_to_16_tokens():
    """The kernel against int4_mma.reference (float32 sums in another order, then bfloat16): within a few bfloat16
    steps, for groups of 16, 32, 64, 128 and a whole-K group (a row's 4 lanes share out 8, 4, 2 or 1 scale words a
    unit: a word passed from the wrong lane is a wrong group's scale), ragged tile counts and every row count 1..16."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(3)
    for n, k, group in [(24, 256, 16), (40, 512, 32), (24, 1024, 64), (136, 4096, 128), (16, 1280, 1280)]:
        q, s, z = _case(n, k, group, gen)
        qweight = int4_triton.repack(q, s, z, "cuda")["qweight"]
        qm, sz = int4_mma.pack(qweight), int4_cuda.pack_scale_zero(s, z).cuda()
        assert torch.equal(int4_mma.unpack(qm).cpu(), q.int())
        for m in range(1, 17):
            x = torch.randn(m, k, generator=gen).bfloat16().cuda()
            y = int4_mma.matmul(x, qm, sz, group)
            ref = int4_mma.reference(x, qm, sz, group)
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < 4e-3, (n, k, group, m, err)


@pytest.mark.gpu
def test_int4linear_runs_2_to_16_tokens_on_the_tensor_core_kernel_and_merged_parts_match_their_own():
    """Int4Linear on CUDA: 2-16 tokens through int4_mma (bit for bit the kernel's own output), and the serve-time
    merged product (FusedLinear) computes each part's rows exactly as the part does, for 1-20 tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.engines.qlinear import Int4Linear
    from pipeline.quant.primitives import QuantizedWeight
    from pipeline.serve.fused_proj import FusedLinear

    gen = torch.Generator().manual_seed(4)
    parts = []
    for n in (256, 64, 64):
        q, s, z = _case(n, 512, 128, gen)
        parts.append(Int4Linear(QuantizedWeight(q.int(), s, z.int(), 4, 128), device="cuda", dtype=torch.bfloat16))
    assert all(p.mma_cuda for p in parts), parts[0].fallback_reason
    x = torch.randn(8, 512, generator=gen).bfloat16().cuda()
    assert torch.equal(parts[0](x), int4_mma.matmul(x, parts[0].qmma, parts[0].scale_zero, 128))
    xs = [torch.randn(m, 512, generator=gen).bfloat16().cuda() for m in (2, 5, 16, 20)]
    before = [torch.cat([p(x) for p in parts], dim=-1) for x in xs]
    fused = FusedLinear(parts)
    assert fused.kind == "int4" and fused.mma
    assert all(torch.equal(fused(x), b) for x, b in zip(xs, before))
