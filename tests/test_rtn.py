"""RTN over a whole checkpoint: the AWQ GEMM folder it writes, its errors, and the checkpoint reader/writer.

``tiny_llama_folder`` and ``save_tiny_tokenizer`` are reusable factories (to move into conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import ModelFolderError, QuantizationError
from pipeline.formats import awq_gemm
from pipeline.formats.checkpoint import CheckpointWriter, open_checkpoint
from pipeline.quant.arch import arch_spec
from pipeline.quant.rtn import quantize_checkpoint_rtn, rtn_quantize_weight

TINY_LLAMA = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512,
)


def save_tiny_tokenizer(path: Path, vocab_size: int = 512) -> None:
    """A word-level tokenizer (w0 .. w{n-3}, <unk>, </s>) saved as a transformers fast tokenizer, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"<unk>": vocab_size - 2, "</s>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def tiny_llama_folder(path: Path, seed: int = 0, dtype=torch.float32, safetensors: bool = True, tokenizer=True, **cfg):
    """A random LlamaForCausalLM saved with save_pretrained to ``path``; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **cfg})).to(dtype)
    model.save_pretrained(path)
    if not safetensors:  # transformers 5 writes safetensors only: make the legacy pickled folder by hand
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    if tokenizer:
        save_tiny_tokenizer(path, model.config.vocab_size)
    return path


def test_rtn_writes_an_awq_gemm_folder(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", dtype=torch.bfloat16)
    calls = []
    stats = quantize_checkpoint_rtn(src, tmp_path / "out", group_size=128, progress=lambda *a: calls.append(a))
    out = tmp_path / "out"

    assert calls == [(1, 2, "layer 1/2"), (2, 2, "layer 2/2")]
    assert stats["quantized_linears"] == 2 * 7 and stats["layers"] == 2
    assert stats["weight_bytes"] == (out / "model.safetensors").stat().st_size
    assert stats["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == awq_gemm.quantization_config(4, 128)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}

    spec = arch_spec("LlamaForCausalLM")
    with open_checkpoint(src) as s, open_checkpoint(out) as q:
        for i in range(2):
            for linear in spec.linears:
                name = f"model.layers.{i}.{linear}"
                w = s.get(f"{name}.weight")
                out_f, in_f = w.shape
                t = q.get_prefix(name)
                assert set(t) == {"qweight", "qzeros", "scales"}
                assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (in_f, out_f // 8)
                assert tuple(t["qzeros"].shape) == (in_f // 128, out_f // 8)
                assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (in_f // 128, out_f)
                back = awq_gemm.unpack(t["qweight"], t["qzeros"], t["scales"], 128)
                expected = rtn_quantize_weight(w, 4, 128)
                assert torch.equal(back.w_int, expected.w_int) and torch.equal(back.zeros, expected.zeros)
                # RTN error is at most one step of the group's scale (half a step, plus a rounded zero point).
                step = back.scales.repeat_interleave(128, dim=1)
                assert ((back.dequantize() - w.float()).abs() <= step * 1.001).all()
        # Everything that is not a decoder linear is kept bit for bit, in the source dtype.
        kept = [k for k in s.keys() if not any(k.endswith(f"{lin}.weight") for lin in spec.linears)]
        assert "model.embed_tokens.weight" in kept and "lm_head.weight" in kept and "model.norm.weight" in kept
        for k in kept:
            assert q.get(k).dtype == torch.bfloat16 and torch.equal(q.get(k), s.get(k))
        assert len(q.keys()) == len(kept) + 3 * 2 * 7


def test_rtn_codes_use_the_fp16_scales_the_loader_multiplies_by():
    w = torch.randn(16, 256) * 0.05
    qw = rtn_quantize_weight(w, 4, 128)
    assert torch.equal(qw.scales, qw.scales.half().float())
    g = w.reshape(16, 2, 128)
    recomputed = torch.clamp(torch.round(g / qw.scales[..., None]) + qw.zeros[..., None], 0, 15).reshape(16, 256)
    assert torch.equal(qw.w_int, recomputed.to(torch.int32))


def test_group_size_that_does_not_divide_a_width_names_the_linear(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", tokenizer=False)
    with pytest.raises(QuantizationError) as e:
        quantize_checkpoint_rtn(src, tmp_path / "out", group_size=96)
    msg = str(e.value)
    # 96 divides the hidden width 768? no: 768 = 8 * 96 does, 256 does not -> every linear reading 256 columns.
    assert "model.layers.0.self_attn.q_proj (in 256 not divisible by group size 96)" in msg
    assert "mlp.down_proj" not in msg.split("Each group")[0]  # down_proj reads 768 = 8 * 96: it fits
    assert "Group sizes that fit: 32, 64, 128, 256" in msg
    assert not (tmp_path / "out").exists()  # validated before any work


def test_rtn_refuses_other_bit_widths_and_quantized_sources(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", tokenizer=False)
    with pytest.raises(QuantizationError, match="4-bit weights only"):
        quantize_checkpoint_rtn(src, tmp_path / "out8", bits=8)
    quantize_checkpoint_rtn(src, tmp_path / "q", group_size=64)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_checkpoint_rtn(tmp_path / "q", tmp_path / "qq")


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", safetensors=False, tokenizer=False)
    assert (src / "pytorch_model.bin").is_file() and not (src / "model.safetensors").exists()
    with pytest.raises(ModelFolderError, match="allow_pickle: true"):
        quantize_checkpoint_rtn(src, tmp_path / "out")
    stats = quantize_checkpoint_rtn(src, tmp_path / "out", group_size=64, allow_pickle=True)
    assert stats["quantized_linears"] == 14


def test_writer_shards_with_an_index_and_reader_reads_all_shards(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", tokenizer=False)
    quantize_checkpoint_rtn(src, tmp_path / "out", group_size=128, max_shard_bytes=600_000)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists() and not list(out.glob(".part-*"))
    with open_checkpoint(out) as ck:
        sizes = sum(ck.get(k).numel() * ck.get(k).element_size() for k in ck.keys())
        assert sorted(ck.keys()) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sizes


def test_reader_reports_a_missing_shard(tmp_path):
    w = CheckpointWriter(tmp_path, max_shard_bytes=10)
    w.add("a", torch.zeros(4))
    w.add("b", torch.ones(4))
    assert w.close() == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                         "model.safetensors.index.json"]
    with open_checkpoint(tmp_path) as ck:
        assert torch.equal(ck.get("b"), torch.ones(4)) and ck.shape("a") == (4,)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("sym,clip", [(False, 1.0), (True, 1.0), (False, 0.8), (False, "tensor")])
def test_fake_quantize_equals_quantize_then_dequantize(sym, clip):
    # fake_quantize skips the integer copy and the per-column gather; its values must be the same, bit for bit.
    from pipeline.quant.primitives import fake_quantize, quantize_groupwise

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    ratio = torch.rand(48, 4, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.5 if clip == "tensor" else clip
    assert torch.equal(fake_quantize(w, 4, 64, sym, ratio), quantize_groupwise(w, 4, 64, sym, ratio).dequantize())


@pytest.mark.parametrize("method", ["gptq", "smoothquant", "fp8"])
def test_every_method_refuses_an_already_quantized_source_in_a_run(tmp_path, method):
    """A calibrated method used to fail on a quantized folder with "tensor ... q_proj.weight is not in the
    checkpoint"; every method now names the real problem and the two ways on, and the run exits non-zero."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from tests.conftest import write_recipe

    src = tiny_llama_folder(tmp_path / "src")
    quantize_checkpoint_rtn(src, tmp_path / "awq", group_size=64)
    recipe = write_recipe(tmp_path, f"""
name: requant
model:
  source: {tmp_path / "awq"}
calibration:
  source: {{calib}}
  samples: 2
  seq_len: 32
quantize:
  method: {method}
compile:
  target: transformers
  device: cpu
""")
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code != 0
    assert "is already quantized (config.json has quantization_config 'awq')" in res.output
    assert "quantize.method: none" in res.output and "Traceback" not in res.output
    assert not any((tmp_path / "outputs" / "requant").glob("quantize-*/model"))  # nothing half-written in place
