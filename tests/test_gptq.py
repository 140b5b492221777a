"""GPTQ: the algorithm (pipeline/quant/gptq.py) and the checkpoint format (pipeline/formats/gptq.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.errors import QuantizationError
from pipeline.formats import gptq as gptq_format
from pipeline.quant.gptq import accumulate_hessian, gptq_loss, gptq_quantize
from pipeline.quant.primitives import QuantizedWeight, compute_qparams, quantize_groupwise, quantize_with_qparams

torch.set_num_threads(2)


# ---------------------------------------------------------------- factories


def correlated_linear(n_in=128, n_out=64, n_tok=1024, seed=0, col_spread=True):
    """A weight [out, in] and inputs [tok, in] with correlated features (x = randn @ mixing), so H is far
    from diagonal; ``col_spread`` also gives the features different magnitudes (where act-order pays)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) / n_in**0.5)
    if col_spread:
        x = x * (torch.rand(n_in, generator=g) * 3 + 0.2)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    return w, x


def random_qweight(n_out, n_in, bits, group_size, act_order=False, seed=0, min_zero=1):
    """A QuantizedWeight with random codes, fp16-exact scales and zeros in [min_zero, 2**bits - 1]."""
    g = torch.Generator().manual_seed(seed)
    qmax = 2**bits - 1
    n_groups = n_in // group_size
    g_idx = None
    if act_order:
        perm = torch.randperm(n_in, generator=g)
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[perm] = (torch.arange(n_in) // group_size).to(torch.int32)
    return QuantizedWeight(
        w_int=torch.randint(0, qmax + 1, (n_out, n_in), generator=g, dtype=torch.int32),
        scales=(torch.rand(n_out, n_groups, generator=g) * 0.01 + 1e-4).half().float(),
        zeros=torch.randint(min_zero, qmax + 1, (n_out, n_groups), generator=g, dtype=torch.int32),
        bits=bits,
        group_size=group_size,
        g_idx=g_idx,
    )


def output_error(w, q: QuantizedWeight, x):
    return float((x @ w.T - x @ q.dequantize().T).norm())


def loader_style_dequant(tensors, bits, v2=False):
    """What vLLM's torch GPTQ path / TurboMind's GPTQFormat.normalize do with the stored tensors: shift out
    codes lowest-first (``wf = range(0, 32, bits)``), qweight along the input dim, qzeros along the output dim,
    zeros + 1 for the v1 format, then ``scales[g_idx] * (weight - zeros[g_idx])``. Returns [out, in]."""
    pf = 32 // bits
    mask = 2**bits - 1
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    qweight, qzeros = tensors["qweight"], tensors["qzeros"]
    weight = ((qweight.unsqueeze(1) >> wf.view(1, pf, 1)) & mask).reshape(-1, qweight.shape[1])  # [in, out]
    zeros = ((qzeros.unsqueeze(2) >> wf.view(1, 1, pf)) & mask).reshape(qzeros.shape[0], -1)  # [G, out]
    if not v2:
        zeros = zeros + 1
    g_idx = tensors["g_idx"].long()
    w = tensors["scales"].float()[g_idx] * (weight.float() - zeros[g_idx].float())
    return w.t()


def naive_gptq(w, H, bits, group_size, sym, damp=0.01):
    """Independent reference: GPTQ in its unblocked form, paper eq. (3) with the explicit inverse, removing
    each quantized column from H⁻¹ by a Gaussian elimination step (no Cholesky, no lazy batches)."""
    W = w.double().clone()
    n_out, n_in = W.shape
    H = H.double().clone()
    H += damp * torch.diag(H).mean() * torch.eye(n_in, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    q_int = torch.zeros(n_out, n_in, dtype=torch.int32)
    for c in range(n_in):
        if c % group_size == 0:
            cols = W[:, c:c + group_size].float()
            scale, zero = compute_qparams(cols.amin(1, keepdim=True), cols.amax(1, keepdim=True), bits, sym)
            scale = scale.half().float().double()
        q = quantize_with_qparams(W[:, c:c + 1], scale, zero, bits)
        q_int[:, c] = q[:, 0]
        err = (W[:, c] - (q[:, 0].double() - zero[:, 0].double()) * scale[:, 0]) / Hinv[c, c]
        W[:, c:] -= err[:, None] * Hinv[c:c + 1, c:]
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return q_int


# ---------------------------------------------------------------- Hessian


def test_hessian_accumulated_over_batches_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 16, generator=g), torch.randn(7, 16, generator=g), torch.randn(1, 3, 16, generator=g)]
    H, n = None, 0
    for b in batches:
        H, n = accumulate_hessian(H, b, n)
    X = torch.cat([b.reshape(-1, 16) for b in batches])
    assert n == X.shape[0] == 20
    torch.testing.assert_close(H, 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    assert H.dtype == torch.float32


def test_hessian_of_half_inputs_is_fp32_and_width_mismatch_raises():
    x = torch.randn(4, 8).half()
    H, n = accumulate_hessian(None, x, 0)
    assert H.dtype == torch.float32 and n == 4
    with pytest.raises(QuantizationError, match="input has width 9"):
        accumulate_hessian(H, torch.randn(3, 9), n)


def test_gptq_loss_is_output_error_per_token():
    w, x = correlated_linear(n_in=32, n_out=8, n_tok=64)
    H, n = accumulate_hessian(None, x, 0)
    q = quantize_groupwise(w, 4, 32, sym=True)
    assert gptq_loss(w, q, H) == pytest.approx(output_error(w, q, x) ** 2 / n, rel=1e-4)


# ---------------------------------------------------------------- the algorithm


@pytest.mark.parametrize("bits, max_ratio", [(4, 0.85), (3, 0.85)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, max_ratio):
    w, x = correlated_linear(seed=0)
    H, _ = accumulate_hessian(None, x, 0)
    q = gptq_quantize(w, H, bits=bits, group_size=32, sym=True)
    rtn = quantize_groupwise(w, bits, 32, sym=True)
    ratio = output_error(w, q, x) / output_error(w, rtn, x)
    assert ratio < max_ratio, f"GPTQ/RTN output error ratio {ratio:.3f} at {bits} bits"


def test_gptq_matches_unblocked_reference_and_is_block_size_invariant():
    w, x = correlated_linear(n_in=48, n_out=16, n_tok=256, seed=3)
    H, _ = accumulate_hessian(None, x, 0)
    ref = naive_gptq(w, H, bits=4, group_size=16, sym=False)
    results = [gptq_quantize(w, H, bits=4, group_size=16, sym=False, block_size=bs) for bs in (1, 5, 16, 48, 128)]
    for q in results:
        assert torch.equal(q.w_int, results[0].w_int) and torch.equal(q.scales, results[0].scales)
    # float64 elimination vs float32 Cholesky: allow a rare flipped rounding tie, nothing more.
    assert (results[0].w_int == ref).float().mean() > 0.99


def test_sym_and_asym():
    w, x = correlated_linear(seed=4)
    H, _ = accumulate_hessian(None, x, 0)
    for sym in (True, False):
        q = gptq_quantize(w, H, bits=4, group_size=64, sym=sym)
        assert q.w_int.dtype == torch.int32 and int(q.w_int.min()) >= 0 and int(q.w_int.max()) <= 15
        assert q.scales.shape == q.zeros.shape == (64, 2)
        if sym:
            assert bool((q.zeros == 8).all())
        else:
            assert len(torch.unique(q.zeros)) > 1
        assert output_error(w, q, x) < 0.85 * output_error(w, quantize_groupwise(w, 4, 64, sym=sym), x)


def test_per_channel_group_minus_one():
    w, x = correlated_linear(seed=5)
    H, _ = accumulate_hessian(None, x, 0)
    q = gptq_quantize(w, H, bits=4, group_size=-1, sym=True)
    assert q.group_size == 128 and q.scales.shape == (64, 1) and q.g_idx is None
    assert output_error(w, q, x) < 0.85 * output_error(w, quantize_groupwise(w, 4, 128, sym=True), x)


def test_desc_act_g_idx_follows_activation_order():
    w, x = correlated_linear(seed=6)
    H, _ = accumulate_hessian(None, x, 0)
    q = gptq_quantize(w, H, bits=4, group_size=32, sym=True, desc_act=True)
    perm = torch.argsort(torch.diag(H), descending=True)
    # AutoGPTQ / GPTQModel semantics: groups are runs of 32 columns in act-order, g_idx[perm[i]] = i // 32.
    expected = torch.empty(128, dtype=torch.int32)
    expected[perm] = (torch.arange(128) // 32).to(torch.int32)
    assert torch.equal(q.g_idx, expected)
    assert torch.equal(torch.bincount(q.g_idx.long()), torch.full((4,), 32))
    # The g_idx is what makes the dequantization right: the in-order reading of the same codes is far worse.
    in_order = QuantizedWeight(q.w_int, q.scales, q.zeros, q.bits, q.group_size, g_idx=None)
    assert output_error(w, q, x) < 0.5 * output_error(w, in_order, x)
    plain = gptq_quantize(w, H, bits=4, group_size=32, sym=True, desc_act=False)
    assert output_error(w, q, x) < output_error(w, plain, x)


def test_static_groups_keep_in_order_g_idx():
    w, x = correlated_linear(seed=7)
    H, _ = accumulate_hessian(None, x, 0)
    q = gptq_quantize(w, H, bits=4, group_size=32, sym=True, desc_act=True, static_groups=True)
    assert q.g_idx is None
    torch.testing.assert_close(q.scales, quantize_groupwise(w, 4, 32, sym=True).scales.half().float())
    assert output_error(w, q, x) < 0.85 * output_error(w, quantize_groupwise(w, 4, 32, sym=True), x)


def test_dead_input_columns_quantize_to_zero():
    w, x = correlated_linear(n_in=64, n_out=16, n_tok=256, seed=8)
    x[:, [3, 40]] = 0.0
    H, _ = accumulate_hessian(None, x, 0)
    for desc_act in (False, True):
        q = gptq_quantize(w, H, bits=4, group_size=32, sym=True, desc_act=desc_act)
        deq = q.dequantize()
        assert bool(torch.isfinite(deq).all())
        assert bool((deq[:, [3, 40]] == 0).all())


def test_cholesky_failure_retries_with_more_damping_then_raises(caplog):
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(9))
    block = torch.tensor([[1.0, 1.5], [1.5, 1.0]])  # eigenvalue -0.5: needs damping > 0.5 · mean(diag)
    H = torch.block_diag(block, block)
    with caplog.at_level(logging.WARNING, logger="pipeline.quant.gptq"):
        q = gptq_quantize(w, H, bits=4, group_size=4)
    assert bool(torch.isfinite(q.dequantize()).all())
    assert "dampening" in caplog.text
    very_indefinite = torch.block_diag(*[torch.tensor([[1.0, 101.0], [101.0, 1.0]])] * 2)
    with pytest.raises(QuantizationError, match="could not factorise"):
        gptq_quantize(w, very_indefinite, bits=4, group_size=4)


def test_bad_arguments_raise_quantization_errors():
    w = torch.randn(8, 64)
    H = torch.eye(64)
    with pytest.raises(QuantizationError, match="2 to 8 bits"):
        gptq_quantize(w, H, bits=9)
    with pytest.raises(QuantizationError, match="does not divide the input width 64"):
        gptq_quantize(w, H, group_size=48)
    with pytest.raises(QuantizationError, match="must be \\[64, 64\\]"):
        gptq_quantize(w, torch.eye(32), group_size=32)
    with pytest.raises(QuantizationError, match="NaN"):
        gptq_quantize(w, torch.full((64, 64), float("nan")), group_size=32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_on_cuda_matches_cpu_quality():
    w, x = correlated_linear(seed=10)
    H, _ = accumulate_hessian(None, x.cuda(), 0)
    q = gptq_quantize(w.cuda(), H, bits=4, group_size=32, desc_act=True)
    assert q.w_int.is_cuda and q.g_idx.is_cuda
    q_cpu = QuantizedWeight(q.w_int.cpu(), q.scales.cpu(), q.zeros.cpu(), 4, 32, q.g_idx.cpu())
    assert output_error(w, q_cpu, x) < 0.85 * output_error(w, quantize_groupwise(w, 4, 32, sym=True), x)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hessian_from_bf16_inputs_on_cuda_equals_fp32_accumulation():
    # The CUDA path multiplies bf16 inputs with fp32 output (no fp32 copy of x); bf16 products are exact in fp32,
    # so it must agree with upcasting first to fp32 rounding of the sums.
    from pipeline.quant import gptq

    x = (torch.randn(3, 512, 256, device="cuda") * 2).to(torch.bfloat16)
    H, n = None, 0
    for batch in x:
        H, n = accumulate_hessian(H, batch, n)
    ref = 2 * x.reshape(-1, 256).double().t() @ x.reshape(-1, 256).double() / n
    assert gptq._HALF_GEMM_OK is not None
    torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the checkpoint format


def test_pack_hand_checked_4bit():
    # w_int[n, k] = n + k: output 0 holds codes 0..7 along the input dim, output 1 holds 1..8.
    w_int = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)).to(torch.int32) % 16
    qw = QuantizedWeight(w_int, torch.ones(8, 1), torch.full((8, 1), 8, dtype=torch.int32), 4, 8)
    t = gptq_format.pack(qw)
    assert t["qweight"].shape == (1, 8) and t["qweight"].dtype == torch.int32
    assert int(t["qweight"][0, 0]) == 0x76543210  # code k in bits [4k, 4k+4), lowest first
    assert int(t["qweight"][0, 1]) == 0x87654321 - 2**32  # the same 32 bits, read as int32
    assert t["qzeros"].shape == (1, 1) and t["scales"].shape == (1, 8) and t["scales"].dtype == torch.float16
    assert torch.equal(t["g_idx"], torch.zeros(8, dtype=torch.int32))


def test_pack_hand_checked_8bit():
    w_int = torch.tensor([[1, 2, 3, 4, 250, 251, 252, 253]] * 4, dtype=torch.int32)
    qw = QuantizedWeight(w_int, torch.ones(4, 1), torch.full((4, 1), 128, dtype=torch.int32), 8, 8)
    t = gptq_format.pack(qw)
    assert t["qweight"].shape == (2, 4)
    assert int(t["qweight"][0, 0]) == 0x04030201
    assert int(t["qweight"][1, 0]) == 0xFDFCFBFA - 2**32
    assert int(t["qzeros"][0, 0]) == 0x7F7F7F7F  # zero 128 stored as 127 in each byte


def test_v1_stores_zero_minus_one_and_v2_the_zero():
    qw = random_qweight(16, 32, bits=4, group_size=16)
    qw.zeros = torch.full((16, 2), 8, dtype=torch.int32)  # the symmetric 4-bit zero
    v1 = gptq_format.pack(qw, "gptq")
    v2 = gptq_format.pack(qw, "gptq_v2")
    assert v1["qzeros"].shape == (2, 2)
    assert bool((v1["qzeros"] == 0x77777777).all())  # 8 - 1 = 7 in every nibble
    assert bool((v2["qzeros"] == 0x88888888 - 2**32).all())
    assert torch.equal(gptq_format.unpack(v1, 4, "gptq").zeros, qw.zeros)
    assert torch.equal(gptq_format.unpack(v2, 4, "gptq_v2").zeros, qw.zeros)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_pack_unpack_round_trip_is_bit_exact(bits, act_order, fmt):
    qw = random_qweight(32, 64, bits=bits, group_size=16, act_order=act_order, seed=bits)
    t = gptq_format.pack(qw, fmt)
    assert t["qweight"].shape == (64 * bits // 32, 32) and t["qzeros"].shape == (4, 32 * bits // 32)
    back = gptq_format.unpack(t, bits, fmt)
    assert torch.equal(back.w_int, qw.w_int)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales)
    assert back.group_size == 16 and back.bits == bits
    if act_order:
        assert torch.equal(back.g_idx, qw.g_idx)
    else:
        assert back.g_idx is None
    for key, value in gptq_format.pack(back, fmt).items():
        assert torch.equal(value, t[key])
    torch.testing.assert_close(loader_style_dequant(t, bits, v2=fmt == "gptq_v2"), qw.dequantize())


def test_gptq_result_packs_and_loads_exactly_with_act_order():
    w, x = correlated_linear(seed=11)
    H, _ = accumulate_hessian(None, x, 0)
    q = gptq_quantize(w, H, bits=4, group_size=32, desc_act=True)
    t = gptq_format.pack(q)
    # GPTQ already rounds its scales to fp16, so what a loader rebuilds is exactly what GPTQ optimised.
    assert torch.equal(loader_style_dequant(t, 4), q.dequantize())
    assert torch.equal(t["g_idx"], q.g_idx)


def test_v1_rejects_zero_point_zero_and_v2_keeps_it():
    qw = random_qweight(8, 16, bits=4, group_size=16, min_zero=0)
    qw.zeros[0, 0] = 0
    with pytest.raises(QuantizationError, match="gptq_v2"):
        gptq_format.pack(qw, "gptq")
    assert torch.equal(gptq_format.unpack(gptq_format.pack(qw, "gptq_v2"), 4, "gptq_v2").zeros, qw.zeros)


def test_pack_rejects_unsupported_shapes_and_widths():
    with pytest.raises(QuantizationError, match="for \\(2, 4, 8\\) bits, not 3"):
        gptq_format.pack(random_qweight(8, 32, bits=3, group_size=16))
    with pytest.raises(QuantizationError, match="multiples of 8"):
        gptq_format.pack(random_qweight(12, 32, bits=4, group_size=16))
    with pytest.raises(QuantizationError, match="Unknown GPTQ checkpoint format 'gptq_v3'"):
        gptq_format.pack(random_qweight(8, 32, bits=4, group_size=16), "gptq_v3")


def test_quantization_config_is_read_by_transformers_and_gptqmodel_fields():
    from transformers import GPTQConfig

    cfg = gptq_format.quantization_config(4, 128, desc_act=False, sym=True, damp_percent=0.01)
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == cfg["format"] == "gptq"
    assert cfg["meta"]["damp_percent"] == 0.01 and cfg["meta"]["static_groups"] is False
    assert cfg["meta"]["quantizer"][0].startswith("quantship:")
    hf = GPTQConfig.from_dict(dict(cfg))
    assert (hf.bits, hf.group_size, hf.desc_act, hf.sym, hf.format) == (4, 128, False, True, "gptq")
    assert hf.act_group_aware is False


@pytest.mark.parametrize("desc_act, static_groups, declared", [
    (False, False, False), (True, True, False), (False, True, False), (True, False, True)])
def test_config_declares_desc_act_only_for_a_permuted_g_idx(desc_act, static_groups, declared):
    cfg = gptq_format.quantization_config(4, 128, desc_act=desc_act, sym=True, static_groups=static_groups)
    assert cfg["desc_act"] is declared
    assert (cfg["meta"]["act_order"], cfg["meta"]["static_groups"]) == (desc_act, static_groups)
    # TurboMind asserts desc_act false: static act-order loads, a permuted g_idx does not.
    problems = gptq_format.loader_violations("turbomind", cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"])
    assert [p.split("=")[0] for p in problems] == (["desc_act"] if declared else [])


def test_static_act_order_packs_an_in_order_g_idx():
    # What the declared desc_act: false promises: g_idx = i // group_size, and the unpacked weight is the same.
    w, x = correlated_linear(seed=7)
    H, _ = accumulate_hessian(None, x, 0)
    q = gptq_quantize(w, H, bits=4, group_size=32, sym=True, desc_act=True, static_groups=True)
    plain = gptq_quantize(w, H, bits=4, group_size=32, sym=True)
    assert not torch.equal(q.w_int, plain.w_int)  # act-order did change the codes
    packed = gptq_format.pack(q)
    assert torch.equal(packed["g_idx"], torch.arange(w.shape[1], dtype=torch.int32) // 32)
    back = gptq_format.unpack(packed, 4)
    assert back.g_idx is None and torch.equal(back.w_int, q.w_int)


def test_loader_constraints_as_data():
    assert gptq_format.loader_violations("turbomind", 4, 128, desc_act=False, sym=True) == []
    problems = gptq_format.loader_violations("turbomind", 8, 64, desc_act=True, sym=False, checkpoint_format="gptq_v2")
    assert [p.split("=")[0] for p in problems] == ["bits", "group_size", "desc_act", "sym", "checkpoint_format"]
    assert gptq_format.loader_violations("vllm-gptq-marlin", 4, 128, desc_act=True, sym=True) == []
    assert gptq_format.loader_violations("vllm-gptq-marlin", 4, 128, desc_act=False, sym=False) != []
    with pytest.raises(QuantizationError, match="known: "):
        gptq_format.loader_violations("tgi", 4, 128, False, True)
