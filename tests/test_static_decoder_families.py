"""The static-cache decoder (pipeline/serve/cuda_graphs.py) on every family it claims to reproduce
(``graph_step.SAME_LOOP``): Llama, Mistral, Qwen2 (biases on q/k/v) and Qwen3 (RMS norms on q and k), built
small from their configs with random weights. Each slot's logits, after a prefill and at every decode step,
must equal the model's own forward over the whole sequence (float32, CPU), with slots of different lengths
decoding in one batch."""

from __future__ import annotations

import pytest
import torch

from pipeline.serve.cuda_graphs import GraphedDecoder
from pipeline.serve.graph_step import SAME_LOOP, GraphedStep

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


def _model(family: str):
    import transformers

    cls, cfg_cls, extra = {
        "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
        "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {"use_sliding_window": False}),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 32, "use_sliding_window": False}),
    }[family]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**SMALL, **extra)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():  # random init leaves biases and norm weights at 0 / 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def test_every_family_of_the_static_loop_is_tested_here():
    assert set(SAME_LOOP) == {"llama", "mistral", "qwen2", "qwen3"}


@pytest.mark.parametrize("family", SAME_LOOP)
def test_static_decoder_logits_equal_the_models_forward(family):
    model = _model(family)
    assert model.config.model_type == family
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    if family == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")
    GraphedStep(model, 2, 64)  # the server's step accepts it (no refusal for this family)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 96, (11,), generator=g), torch.randint(0, 96, (7,), generator=g)]
    prompt = [5, 3]  # slot b prefills its first prompt[b] tokens, then decodes the rest one at a time
    with torch.inference_mode():
        full = [model(s[None]).logits[0] for s in seqs]
        dec = GraphedDecoder(model, max_batch=2, max_len=32)
        for b, s in enumerate(seqs):
            torch.testing.assert_close(dec.prefill(b, s[: prompt[b]]), full[b][prompt[b] - 1], rtol=1e-4, atol=1e-4)
        for t in range(len(seqs[1]) - prompt[1]):  # both slots decode together, at different positions
            feed = torch.stack([seqs[b][prompt[b] + t] for b in range(2)])
            logits = dec.step(feed)
            for b in range(2):
                torch.testing.assert_close(logits[b], full[b][prompt[b] + t], rtol=1e-4, atol=1e-4)


def test_fused_products_share_the_weights_and_decode_as_the_parts():
    """q|k|v and gate|up merged (pipeline/serve/fused_proj.py): the parts' weights become views of the fused
    weight (no second copy), the fused step equals the unfused one, and a part that cannot merge (here a 4-bit
    q_proj on the CPU) leaves its product to be called part by part, still exact."""
    from pipeline.engines.qlinear import Int4Linear
    from pipeline.quant.primitives import quantize_groupwise

    model = _model("llama")
    attn = model.model.layers[1].self_attn
    attn.q_proj = Int4Linear(quantize_groupwise(attn.q_proj.weight.detach(), 4, 32), dtype=torch.float32)
    seq = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(seq[None]).logits[0]
        plain = GraphedDecoder(model, max_batch=1, max_len=16, fuse=False)
        dec = GraphedDecoder(model, max_batch=1, max_len=16)
        kinds = [(f.qkv.kind, f.gate_up.kind) for f in dec.fused]
        assert kinds == [("dense", "dense"), ("separate", "dense")]
        layer0 = model.model.layers[0]
        ptr = dec.fused[0].qkv.weight.untyped_storage().data_ptr()
        assert all(getattr(layer0.self_attn, n).weight.untyped_storage().data_ptr() == ptr for n in ("q_proj", "k_proj", "v_proj"))
        assert layer0.mlp.up_proj.weight.untyped_storage().data_ptr() == dec.fused[0].gate_up.weight.untyped_storage().data_ptr()
        for d in (plain, dec):
            d.prefill(0, seq[:4])
        for t in range(4, 9):
            a, b = plain.step(seq[t : t + 1]), dec.step(seq[t : t + 1])
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b[0], full[t], rtol=1e-4, atol=1e-4)


def test_int8_parts_merge_into_one_w8a8_product_with_the_same_outputs():
    from pipeline.engines.int8_linear import Int8Linear
    from pipeline.serve.fused_proj import FusedLinear

    torch.manual_seed(4)
    parts = [Int8Linear.from_float(torch.nn.Linear(64, n, bias=True)) for n in (64, 32, 40)]
    x = torch.randn(3, 64)
    before = torch.cat([p(x) for p in parts], dim=-1)
    fused = FusedLinear(parts)
    assert fused.kind == "int8"
    assert torch.equal(fused(x), before) and torch.equal(fused(x[:1]), before[:1])
    assert all(p.weight.untyped_storage().data_ptr() == fused.int8.weight.untyped_storage().data_ptr() for p in parts)
    assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), before)  # the parts read the merged rows now


def test_parts_that_accelerate_offloads_are_not_merged():
    from pipeline.serve.fused_proj import FusedLinear

    parts = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)]
    parts[1]._hf_hook = object()  # accelerate's hook: it brings the weight in at call time
    assert FusedLinear(parts).kind == "separate"
    meta = [torch.nn.Linear(16, 8, device="meta"), torch.nn.Linear(16, 8, device="meta")]
    assert FusedLinear(meta).kind == "separate"
    assert FusedLinear([torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)]).kind == "dense"
    assert FusedLinear([torch.nn.Linear(16, 8), torch.nn.Linear(12, 4)]).kind == "separate"  # other inputs


def test_per_channel_fp8_parts_merge_and_mismatched_block_parts_do_not():
    from pipeline.engines.fp8_linear import Fp8Linear
    from pipeline.quant.fp8 import quantize_fp8_block, quantize_fp8_per_channel
    from pipeline.serve.fused_proj import FusedLinear

    torch.manual_seed(5)

    def fp8(n, block=None):
        w = torch.randn(n, 128)
        q, s = quantize_fp8_block(w, block) if block else quantize_fp8_per_channel(w)
        return Fp8Linear(q, s, block=block, bias=torch.randn(n))

    parts = [fp8(64), fp8(32), fp8(48)]
    x = torch.randn(3, 128)
    before = torch.cat([p(x) for p in parts], dim=-1)
    fused = FusedLinear(parts)
    assert fused.kind == "fp8"
    torch.testing.assert_close(fused(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), before, rtol=0, atol=0)  # parts: views
    assert parts[1].weight.untyped_storage().data_ptr() == fused.fp8.weight.untyped_storage().data_ptr()
    # a partial row of blocks before the last part: its scale rows would cover another part's rows
    assert FusedLinear([fp8(96, (128, 128)), fp8(128, (128, 128))]).kind == "separate"
    assert FusedLinear([fp8(128, (128, 128)), fp8(64)]).kind == "separate"  # blocks and per channel


@pytest.mark.parametrize("sizes", [(256, 128, 128), (128, 128, 80)])
def test_block_scaled_fp8_parts_merge_where_their_rows_of_blocks_are_whole(sizes):
    """q|k|v and gate|up of the FP8 checkpoints that ship 128x128 blocks: the rows of block scales concatenate (the
    last part may end in a partial row of blocks), the activations' 1 x 128 groups are the same for every part, so
    the merged product gives each part's outputs; the parts read views of the merged weight and scales."""
    from pipeline.engines.fp8_linear import Fp8Linear
    from pipeline.quant.fp8 import quantize_fp8_block
    from pipeline.serve.fused_proj import FusedLinear

    torch.manual_seed(6)
    parts = []
    for n in sizes:
        q, s = quantize_fp8_block(torch.randn(n, 320) * torch.rand(n, 1) * 4, (128, 128))  # a partial column block
        parts.append(Fp8Linear(q, s, block=(128, 128)))
    x = torch.randn(3, 320) * torch.linspace(0.01, 10, 320)  # 1 x 128 groups of very different magnitudes
    before = torch.cat([p(x) for p in parts], dim=-1)
    fused = FusedLinear(parts)
    assert fused.kind == "fp8" and fused.fp8.block == (128, 128)
    assert fused.fp8.weight_scale.shape == (sum(-(-n // 128) for n in sizes), 3)
    torch.testing.assert_close(fused(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), before, rtol=0, atol=0)  # parts: views
    assert all(p.weight_scale.untyped_storage().data_ptr() == fused.fp8.weight_scale.untyped_storage().data_ptr()
               for p in parts)


def test_int4_parts_on_the_cpu_kernel_merge_their_packed_weights_exactly():
    """bfloat16 Int4Linear on the CPU runs PyTorch's packed int4 kernel: rows of the packed weight concatenate, the
    scales concatenate along N, and every output is the part's own, for any number of tokens."""
    from pipeline.engines.qlinear import KERNEL_CPU, Int4Linear
    from pipeline.quant.primitives import quantize_groupwise
    from pipeline.serve.fused_proj import FusedLinear

    torch.manual_seed(6)
    parts = [Int4Linear(quantize_groupwise(torch.randn(n, 256), 4, 64), bias=torch.randn(n), dtype=torch.bfloat16)
             for n in (128, 64, 96)]  # fmt: skip
    assert {p.kernel for p in parts} == {KERNEL_CPU}
    xs = [torch.randn(m, 256).to(torch.bfloat16) for m in (1, 3, 20)]
    before = [torch.cat([p(x) for p in parts], dim=-1) for x in xs]
    fused = FusedLinear(parts)
    assert fused.kind == "int4" and fused.packed and not fused.gemv
    assert all(torch.equal(fused(x), b) for x, b in zip(xs, before))
    assert all(torch.equal(torch.cat([p(x) for p in parts], dim=-1), b) for x, b in zip(xs, before))
    ptr = fused.weight_int4pack.untyped_storage().data_ptr()
    assert all(p.weight_int4pack.untyped_storage().data_ptr() == ptr for p in parts)
    odd = [Int4Linear(quantize_groupwise(torch.randn(n, 256), 4, 64), dtype=torch.bfloat16) for n in (12, 8)]
    assert FusedLinear(odd).kind == "separate"  # 12 rows: the packed kernel refuses them (dequantize path)
    # 96 rows end in a short block of the CPU packing (64 rows with AVX-512): merged, they would read another
    # part's rows as theirs (wrong outputs on an AVX-512 machine), so the parts stay separate, and stay exact
    short = [Int4Linear(quantize_groupwise(torch.randn(n, 256), 4, 64), dtype=torch.bfloat16) for n in (96, 32, 64)]
    fused = FusedLinear(short)
    assert fused.kind == "separate"
    assert torch.equal(fused(xs[1]), torch.cat([p(xs[1]) for p in short], dim=-1))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_left_padded_prefill_gives_each_prompt_its_own_logits_and_cache(family):
    """The scheduler's batched prefill (prompts that arrive together, ``Scheduler._prefill_batch``) for each
    family the server serves: every row's last logits and its cache columns (the pads cut off) equal the prompt's
    own forward, up to float32 rounding (the padded rows' products run in another shape)."""
    from transformers import DynamicCache

    from pipeline.serve.batching import SamplingParams, Scheduler, Sequence

    model = _model(family)
    sched = Scheduler(model, lambda ids: "", [])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 6, 8)]
    seqs = [Sequence(p, SamplingParams(max_tokens=4), lambda event, payload: None) for p in prompts]
    assert all(sched._prefill_together(s) for s in seqs)
    with torch.inference_mode():
        cache, logits = sched._prefill_batch(seqs)
        for b, p in enumerate(prompts):
            own = DynamicCache(config=model.config)
            ref = model(input_ids=torch.tensor([p]), use_cache=True, **{sched._cache_kw: own}).logits[0, -1]
            torch.testing.assert_close(logits[b], ref.float(), rtol=1e-4, atol=1e-4)
            pad = 9 - len(p)
            for mine, theirs in zip(cache.layers, own.layers):
                torch.testing.assert_close(mine.keys[b : b + 1, :, pad:], theirs.keys, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(mine.values[b : b + 1, :, pad:], theirs.values, rtol=1e-4, atol=1e-4)


def test_a_model_with_sliding_window_layers_prefills_each_prompt_alone():
    """A sliding-window cache layer keeps a window, not the padded columns a row would be cut from."""
    import transformers

    from pipeline.serve.batching import SamplingParams, Scheduler, Sequence

    config = transformers.MistralConfig(**SMALL, sliding_window=16)
    sched = Scheduler(transformers.MistralForCausalLM(config).eval(), lambda ids: "", [])
    assert not sched._prefill_together(Sequence([1, 2, 3], SamplingParams(max_tokens=1), lambda e, p: None))
    from pipeline.serve.prefill import full_attention_cache

    assert full_attention_cache(_model("llama").config) and not full_attention_cache(object())  # no cache: alone
