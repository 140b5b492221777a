"""The onnxruntime target: MatMulNBits repacking (pure), its meaning in the real ONNX Runtime kernel, the export
of our AWQ and GPTQ checkpoints by onnxruntime-genai's builder with our integers intact, and perplexity through
the evaluate stage against the transformers target on the same tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.formats import awq_gemm, gptq, matmulnbits
from pipeline.quant.primitives import QuantizedWeight
from pipeline.stages.compile import source_model_dir
from tests.conftest import write_recipe

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _random_qw(out_features: int, in_features: int, group: int, seed: int = 0, sym: bool = False) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group
    zeros = torch.full((out_features, groups), 8, dtype=torch.int32) if sym else \
        torch.randint(1, 16, (out_features, groups), generator=g, dtype=torch.int32)
    return QuantizedWeight(
        w_int=torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.int32),
        scales=(torch.rand(out_features, groups, generator=g) * 0.01 + 1e-3).half().float(),
        zeros=zeros, bits=4, group_size=group,
    )


def test_nibbles_are_low_first_and_zero_points_pad_per_row():
    qw = QuantizedWeight(w_int=torch.tensor([[1, 2] * 8 + [3, 4] * 8 + [5, 6] * 8]), scales=torch.ones(1, 3),
                         zeros=torch.tensor([[7, 9, 11]]), bits=4, group_size=16)
    packed = matmulnbits.pack(qw)
    assert packed["B"].shape == (1, 3, 8) and packed["B"].dtype == torch.uint8
    assert packed["B"][0, :, 0].tolist() == [0x21, 0x43, 0x65]
    # three zero points: 7 | 9 << 4, then 11 alone in a padded byte (rows never share a byte)
    assert packed["zero_points"].tolist() == [0x97, 0x0B]


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_checkpoint_to_matmulnbits_round_trip(fmt):
    qw = _random_qw(48, 96, 32, seed=1, sym=fmt == "gptq")  # 3 blocks: odd count pads each zero-point row
    tensors = awq_gemm.pack(qw) if fmt == "awq" else gptq.pack(qw)
    config = awq_gemm.quantization_config(4, 32) if fmt == "awq" else gptq.quantization_config(4, 32, False, True)
    ours = matmulnbits.checkpoint_linear(fmt, tensors, config)
    p = matmulnbits.pack(ours)
    back = matmulnbits.unpack(p["B"], p["scales"], p["zero_points"], p["K"], p["N"], p["block_size"])
    assert torch.equal(back.w_int, qw.w_int) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales)


def test_ragged_k_is_padded_and_unpacked_back():
    qw = _random_qw(8, 48, 16, seed=2)
    qw = QuantizedWeight(qw.w_int[:, :40], qw.scales, qw.zeros, 4, 16)  # K = 40: the third block is half empty
    p = matmulnbits.pack(qw)
    assert p["B"].shape == (8, 3, 8)
    back = matmulnbits.unpack(p["B"], p["scales"], p["zero_points"], 40, 8, 16)
    assert torch.equal(back.w_int, qw.w_int)


def test_block_size_must_be_a_power_of_two_of_at_least_16():
    from pipeline.errors import QuantizationError

    with pytest.raises(QuantizationError, match="power of two and at least 16"):
        matmulnbits.pack(_random_qw(8, 96, 48))
    with pytest.raises(QuantizationError, match="power of two"):
        matmulnbits.check_block_size(8)


def test_packed_layout_means_our_weights_in_the_onnxruntime_kernel(tmp_path):
    """One MatMulNBits node with our packed initializers computes x @ dequantize(ours).T in ONNX Runtime."""
    from onnx import TensorProto, helper, numpy_helper

    qw = _random_qw(64, 96, 32, seed=3)
    p = matmulnbits.pack(qw)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
                            K=p["K"], N=p["N"], bits=4, block_size=p["block_size"], accuracy_level=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 64])],
        [numpy_helper.from_array(p["B"].numpy(), "B"), numpy_helper.from_array(p["scales"].numpy(), "scales"),
         numpy_helper.from_array(p["zero_points"].numpy(), "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), x @ qw.dequantize().T, rtol=1e-4, atol=1e-5)


def test_targets_row_says_what_matmulnbits_loads():
    from pipeline.targets import FormatSettings, check_target_loads

    assert check_target_loads("onnxruntime", FormatSettings("awq", 4, 128)) is None
    assert check_target_loads("onnxruntime", FormatSettings("gptq", 4, 64, sym=True)) is None
    assert "group size" in check_target_loads("onnxruntime", FormatSettings("awq", 4, 96))
    assert "g_idx" in check_target_loads("onnxruntime", FormatSettings("gptq", 4, 128, permuted_g_idx=True))


# ---------------------------------------------------------------- the real pipeline on the shipped tiny model

RECIPE = """\
name: ortq
model:
  source: {model}
calibration:
  source: {calib}
  samples: 4
  seq_len: 128
  seed: 0
quantize:
  method: rtn
  w_bits: 4
  w_group_size: 64
compile:
  target: transformers
  device: cpu
eval:
  text: {eval}
  seq_len: 256
  max_tokens: 512
matrix:
  quantize.method: [rtn, gptq]
  compile.target: [transformers, onnxruntime]
"""


@pytest.fixture(scope="module")
def ortq(tmp_path_factory) -> dict:
    from click.testing import CliRunner

    from pipeline.artifacts import MANIFEST
    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("ortq")
    res = CliRunner().invoke(main, ["run", str(write_recipe(tmp, RECIPE)), "-o", str(tmp / "out")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    runs: dict = {}
    for path in (tmp / "out" / "ortq").glob(f"*/{MANIFEST}"):
        m = json.loads(path.read_text())
        for v in m["variants"]:
            runs.setdefault(v, {})[m["stage"]] = (path.parent, m)
    return runs


def _variant(runs: dict, method: str, target: str) -> dict:
    (label,) = [v for v in runs if method in v and target in v]
    return runs[label]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_perplexity_matches_the_transformers_target_on_the_same_tokens(ortq, method):
    ours = _variant(ortq, method, "transformers")["evaluate"][1]["metrics"]
    onnx_m = _variant(ortq, method, "onnxruntime")["evaluate"][1]["metrics"]
    assert onnx_m["tokens"] == ours["tokens"] == 511
    assert onnx_m["ref_ppl"] == ours["ref_ppl"]
    assert abs(onnx_m["ppl"] / ours["ppl"] - 1) < 0.01  # the bound
    assert abs(onnx_m["ppl"] / ours["ppl"] - 1) < 5e-4  # measured: ~1e-7 (both fp32; accuracy_level 1)
    assert onnx_m["ppl"] != onnx_m["ref_ppl"]  # the int4 graph, not the reference


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_exported_matmulnbits_hold_our_integers(ortq, method):
    from onnx import numpy_helper

    from pipeline.formats.checkpoint import open_checkpoint, read_config

    compile_dir, _ = _variant(ortq, method, "onnxruntime")["compile"]
    engine = json.loads((compile_dir / "engine.json").read_text())
    assert engine["status"] == "ran here" and engine["build"]["matmulnbits_checked"] == 28  # 4 layers x 7
    assert engine["build"]["accuracy_level"] == 1
    src = source_model_dir(compile_dir)  # the quantized folder it was exported from
    model_dir = compile_dir / "model"
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # lm_head stays a float MatMul (not re-quantized)
    inits = {t.name: t for t in model.graph.initializer}
    fmt = "awq" if method == "rtn" else "gptq"
    qc = read_config(src)["quantization_config"]
    with open_checkpoint(src) as ck:  # independently of verify_codes: layer 1's fused q/k/v, byte for byte
        parts = [matmulnbits.checkpoint_linear(fmt, ck.get_prefix(f"model.layers.1.self_attn.{p}"), qc)
                 for p in ("q_proj", "k_proj", "v_proj")]
    want = matmulnbits.pack(QuantizedWeight(torch.cat([p.w_int for p in parts]), torch.cat([p.scales for p in parts]),
                                            torch.cat([p.zeros for p in parts]), 4, 64))
    got = {k: torch.from_numpy(numpy_helper.to_array(inits[f"model.layers.1.attn.qkv_proj.MatMulNBits.{k}"],
                                                     base_dir=str(model_dir)).copy())
           for k in ("qweight", "scales", "qzeros")}
    assert torch.equal(got["qweight"], want["B"])
    assert torch.equal(got["qzeros"], want["zero_points"])
    assert torch.equal(got["scales"], want["scales"])
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "genai_config.json"):
        assert (model_dir / name).is_file(), name


@pytest.mark.slow
def test_a_changed_nibble_fails_verification(ortq, tmp_path):
    from pipeline.engines.onnxruntime_engine import verify_codes
    from pipeline.errors import QuantizationError
    from pipeline.formats.checkpoint import read_config

    compile_dir, _ = _variant(ortq, "rtn", "onnxruntime")["compile"]
    src = source_model_dir(compile_dir)
    copy = tmp_path / "model"
    shutil.copytree(compile_dir / "model", copy)
    assert verify_codes(copy / "model.onnx", src, "awq", read_config(src)["quantization_config"]) == 28
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    (b,) = [t for t in model.graph.initializer if t.name == "model.layers.2.mlp.down_proj.MatMulNBits.qweight"]
    offset = int({e.key: e.value for e in b.external_data}["offset"])
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[offset + 5] ^= 0x01  # one code off by one
    (copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(QuantizationError, match="down_proj"):
        verify_codes(copy / "model.onnx", src, "awq", read_config(src)["quantization_config"])


@pytest.mark.slow
def test_serve_says_not_served(ortq):
    """No OpenAI server for this target: the serve stage records why instead of pretending."""
    from pipeline.stages.serve import engine_server

    compile_dir, _ = _variant(ortq, "rtn", "onnxruntime")["compile"]
    command, why = engine_server(compile_dir, "127.0.0.1", 8123, None)
    assert command is None and why == "not served: ONNX Runtime has no OpenAI-compatible server"


def test_a_builder_failure_is_our_error_and_leaves_logging_as_it_was(tmp_path):
    import logging

    from pipeline.engines.onnxruntime_engine import run_builder
    from pipeline.errors import QuantizationError

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"architectures": ["FooForCausalLM"], "model_type": "llama", "hidden_size": 8}')
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with pytest.raises(QuantizationError, match="Use another compile target"):
        run_builder(src, tmp_path / "out", "fp32", "cpu", {"hf_token": "false"}, tmp_path / "builder.log")
    assert (list(root.handlers), root.level) == before
