"""The one-token CUDA INT4 GEMV (pipeline.engines.int4_cuda) and the grouped-query decode attention
(pipeline.serve.decode_attention): the kernel's bit arithmetic mirrored in tensor ops on the CPU, against float64;
the kernel itself on a GPU (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from pipeline.engines import int4_cuda, int4_triton


def _case(n, k, group, scale_dtype, gen):
    q = torch.randint(0, 16, (n, k), generator=gen)
    s = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).to(scale_dtype).float()
    z = torch.randint(0, 16, (n, k // group), generator=gen)
    w = ((q.reshape(n, -1, group) - z[..., None]).double() * s[..., None].double()).reshape(n, k)
    return q, s, z, w


@pytest.mark.parametrize("n,k,group", [(48, 256, 64), (40, 512, 128), (24, 1024, 32), (9, 11008, 128),
                                       (16, 4096, 4096)])
def test_the_kernels_fixed_point_integer_dot_matches_float64(n, k, group):
    gen = torch.Generator().manual_seed(n + k)
    q, s, z, w = _case(n, k, group, torch.float16, gen)
    t = int4_triton.repack(q, s, z, "cpu")
    x = torch.randn(k, generator=gen) * 4
    x[::97] = 300.0  # a few large activations, as real models have
    y = int4_cuda.reference_dot(x, t["qweight"], int4_cuda.pack_scale_zero(s, z), group)
    ref = w @ x.double()
    # 16-bit fixed point per 32 activations: with a 300 among values of ~4 the others keep ~2^-14 * 300 of
    # absolute precision, so ~2e-4 relative here (bfloat16's own output step is ~4e-3); without outliers ~7e-5
    assert ((y.double() - ref).norm() / ref.norm()).item() < 5e-4
    x2 = torch.randn(k, generator=gen)
    ref2 = w @ x2.double()
    y2 = int4_cuda.reference_dot(x2, t["qweight"], int4_cuda.pack_scale_zero(s, z), group)
    assert ((y2.double() - ref2).norm() / ref2.norm()).item() < 2e-4


def test_every_code_decodes_to_itself():
    """Codes 0..15 in each of the 8 nibble positions: the masks and shifts pick exactly that nibble."""
    for j in range(8):
        q = torch.zeros(16, 32, dtype=torch.long)
        q[:, j] = torch.arange(16)
        t = int4_triton.repack(q, torch.ones(16, 1), torch.zeros(16, 1, dtype=torch.long), "cpu")
        x = torch.zeros(32)
        x[j] = 1.0
        y = int4_cuda.reference_dot(x, t["qweight"], int4_cuda.pack_scale_zero(torch.ones(16, 1), torch.zeros(16, 1)),
                                    32)
        assert torch.equal(y, torch.arange(16, dtype=torch.float32)), j


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_and_zero_share_one_word_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(64, 32, generator=gen) * 1e-2
    s[0, 0] = 6e-8 if dtype == torch.float16 else 1e-30  # subnormal fp16 / tiny bf16 still exact
    s = s.to(dtype).float()
    z = torch.randint(0, 256, (64, 32), generator=gen)
    scale, zero = int4_cuda.unpack_scale_zero(int4_cuda.pack_scale_zero(s, z))
    assert torch.equal(scale, s) and torch.equal(zero, z.int())


def test_problems_are_named():
    cpu = torch.device("cpu")
    assert "device cpu" in int4_cuda.problem(64, 4096, 128, cpu, torch.bfloat16)
    cuda = torch.device("cuda")
    assert "float32" in int4_cuda.problem(64, 4096, 128, cuda, torch.float32)
    assert "K = 4100" in int4_cuda.problem(64, 4100, 128, cuda, torch.bfloat16)
    assert "K = 65536" in int4_cuda.problem(64, 65536, 128, cuda, torch.bfloat16)
    assert "group 48" in int4_cuda.problem(64, 4608, 48, cuda, torch.bfloat16)


def test_launch_shape_picks_a_compiled_variant_and_never_more_blocks_than_chunks():
    assert int4_cuda.launch_shape(1024, 4096, 132) == (4, 256)  # 256 chunks of 4 rows: one block each
    assert int4_cuda.launch_shape(4096, 4096, 132, blocks_per_sm=5) == (4, 132 * 5)  # persistent, 5 blocks an SM
    assert int4_cuda.launch_shape(4096, 4096, 132, rows=8) == (8, 512)
    assert int4_cuda.launch_shape(57344, 8192, 132) == (4, 132 * 4)  # default: 4 blocks of 256 threads
    assert int4_cuda.launch_shape(8192, 28672, 132) == (2, 132)  # the 1024-thread variant, 2 rows a chunk
    assert int4_cuda.launch_shape(8192, 28672, 132, rows=8) == (2, 132)
    assert int4_cuda.launch_shape(40, 4096, 132, blocks_per_sm=8) == (4, 10)


def test_two_chunks_ahead_only_where_a_block_is_alone_on_its_sm_and_at_four_rows():
    """``int4_cuda.ahead``: down's width (one block of 448 threads an SM) keeps two chunks of weights in flight, at
    4 rows a chunk only (the third buffer spills at 2 and 8); its variant is named and bounded for it."""
    assert int4_cuda.ahead(14336, 4) == 2 and int4_cuda.ahead(11008, 4) == 2
    assert int4_cuda.ahead(4096, 4) == 1 and int4_cuda.ahead(14336, 8) == 1 and int4_cuda.ahead(14336, 2) == 1
    assert int4_cuda.ahead(28672, 2) == 1  # the 1024-thread variant
    source, name = int4_cuda._variant(torch.bfloat16, 14336, 4, False, "residual", 2)
    assert name == "q4gemv_bf16_r4_t448_a2_residual"
    assert source.rstrip().endswith(f"ENTRY({name}, __maxnreg__(104), 4, false, 1, true, 2)")  # rows, norm, EPI,
    source, name = int4_cuda._variant(torch.bfloat16, 14336, 4, True, "swiglu", 1)  # ...bf16, depth
    assert source.rstrip().endswith(f"ENTRY({name}, __launch_bounds__(448, 1), 4, true, 2, true, 1)")


def _repeat_kv_sdpa(q, k, v, mask, groups):
    k2 = k.repeat_interleave(groups, dim=1)
    v2 = v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=mask).transpose(1, 2)


def test_grouped_decode_attention_equals_repeat_kv():
    from pipeline.serve.decode_attention import decode_attention

    gen = torch.Generator().manual_seed(0)
    b, hkv, groups, length, d = 3, 2, 4, 40, 16
    q = torch.randn(b, hkv * groups, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, length, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, length, d, generator=gen, dtype=torch.float64)
    pos = torch.tensor([5, 39, 17])
    mask = (torch.arange(length)[None, :] <= pos[:, None])[:, None, None, :]
    module = type("Attn", (), {"num_key_value_groups": groups})()
    out, weights = decode_attention(module, q, k, v, mask, scaling=d ** -0.5)
    assert weights is None and out.shape == (b, 1, hkv * groups, d)
    assert torch.allclose(out, _repeat_kv_sdpa(q, k, v, mask, groups), atol=1e-12)


def test_decode_attention_hands_prefill_to_the_models_own_implementation():
    from conftest import load_tiny

    from pipeline.serve import decode_attention

    model, _ = load_tiny()
    before = model.config._attn_implementation
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        ref = model(ids).logits
        assert decode_attention.install(model) and decode_attention.install(model)  # idempotent
        assert model.config._attn_implementation == decode_attention.NAME
        got = model(ids).logits
    model.config._attn_implementation = before
    assert torch.equal(got, ref)


@pytest.mark.gpu
def test_cuda_gemv_matches_float64_and_int4linear_takes_it():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.engines.qlinear import Int4Linear
    from pipeline.quant.primitives import QuantizedWeight

    gen = torch.Generator().manual_seed(1)
    for n, k, group, dtype in [(37, 1024, 32, torch.bfloat16), (300, 11008, 128, torch.float16),
                               (64, 28672, 128, torch.bfloat16)]:
        q, s, z, w = _case(n, k, group, dtype, gen)
        t = int4_triton.repack(q, s, z, "cuda")
        sz = int4_cuda.pack_scale_zero(s, z).cuda()
        x = torch.randn(1, k, generator=gen).to(dtype).cuda()
        ref = x.double().cpu() @ w.t()
        for rows in (*int4_cuda.ROWS, None):
            y = int4_cuda.gemv(x, t["qweight"], sz, group, rows=rows)
            assert y.dtype == dtype and y.shape == (1, n)
            assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 4e-3  # the output's own rounding
    qw = QuantizedWeight(q.int(), s, z.int(), 4, 128)
    lin = Int4Linear(qw, device="cuda", dtype=torch.bfloat16)
    tiny = Int4Linear(qw, device="cuda", dtype=torch.bfloat16, kernel="cuda-int4pack")  # PyTorch's int4 kernel
    assert lin.gemv_cuda and lin.mma_cuda, lin.fallback_reason
    assert "weight_int4pack" not in lin._buffers  # tinygemm's copy: 2-16 tokens run int4_mma
    for m in (1, 2, 8, 16):  # one token: int4_cuda; 2-16: int4_mma
        x = torch.randn(m, q.shape[1], device="cuda", dtype=torch.bfloat16)
        y, ref = lin(x).double(), tiny(x).double()
        assert ((y - ref).norm() / ref.norm()).item() < 1e-2, m


@pytest.mark.gpu
def test_fused_int4_gemv_equals_its_parts_bit_for_bit_and_shares_their_codes():
    """pipeline/serve/fused_proj: q|k|v as one GEMV gives each part's output exactly (a row's dot products do not
    depend on the rows beside it), 2-16 tokens through the merged int4_mma tiles, more through the parts, and the
    parts' codes become views of the fused."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.engines.qlinear import Int4Linear
    from pipeline.quant.primitives import QuantizedWeight
    from pipeline.serve.fused_proj import FusedLinear

    gen = torch.Generator().manual_seed(3)
    parts = []
    for n in (512, 128, 136):  # q, k, v widths, v ragged
        q, s, z, _ = _case(n, 1024, 128, torch.bfloat16, gen)
        parts.append(Int4Linear(QuantizedWeight(q.int(), s, z.int(), 4, 128), device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, 1, 1024, generator=gen).to(torch.bfloat16).cuda()
    xs = torch.randn(3, 1024, generator=gen).to(torch.bfloat16).cuda()
    before = [p(x) for p in parts], [p(xs) for p in parts]
    fused = FusedLinear(parts)
    assert fused.kind == "int4"
    assert torch.equal(fused(x), torch.cat(before[0], dim=-1)) and fused(x).shape == (1, 1, 776)
    assert fused.gemv and fused.mma and not fused.packed  # 2-16 tokens: int4_mma, whose copy replaced tinygemm's
    assert torch.equal(fused(xs), torch.cat(before[1], dim=-1))  # 3 tokens: the merged int4_mma tiles
    x20 = torch.randn(20, 1024, generator=gen).to(torch.bfloat16).cuda()  # above 16: the parts' prefill path
    assert torch.equal(fused(x20), torch.cat([p(x20) for p in parts], dim=-1))
    assert all(torch.equal(p(x), b) for p, b in zip(parts, before[0]))  # the parts read the fused codes now
    ptr = fused.qweight.untyped_storage().data_ptr()
    assert all(p.qweight.untyped_storage().data_ptr() == ptr for p in parts)


def test_fused_reference_is_transformers_rmsnorm_and_swiglu_in_bf16():
    """What the fused kernels compute before the product (int4_cuda.fused_reference) is the eager modules' own
    arithmetic, bit for bit, in bfloat16: LlamaRMSNorm (and Qwen3's, the same forward) and SiLU(gate) * up."""
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(5)
    norm = LlamaRMSNorm(256, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256, generator=gen) * 2)
    norm = norm.to(torch.bfloat16)
    h = (torch.randn(1, 256, generator=gen) * 3).to(torch.bfloat16)
    assert torch.equal(int4_cuda.fused_reference(h, norm.weight, norm.variance_epsilon), norm(h))
    gu = (torch.randn(1, 512, generator=gen) * 4).to(torch.bfloat16)
    gate, up = gu.chunk(2, dim=-1)
    assert torch.equal(int4_cuda.fused_reference(gu, silu_mul=True), ACT2FN["silu"](gate) * up)


@pytest.mark.gpu
def test_fused_cuda_gemv_runs_rmsnorm_swiglu_and_the_residual_add_as_the_ops_would():
    """int4_gemv's fusions against the unfused ops on the same codes: the residual add and SwiGLU over the product's
    two halves bit for bit; the RMSNorm up to the rounding of the normed input it skips
    (int4_cuda.fused_reference)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(11)
    for n, k, dtype in [(200, 1024, torch.bfloat16), (96, 14336, torch.bfloat16), (64, 4096, torch.float16),
                        (40, 28672, torch.bfloat16), (14, 512, torch.bfloat16)]:  # 14: 7 gate rows, a ragged chunk
        q, s, z, _ = _case(n, k, 128, dtype, gen)
        qweight, sz = int4_triton.repack(q, s, z, "cuda")["qweight"], int4_cuda.pack_scale_zero(s, z).cuda()
        x = (torch.randn(1, k, generator=gen) * 2).to(dtype).cuda()
        nw = (torch.rand(k, generator=gen) + 0.5).to(dtype).cuda()
        res = torch.randn(1, n, generator=gen).to(dtype).cuda()
        plain = int4_cuda.gemv(x, qweight, sz, 128)
        assert torch.equal(int4_cuda.gemv(x, qweight, sz, 128, residual=res), res + plain)
        swiglu = int4_cuda.gemv(x, qweight, sz, 128, swiglu=True)
        assert swiglu.shape == (1, n // 2) and torch.equal(swiglu, int4_cuda.fused_reference(plain, silu_mul=True))
        normed = int4_cuda.gemv(x, qweight, sz, 128, norm_weight=nw, eps=1e-5)
        ref = int4_cuda.gemv(int4_cuda.fused_reference(x, nw, 1e-5), qweight, sz, 128)
        assert ((normed.double() - ref.double()).norm() / ref.double().norm()).item() < 8e-3  # ~2e-3: bf16 steps
        both = int4_cuda.gemv(x, qweight, sz, 128, norm_weight=nw, eps=1e-5, swiglu=True)
        assert torch.equal(both, int4_cuda.fused_reference(normed, silu_mul=True))
        for rows in (2, 8) if k <= int4_cuda.WIDE_K else ():  # other chunk shapes: the same epilogues
            plain = int4_cuda.gemv(x, qweight, sz, 128, rows)
            assert torch.equal(int4_cuda.gemv(x, qweight, sz, 128, rows, residual=res), res + plain)
            swiglu = int4_cuda.gemv(x, qweight, sz, 128, rows, swiglu=True)
            assert torch.equal(swiglu, int4_cuda.fused_reference(plain, silu_mul=True))


def test_rope_reference_is_transformers_rotary_and_ropewrite_names_what_it_refuses():
    """The rotary epilogue's arithmetic (int4_cuda.rope_reference) is transformers' apply_rotary_pos_emb over q and
    k (rotate_half's pairs, whole heads), exactly in float32; RopeWrite.problem refuses what the kernel cannot
    take, by name."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(21)
    hd, hq, hkv = 64, 4, 2
    qkv = torch.randn(1, (hq + 2 * hkv) * hd, generator=gen)
    cos, sin = torch.randn(hd, generator=gen), torch.randn(hd, generator=gen)
    q, k, v = int4_cuda.rope_reference(qkv, cos, sin, hq * hd, hd)
    q0, k0, v0 = qkv.reshape(-1).split([hq * hd, hkv * hd, hkv * hd])
    want_q, want_k = apply_rotary_pos_emb(q0.reshape(1, hq, 1, hd), k0.reshape(1, hkv, 1, hd), cos[None, None],
                                          sin[None, None])  # fmt: skip
    assert torch.equal(q, want_q.reshape(1, -1)) and torch.equal(k, want_k.reshape(hkv, hd))
    assert torch.equal(v, v0.reshape(hkv, hd))
    cache = torch.zeros(2, hkv, 16, hd)
    ok = int4_cuda.RopeWrite(cos, sin, torch.zeros(1, dtype=torch.long), cache, cache.clone(), hq * hd, hd)
    n = (hq + 2 * hkv) * hd
    assert ok.problem(n, 512) == ""
    assert "whole heads" in ok.problem(n + 4, 512)
    assert ok.problem(n, 512, rows=8) == ""  # 8 rows: 4 of a head and their partners
    assert "K <= 16384" in ok.problem(n, 32 * 1024)  # the 1024-thread variant
    assert "partial rotary" in ok._replace(cos=cos[:32], sin=sin[:32]).problem(n, 512)
    assert "caches" in ok._replace(k_cache=cache.transpose(2, 3)).problem(n, 512)
    assert "int64" in ok._replace(pos=torch.zeros(1)).problem(n, 512)


@pytest.mark.gpu
def test_rotary_epilogue_writes_q_and_the_cache_as_the_reference():
    """int4_gemv_rope: RMSNorm, q|k|v, the rotary embedding and the cache write in one kernel give the normed
    product's q, k, v rotated as int4_cuda.rope_reference does, bit for bit, k and v at slot 0's position and
    nothing else of the cache touched."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(23)
    for hd, hq, hkv, k, dtype, rows in [(128, 8, 2, 1024, torch.bfloat16, 4), (64, 6, 3, 512, torch.float16, 4),
                                        (128, 8, 2, 1024, torch.bfloat16, 8), (64, 6, 3, 512, torch.float16, 8),
                                        (128, 8, 2, 1024, torch.bfloat16, 2)]:
        n = (hq + 2 * hkv) * hd
        q, s, z, _ = _case(n, k, 128, dtype, gen)
        qweight, sz = int4_triton.repack(q, s, z, "cuda")["qweight"], int4_cuda.pack_scale_zero(s, z).cuda()
        x = (torch.randn(1, k, generator=gen) * 2).to(dtype).cuda()
        nw = (torch.rand(k, generator=gen) + 0.5).to(dtype).cuda()
        cos, sin = (torch.randn(hd, generator=gen).to(dtype).cuda() for _ in range(2))
        kc, vc = (torch.randn(3, hkv, 32, hd, generator=gen).to(dtype).cuda() for _ in range(2))
        k0, v0 = kc.clone(), vc.clone()
        pos = torch.tensor([5, 9, 11], device="cuda")
        rope = int4_cuda.RopeWrite(cos, sin, pos, kc, vc, hq * hd, hd)
        got = int4_cuda.gemv(x, qweight, sz, 128, norm_weight=nw, eps=1e-5, rope=rope, rows=rows)
        plain = int4_cuda.gemv(x, qweight, sz, 128, rows, norm_weight=nw, eps=1e-5)
        want_q, want_k, want_v = int4_cuda.rope_reference(plain, cos, sin, hq * hd, hd)
        assert torch.equal(got, want_q)
        assert torch.equal(kc[0, :, 5], want_k) and torch.equal(vc[0, :, 5], want_v)
        k0[0, :, 5], v0[0, :, 5] = want_k, want_v
        assert torch.equal(kc, k0) and torch.equal(vc, v0)
        # with the last layer's MLP output to add first: the input is x + add rounded as the eager add, and
        # x + add comes back as the next residual stream
        add = torch.randn(1, k, generator=gen).to(dtype).cuda()
        h = torch.empty_like(x)
        got = int4_cuda.gemv(x, qweight, sz, 128, norm_weight=nw, eps=1e-5, rope=rope, add=add, add_out=h,
                              rows=rows)
        assert torch.equal(h, x + add)
        plain = int4_cuda.gemv(x + add, qweight, sz, 128, rows, norm_weight=nw, eps=1e-5)
        want_q, want_k, _ = int4_cuda.rope_reference(plain, cos, sin, hq * hd, hd)
        assert torch.equal(got, want_q) and torch.equal(kc[0, :, 5], want_k)


@pytest.mark.gpu
def test_two_chunks_ahead_equals_one_ahead_bit_for_bit(monkeypatch):
    """The depth of the weight pipeline (``int4_cuda.ahead``) changes when loads are issued, not the arithmetic:
    with blocks walking 3-5 chunks each (ragged last chunk), every epilogue gives the same bits at depth 1 and 2."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(31)
    blocks = int4_cuda.sm_count(0)
    for k in (4096, 14336):
        n = 4 * (4 * blocks) + 6  # over 4 chunks a block, the last chunk ragged (SwiGLU: gate rows 2n / 4 + 3/2)
        q, s, z, _ = _case(n, k, 128, torch.bfloat16, gen)
        qweight, sz = int4_triton.repack(q, s, z, "cuda")["qweight"], int4_cuda.pack_scale_zero(s, z).cuda()
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
        nw = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16).cuda()
        res = torch.randn(1, n, generator=gen).to(torch.bfloat16).cuda()
        fusions = ({}, dict(residual=res), dict(norm_weight=nw, eps=1e-5, swiglu=True))
        got = {}
        for above in (int4_cuda.MAX_K, 0):  # every width one ahead, then every width two
            monkeypatch.setattr(int4_cuda, "AHEAD2_ABOVE_K", above)
            got[above] = [int4_cuda.gemv(x, qweight, sz, 128, rows=4, blocks_per_sm=1, **kw) for kw in fusions]
        assert all(torch.equal(a, b) for a, b in zip(got[int4_cuda.MAX_K], got[0])), k


@pytest.mark.gpu
def test_a_graph_of_dependent_gemvs_launched_with_pdl_equals_plain_launches():
    """Programmatic dependent launch (pipeline.engines.cuda_launch): each GEMV of a chain reads the one before
    it, launched early and waiting in griddepcontrol.wait; a graph of them replayed over fresh inputs gives what
    plain launches give, bit for bit (a kernel that read x before the wait would read the last replay's)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.engines import cuda_launch

    if not cuda_launch.pdl_available(0):
        pytest.skip("PDL needs compute capability 9.0")
    gen = torch.Generator().manual_seed(29)
    k = 4096
    layers = []
    for n, group in ((2 * k, 128), (k, 64), (k, 128)):
        q, s, z, _ = _case(n, k, group, torch.bfloat16, gen)
        layers.append((int4_triton.repack(q, s, z, "cuda")["qweight"], int4_cuda.pack_scale_zero(s, z).cuda(), group))
    nw = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16).cuda()

    def chain(x):
        h = int4_cuda.gemv(x, *layers[0], norm_weight=nw, eps=1e-5, swiglu=True)
        h = int4_cuda.gemv(h, *layers[1], residual=x)
        return int4_cuda.gemv(h, *layers[2], residual=h)

    x = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16)
    try:
        cuda_launch.PDL = True
        chain(x)  # compiled before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = chain(x)
        cuda_launch.PDL = False
        for _ in range(3):
            x.copy_(torch.randn(1, k, generator=gen).to(torch.bfloat16))
            graph.replay()
            assert torch.equal(y, chain(x))
    finally:
        cuda_launch.PDL = True
