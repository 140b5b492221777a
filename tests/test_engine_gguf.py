"""The gguf target: our integers as Q4_0/Q4_1/Q8_0 blocks (checked with the gguf package's own dequantizer),
the GGUF file read back with gguf.GGUFReader, the Ollama Modelfile, and — where llama-cpp-python is installed —
the file run in llama.cpp against the transformers target on the same tokens."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.errors import QuantizationError
from pipeline.formats import gguf_blocks as gb
from pipeline.quant.primitives import QuantizedWeight, quantize_groupwise
from tests.conftest import EVAL_TEXT, TINY_MODEL, write_recipe

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

Q = gguf.GGMLQuantizationType


def _qw(bits=4, group=128, sym=False, out=64, n_in=256, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    qw = quantize_groupwise(torch.randn(out, n_in, generator=g) * 0.05, bits, group, sym=sym)
    qw.scales = qw.scales.half().float()  # as AWQ/GPTQ store them
    return qw


# ------------------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("group", [32, 64, 128])
def test_q4_0_blocks_dequantize_exactly_to_our_weights(group):
    qw = _qw(group=group, sym=True)
    kind, blocks = gb.blocks_for(qw)
    assert kind == "Q4_0" and blocks.shape == (64, 256 // 32 * 18) and blocks.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(blocks, Q.Q4_0), qw.dequantize().numpy())


@pytest.mark.parametrize("group", [32, 128])
def test_q4_1_blocks_match_within_the_fp16_rounding_of_m(group):
    qw = _qw(group=group, sym=False, seed=group)
    kind, blocks = gb.blocks_for(qw)
    assert kind == "Q4_1" and blocks.shape == (64, 256 // 32 * 20)
    ours = qw.dequantize().double().numpy()
    theirs = dequantize(blocks, Q.Q4_1).astype(np.float64)
    # Per element: |m16 - (-z s)| of its group (exact in float64) plus fp32 rounding of q*d + m.
    s = qw.scales.double()
    exact_m = -(qw.zeros.double() * s)
    dm = (exact_m.to(torch.float16).double() - exact_m).abs().repeat_interleave(group, dim=1).numpy()
    err = np.abs(theirs - ours)
    assert (err <= dm + 2.0**-24 * np.abs(theirs)).all()
    assert err.max() > 0  # m really is rounded: the bound is not vacuous
    e = gb.q4_1_offset_error(qw)
    assert e["within_bound"] and e["max_abs"] <= e["bound"]
    assert e["max_in_steps"] <= 15 * 2.0**-11  # under 1% of a quantization step (z <= 15)


def test_q4_nibble_layout_is_ggml_s():
    # byte j of a block: element j in the low nibble, element j + 16 in the high one (ggml-quants.c)
    codes = torch.tensor([list(range(16)) + list(range(15, -1, -1))], dtype=torch.int32)
    qw = QuantizedWeight(codes, torch.ones(1, 1), torch.full((1, 1), 8, dtype=torch.int32), 4, 32)
    blocks = gb.q4_0_blocks(qw)
    assert blocks[0, :2].view(np.float16)[0] == 1.0
    assert list(blocks[0, 2:]) == [j | ((15 - j) << 4) for j in range(16)]


def test_q8_0_from_symmetric_8bit_codes_is_exact():
    qw = _qw(bits=8, group=64, sym=True)
    kind, blocks = gb.blocks_for(qw)
    assert kind == "Q8_0" and blocks.shape == (64, 256 // 32 * 34)
    np.testing.assert_array_equal(dequantize(blocks, Q.Q8_0), qw.dequantize().numpy())


def test_q8_0_from_w8a8_rounds_only_the_scale_to_fp16():
    from pipeline.quant.primitives import quantize_per_channel_int8

    w_int8, scale = quantize_per_channel_int8(torch.randn(64, 256) * 0.05)
    theirs = dequantize(gb.q8_0_blocks(w_int8, scale), Q.Q8_0).astype(np.float64)
    ours = (w_int8.double() * scale.double()).numpy()
    rel = gb.q8_0_scale_error(scale)
    assert 0 < rel["max_rel"] <= 2.0**-11 and rel["subnormal_rows"] == 0
    np.testing.assert_array_less(np.abs(theirs - ours), rel["max_rel"] * np.abs(ours) * (1 + 1e-6) + 1e-12)


def test_blocks_refuse_what_gguf_cannot_hold_exactly():
    with pytest.raises(QuantizationError, match="multiple of 32"):
        gb.blocks_for(_qw(group=16))
    with pytest.raises(QuantizationError, match="asymmetric"):
        gb.blocks_for(_qw(bits=8, group=64, sym=False))
    permuted = _qw(sym=True)
    permuted.g_idx = torch.arange(256).flip(0) // 128
    with pytest.raises(QuantizationError, match="permuted group order"):
        gb.blocks_for(permuted)
    odd = _qw(sym=True)
    odd.scales = odd.scales + 1e-7  # not a float16 number
    with pytest.raises(QuantizationError, match="not exactly a float16"):
        gb.blocks_for(odd)


def test_rope_permutation_interleaves_each_heads_halves():
    rows = torch.arange(16)  # 2 heads of 8 rows: halves [0..3], [4..7]
    assert gb.permute_rows_for_rope(rows, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


# ------------------------------------------------------------------------------------------------ the file


def _build(src: Path, out: Path):
    from pipeline.engines import gguf_engine
    from pipeline.engines.base import BuildContext
    from pipeline.formats.detect import detect_format

    out.mkdir(parents=True)
    cfg = SimpleNamespace(session_len=None, max_batch_size=8)
    ctx = BuildContext(src=src, fmt=detect_format(src), cfg=cfg, out=out, device="cpu", model_name="tiny")
    return gguf_engine.build(ctx)


@pytest.fixture(scope="module")
def awq_artifact(tmp_path_factory):
    from pipeline.quant.rtn import quantize_checkpoint_rtn

    root = tmp_path_factory.mktemp("gguf")
    quantize_checkpoint_rtn(TINY_MODEL, root / "q", bits=4, group_size=128, sym=False)
    return root / "q", root / "art", _build(root / "q", root / "art")


def test_gguf_file_reads_back_with_our_blocks_and_metadata(awq_artifact):
    from safetensors.torch import load_file

    from pipeline.formats import awq_gemm

    qdir, art, metrics = awq_artifact
    assert metrics["tensor_types"] == {"F16": 2, "F32": 9, "Q4_1": 28} and metrics["file_type"] == "MOSTLY_Q4_1"
    assert metrics["rounding"]["q4_1_offset_max_abs"] <= metrics["rounding"]["q4_1_offset_bound"]
    r = gguf.GGUFReader(art / "model" / "model.gguf")
    t = {x.name: x for x in r.tensors}
    assert set(t) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(4) for n in
        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}
    assert t["blk.0.attn_k.weight"].tensor_type == Q.Q4_1 and list(t["blk.0.attn_k.weight"].shape) == [256, 128]
    assert t["token_embd.weight"].tensor_type == Q.F16 and t["output_norm.weight"].tensor_type == Q.F32
    # attn_k: our integers, rows in llama.cpp's rotary order (2 KV heads), byte for byte
    sd = load_file(qdir / "model.safetensors")
    p = "model.layers.0.self_attn.k_proj."
    qw = awq_gemm.unpack(sd[p + "qweight"], sd[p + "qzeros"], sd[p + "scales"], 128)
    expect = gb.permute_rows_for_rope(gb.q4_1_blocks(qw), 2)
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_k.weight"].data), expect)

    def field(k):
        return r.fields[k].contents()

    assert field("general.architecture") == "llama" and field("llama.block_count") == 4
    assert field("llama.attention.head_count_kv") == 2 and field("llama.rope.dimension_count") == 64
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(field("tokenizer.ggml.tokens")) == 2048 and field("tokenizer.ggml.tokens")[3] == "<|im_end|>"
    assert field("tokenizer.ggml.eos_token_id") == 3 and field("tokenizer.ggml.bos_token_id") == 0
    assert field("tokenizer.ggml.add_bos_token") is False  # the HF tokenizer adds no BOS either
    assert field("tokenizer.chat_template") == (TINY_MODEL / "chat_template.jinja").read_text()


def test_bf16_reference_keeps_its_bits(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "bf16"
    shutil.copytree(TINY_MODEL, src)
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(sd, src / "model.safetensors")
    metrics = _build(src, tmp_path / "art")
    assert metrics["tensor_types"] == {"BF16": 30, "F32": 9} and metrics["file_type"] == "MOSTLY_BF16"
    t = {x.name: x for x in gguf.GGUFReader(tmp_path / "art" / "model" / "model.gguf").tensors}
    v = sd["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(dequantize(np.asarray(t["blk.1.ffn_down.weight"].data), Q.BF16), v.float().numpy())


_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


def _write_quantized(out: Path, fmt: str) -> Path:
    """The tiny model with every decoder linear as symmetric 8-bit GPTQ (group 64) or lmdeploy W8A8, packed by
    our format modules (RTN integers: the layout is under test here, not the algorithm)."""
    from safetensors.torch import load_file

    from pipeline.formats import gptq, w8a8
    from pipeline.formats.checkpoint import CheckpointWriter, copy_side_files, write_config
    from pipeline.quant.primitives import quantize_per_channel_int8

    writer = CheckpointWriter(out)
    for name, t in load_file(TINY_MODEL / "model.safetensors").items():
        mod = name.rpartition(".")[0]
        if not mod.endswith(_LINEARS):
            writer.add(name, t)
        elif fmt == "gptq":
            qw = quantize_groupwise(t.float(), 8, 64, sym=True)
            for k, v in gptq.pack(qw).items():
                writer.add(f"{mod}.{k}", v)
        else:
            for k, v in w8a8.pack_lmdeploy(*quantize_per_channel_int8(t.float())).items():
                writer.add(f"{mod}.{k}", v)
    writer.close()
    qc = (gptq.quantization_config(8, 64, desc_act=False, sym=True) if fmt == "gptq"
          else w8a8.quantization_config_lmdeploy())
    write_config(TINY_MODEL, out, qc)
    copy_side_files(TINY_MODEL, out)
    return out


@pytest.mark.parametrize("fmt", ["gptq", "w8a8"])
def test_8bit_checkpoints_become_q8_0(tmp_path, fmt):
    src = _write_quantized(tmp_path / fmt, fmt)
    metrics = _build(src, tmp_path / "art")
    assert metrics["tensor_types"] == {"F16": 2, "F32": 9, "Q8_0": 28} and metrics["file_type"] == "MOSTLY_Q8_0"
    rel = metrics["rounding"]["q8_0_scale_max_rel"]
    assert (rel == 0.0) if fmt == "gptq" else (0 < rel <= 2.0**-11)  # GPTQ scales are fp16 already
    if _has_llama_cpp() is None:  # the same logits as the transformers target on 256 tokens
        from pipeline.engines import gguf_engine
        from pipeline.engines.transformers_engine import load_model

        cpp, tok = gguf_engine.load(tmp_path / "art", "cpu")
        ids = tok(EVAL_TEXT.read_text()[:4000], return_tensors="pt")["input_ids"][:, :256]
        with torch.no_grad():
            ref = load_model(src, device="cpu", dtype=torch.float32)[0](input_ids=ids).logits.log_softmax(-1)
        got = cpp(ids).log_softmax(-1)
        kl = (ref.exp() * (ref - got)).sum(-1).mean()
        # measured: KL 1.5e-5 (gptq) / 5.2e-5 (w8a8: its transformers runtime quantizes activations per token,
        # llama.cpp per block of 32), top-1 0.996 / 0.980
        assert kl < 1e-3 and (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.95


def test_llama3_rope_writes_rope_freqs_that_match_transformers(tmp_path):
    import shutil

    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    src = tmp_path / "rope"
    shutil.copytree(TINY_MODEL, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(cfg))
    _build(src, tmp_path / "art")
    t = {x.name: x for x in gguf.GGUFReader(tmp_path / "art" / "model" / "model.gguf").tensors}
    factors = np.asarray(t["rope_freqs.weight"].data)
    config = AutoConfig.from_pretrained(src)
    scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].double().numpy()
    plain = 1.0 / (10000.0 ** (np.arange(0, 64, 2) / 64))
    np.testing.assert_allclose(factors, plain / scaled, rtol=1e-5)  # llama.cpp divides the frequencies by them
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[5] < 8.0  # k = 4..8 interpolated
    if _has_llama_cpp() is None:  # and llama.cpp computes what transformers computes with them
        from pipeline.engines import gguf_engine
        from pipeline.engines.transformers_engine import load_model

        cpp, tok = gguf_engine.load(tmp_path / "art", "cpu")
        ids = tok(EVAL_TEXT.read_text()[:4000], return_tensors="pt")["input_ids"][:, :256]
        with torch.no_grad():
            ref = load_model(src, device="cpu", dtype=torch.float32)[0](input_ids=ids).logits.log_softmax(-1)
        got = cpp(ids).log_softmax(-1)
        assert (ref.exp() * (ref - got)).sum(-1).mean() < 1e-4  # measured 6e-8; 0.11 without rope_freqs


@pytest.mark.parametrize("change, error", [
    ({"architectures": ["Qwen2ForCausalLM"]}, "architecture Qwen2ForCausalLM is not one the gguf target writes"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn' is not written"),
    (None, "has no tokenizer.json"),
])
def test_build_refuses_what_it_cannot_write_before_any_work(tmp_path, change, error):
    import shutil

    from pipeline.errors import ModelFolderError

    src = tmp_path / "m"
    shutil.copytree(TINY_MODEL, src)
    if change is None:
        (src / "tokenizer.json").unlink()
    else:
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises((QuantizationError, ModelFolderError), match=error):
        _build(src, tmp_path / "art")
    assert not (tmp_path / "art" / "model" / "model.gguf").exists()


def test_modelfile_carries_a_go_template_and_stop_tokens(awq_artifact):
    _, art, metrics = awq_artifact
    text = (art / "model" / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert ('TEMPLATE """<|begin_of_text|>{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n'
            "{{ .Content }}<|im_end|>\n") in text
    assert text.count("{{ end }}{{ end }}<|im_start|>assistant\n\"\"\"") == 1
    assert json.loads((art / "gguf.json").read_text())["n_ctx"] == 2048
    assert (art / "model" / "tokenizer.json").is_file() and (art / "model" / "chat_template.jinja").is_file()


def test_serve_command_llama_server_keeps_the_key_out_of_argv(awq_artifact, tmp_path, monkeypatch):
    from pipeline.engines import gguf_engine

    stand_in = tmp_path / "bin" / "llama-server"  # a stand-in binary: only its path is used, it never runs
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 1\n")
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_in.parent}:/usr/bin:/bin")
    _, art, _ = awq_artifact
    cmd = gguf_engine.serve_command(art, "127.0.0.1", 8011, "sekret", "tiny")
    assert cmd.argv == [str(stand_in), "-m", str(art / "model" / "model.gguf"), "--host", "127.0.0.1", "--port", "8011",
                        "--ctx-size", "8192", "--parallel", "4", "--alias", "tiny", "--jinja",
                        "--chat-template-file", str(art / "model" / "chat_template.jinja")]
    assert cmd.env == {"LLAMA_API_KEY": "sekret"} and cmd.health_path == "/health"
    assert "sekret" not in cmd.shell()


def test_serve_command_llama_cpp_python_server(awq_artifact, monkeypatch):
    import importlib.util
    import sys

    from pipeline.engines import gguf_engine

    if any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "sse_starlette", "pydantic_settings")):
        pytest.skip("llama-cpp-python[server] is not installed")
    monkeypatch.setenv("PATH", "/nonexistent")
    _, art, _ = awq_artifact
    cmd = gguf_engine.serve_command(art, "127.0.0.1", 8012, "sekret", "tiny")
    assert cmd.argv == [sys.executable, "-m", "llama_cpp.server", "--model", str(art / "model" / "model.gguf"),
                        "--host", "127.0.0.1", "--port", "8012", "--n_ctx", "2048", "--model_alias", "tiny"]
    assert cmd.env == {"API_KEY": "sekret"} and cmd.health_path == "/v1/models"
    from llama_cpp.server.settings import ServerSettings

    monkeypatch.setenv("API_KEY", "sekret")
    assert ServerSettings().api_key == "sekret"  # the server reads the key from that variable


def test_go_template_refuses_a_template_it_cannot_reproduce():
    from transformers import PreTrainedTokenizerFast

    from pipeline.engines.ollama_modelfile import go_template

    tok = PreTrainedTokenizerFast.from_pretrained(TINY_MODEL)
    numbered = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
    assert go_template(tok, numbered) is None  # depends on the position, not only on the role
    plain = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert go_template(tok, plain) == ('{{ range .Messages }}{{ if eq .Role "system" }}[system] {{ .Content }}\n'
                                       '{{ else if eq .Role "user" }}[user] {{ .Content }}\n'
                                       '{{ else if eq .Role "assistant" }}[assistant] {{ .Content }}\n'
                                       "{{ end }}{{ end }}")


def test_target_row_rules():
    from pipeline.targets import FormatSettings, check_target_loads

    assert check_target_loads("gguf", FormatSettings("awq", 4, 128, sym=False)) is None
    assert check_target_loads("gguf", FormatSettings("gptq", 8, 128, sym=True)) is None
    assert check_target_loads("gguf", FormatSettings("w8a8", 8)) is None
    assert "group size" in check_target_loads("gguf", FormatSettings("awq", 4, 48))
    assert "g_idx" in check_target_loads("gguf", FormatSettings("gptq", 4, 128, permuted_g_idx=True))


# ------------------------------------------------------------------------------------------------ llama.cpp

RECIPE = """\
name: gg
model: {{source: {model}}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
eval: {{text: {eval}, seq_len: 128, max_tokens: 768}}
serve: {{max_tokens: 4}}
matrix: {{compile.target: [transformers, gguf]}}
"""


def _has_llama_cpp() -> str | None:
    from pipeline.engines.base import package_present

    return None if package_present("llama_cpp") else (
        "llama-cpp-python is not installed (it builds from source: pip install 'quantship[test]')")


@pytest.mark.slow
@pytest.mark.skipif(_has_llama_cpp() is not None, reason=str(_has_llama_cpp()))
def test_llama_cpp_perplexity_matches_the_transformers_target(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "outputs"
    res = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, RECIPE)), "-o", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    engines = {json.loads(p.read_text())["target"]: json.loads(p.read_text())
               for p in (out / "gg").glob("compile-*/engine.json")}
    engines_by_dir = {p.parent.name: json.loads(p.read_text())["target"]
                      for p in (out / "gg").glob("compile-*/engine.json")}
    assert engines["gguf"]["status"] == "ran here" and engines["gguf"]["check_run"]["tokenizer_agrees"] is True
    ppl = {}
    for p in (out / "gg").glob("evaluate-*/metrics.json"):
        compile_dir = json.loads((p.parent / "manifest.json").read_text())["inputs"]["compile"]["dir"]
        target = json.loads((out / "gg" / compile_dir / "engine.json").read_text())["target"]
        ppl[target] = json.loads(p.read_text())
    assert set(ppl) == {"transformers", "gguf"}
    assert ppl["gguf"]["tokens"] == ppl["transformers"]["tokens"]
    # Same integers, different arithmetic (llama.cpp quantizes the activations to 8 bits per block of 32 for its
    # Q4_1 dot products and runs the fp16 embeddings/lm_head with fp16 activations; we dequantize to fp32).
    # Measured on 2047 tokens of this text: ppl 138.2053 vs 138.1966 (6e-5 relative), KL(transformers ||
    # llama.cpp) 1.3e-5 nats/token, top-1 agreement 0.997. Tolerances leave ~15x room for other CPUs' kernels.
    tr, cpp = ppl["transformers"], ppl["gguf"]
    assert abs(cpp["ppl"] - tr["ppl"]) / tr["ppl"] < 1e-3, (cpp["ppl"], tr["ppl"])
    assert abs(cpp["kl_mean"] - tr["kl_mean"]) < 2e-4 and abs(cpp["top1_agreement"] - tr["top1_agreement"]) < 0.01
    smoke = {json.loads((p.parent / "manifest.json").read_text())["inputs"]["compile"]["dir"]: json.loads(p.read_text())
             for p in (out / "gg").glob("serve-*/smoke.json")}
    served = {engines_by_dir[d]: s for d, s in smoke.items()}
    assert served["gguf"]["status"] == "passed" and served["gguf"]["served_by"] != "embedded"
    # llama.cpp's server renders the GGUF's chat template to the same prompt tokens and answers greedily alike
    assert served["gguf"]["usage"] == served["transformers"]["usage"]
    assert served["gguf"]["reply"] == served["transformers"]["reply"]
