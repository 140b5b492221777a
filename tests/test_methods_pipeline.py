"""Every quantization method through the real pipeline on the shipped tiny model, ranked by KL to the reference."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MANIFEST
from pipeline.cli import main
from tests.conftest import ROOT

RECIPE = ROOT / "recipes" / "tiny-all-methods.yaml"


@pytest.fixture(scope="module")
def all_methods(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("methods")
    res = CliRunner().invoke(main, ["run", str(RECIPE), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    runs: dict[str, dict] = {}
    for m in (json.loads(p.read_text()) for p in (out / "tiny-all-methods").glob(f"*/{MANIFEST}")):
        for variant in m["variants"]:
            runs.setdefault(variant, {})[m["stage"]] = m
    root = out / "tiny-all-methods"
    for variant, stages in runs.items():
        stages["quantize_dir"] = next(p for p in root.glob("quantize-*") if p.name.endswith(stages["quantize"]["key"][:12]))
    return runs


def test_every_method_is_evaluated(all_methods):
    assert set(all_methods) == {"none", "rtn", "awq", "gptq", "smoothquant", "bnb-nf4"}
    for variant, stages in all_methods.items():
        assert stages["evaluate"]["metrics"]["tokens"] == 8191, variant


def test_calibrated_methods_beat_rtn_on_kl_and_top1(all_methods):
    kl = {v: s["evaluate"]["metrics"]["kl_mean"] for v, s in all_methods.items()}
    top1 = {v: s["evaluate"]["metrics"]["top1_agreement"] for v, s in all_methods.items()}
    assert kl["none"] == pytest.approx(0.0, abs=1e-7)
    assert kl["gptq"] < 0.6 * kl["rtn"] and top1["gptq"] > top1["rtn"]
    assert kl["awq"] < kl["rtn"] and top1["awq"] > top1["rtn"]
    assert kl["smoothquant"] < 0.2 * kl["rtn"]  # 8-bit weights
    assert kl["bnb-nf4"] < 2 * kl["rtn"]


@pytest.mark.parametrize("variant, expected", [
    ("rtn", {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}),
    ("awq", {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}),
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}),
    ("smoothquant", {"quant_method": "smooth_quant", "quant_dtype": "int8"}),
    ("bnb-nf4", {"quant_method": "bitsandbytes", "bnb_4bit_quant_type": "nf4"}),
])
def test_checkpoints_declare_their_format(all_methods, variant, expected):
    config = json.loads((all_methods[variant]["quantize_dir"] / "model" / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc.get(k) for k in expected} == expected



def test_default_gptq_checkpoint_is_static_act_order_with_in_order_g_idx(all_methods):
    import torch
    from safetensors import safe_open

    folder = all_methods["gptq"]["quantize_dir"] / "model"
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    # The recipe sets no gptq options: act-order ran (meta), groups stayed in column order, so loaders read false.
    assert (qc["desc_act"], qc["meta"]["act_order"], qc["meta"]["static_groups"]) == (False, True, True)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        g_idx = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".g_idx")}
    assert len(g_idx) == 7 * config["num_hidden_layers"]  # q, k, v, o, gate, up, down in each layer
    for name, g in g_idx.items():
        assert torch.equal(g, torch.arange(g.numel(), dtype=torch.int32) // qc["group_size"]), name


def test_layer_tensors_have_the_loaders_names(all_methods):
    from safetensors import safe_open

    def names(variant: str) -> set[str]:
        folder = all_methods[variant]["quantize_dir"] / "model"
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k.removeprefix("model.layers.0.self_attn.q_proj.") for k in f.keys()
                    if k.startswith("model.layers.0.self_attn.q_proj.")}

    assert names("awq") == {"qweight", "qzeros", "scales"}
    assert names("gptq") == {"qweight", "qzeros", "scales", "g_idx"}
    assert names("smoothquant") == {"weight", "scale"}
