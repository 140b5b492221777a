"""The layer walker: one decoder layer alive at a time, and packed checkpoints equal their fake-quant twins."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.engines.transformers_engine import load_model
from pipeline.formats import awq_gemm, gptq, w8a8
from pipeline.formats.checkpoint import CheckpointWriter, copy_side_files, open_checkpoint, write_config
from pipeline.quant import layerwise
from pipeline.quant.arch import arch_spec
from pipeline.quant.methods import AWQMethod, GPTQMethod, RTNMethod, SmoothQuantMethod


def run_walker(src, out, method, qconfig, emit_dequantized=False):
    config = AutoConfig.from_pretrained(src)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    writer = CheckpointWriter(out)
    with open_checkpoint(src) as ck:
        stats = layerwise.quantize_layerwise(ck, config, arch_spec("LlamaForCausalLM"), ids, method, writer.add,
                                             batch_size=2, emit_dequantized=emit_dequantized)
    writer.close()
    write_config(src, out, None if emit_dequantized else qconfig)
    copy_side_files(src, out)
    return stats


def test_only_one_decoder_layer_is_alive_at_a_time(tiny_llama_dir, tmp_path, monkeypatch):
    alive: list[weakref.ref] = []
    peak = [0]
    real = layerwise._decoder_layer

    def tracked(*args, **kwargs):
        gc.collect()
        layer, rotary = real(*args, **kwargs)
        alive.append(weakref.ref(layer))
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return layer, rotary

    monkeypatch.setattr(layerwise, "_decoder_layer", tracked)
    stats = run_walker(tiny_llama_dir, tmp_path / "q", GPTQMethod(4, 128, True, False, 0.01, 128),
                       gptq.quantization_config(4, 128, False, True))
    assert stats["layers"] == 2 and len(alive) == 2
    assert peak[0] == 1


@pytest.mark.parametrize("name", ["rtn", "awq", "gptq", "smoothquant"])
def test_packed_checkpoint_computes_what_the_fake_quant_layer_computed(tiny_llama_dir, tmp_path, name):
    methods = {
        "rtn": (lambda pack: RTNMethod(4, 128, pack=pack), awq_gemm.quantization_config(4, 128)),
        "awq": (lambda pack: AWQMethod(4, 128, n_grid=5, pack=pack), awq_gemm.quantization_config(4, 128)),
        "gptq": (lambda pack: GPTQMethod(4, 128, True, False, 0.01, 128, pack=pack),
                 gptq.quantization_config(4, 128, False, True)),
        "smoothquant": (lambda pack: SmoothQuantMethod(0.5, pack=pack), w8a8.quantization_config_lmdeploy()),
    }
    make, qconfig = methods[name]
    run_walker(tiny_llama_dir, tmp_path / "packed", make(True), qconfig)
    run_walker(tiny_llama_dir, tmp_path / "fake", make(False), qconfig, emit_dequantized=True)
    packed, _ = load_model(tmp_path / "packed")
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32).eval()
    ids = torch.randint(0, 2000, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = packed(ids).logits, fake(ids).logits
    # Weight-only formats reproduce the fake-quant weights exactly (fp16 scales are used by both); W8A8 also
    # quantizes activations per token at run time, so it is only close.
    tol = 5e-2 if name == "smoothquant" else 2e-3
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
