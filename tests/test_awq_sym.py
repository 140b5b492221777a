"""Symmetric AWQ/RTN (w_sym: true): the AWQ GEMM layout with every zero point 8, declared under meta.sym, which
TensorRT-LLM's symmetric W4A16_AWQ takes exactly (its loader has no zero points)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.artifacts import ENGINE, MANIFEST, model_path
from pipeline.cli import main
from pipeline.formats import awq_gemm
from pipeline.formats.detect import detect_format
from tests.conftest import write_recipe

RECIPE = """
name: sym
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 4, seq_len: 64}}
quantize: {{method: rtn, w_sym: true, device: cpu}}
compile: {{target: tensorrt-llm}}
matrix: {{quantize.method: [rtn, awq]}}
"""


@pytest.mark.slow
def test_symmetric_awq_and_rtn_have_zero_points_8_and_compile_for_tensorrt_llm(tmp_path):
    res = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, RECIPE)), "-o", str(tmp_path / "out")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    root = tmp_path / "out" / "sym"
    quantized = [d for d in root.glob("quantize-*")]
    assert len(quantized) == 2
    for d in quantized:
        folder = model_path(d)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["zero_point"] is True and qc["meta"] == {"sym": True} and qc["version"] == "gemm"
        assert detect_format(folder).sym is True
        tensors = load_file(folder / "model.safetensors")
        for name in (k for k in tensors if k.endswith(".qweight")):
            base = name[: -len("qweight")]
            qw = awq_gemm.unpack(tensors[name], tensors[base + "qzeros"], tensors[base + "scales"], 128)
            assert torch.equal(qw.zeros, torch.full_like(qw.zeros, 8)), name
    for d in root.glob("compile-*"):
        engine = json.loads((d / ENGINE).read_text())
        assert engine["status"] == "not run here: TensorRT-LLM is not installed"
        assert json.loads((d / "model" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "W4A16_AWQ"
        assert json.loads((d / MANIFEST).read_text())["metrics"]["format"] == "awq"
