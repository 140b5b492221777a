"""compressed-tensors pack-quantized INT4: the layout against the package, and the lossless AWQ/GPTQ converter."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import QuantizationError
from pipeline.formats import compressed_tensors_int4 as ct4
from pipeline.quant.primitives import QuantizedWeight
from pipeline.quant.rtn import rtn_quantize_weight
from tests.conftest import TINY_MODEL


def qweight(out_features=48, in_features=256, group=128, sym=False, seed=0) -> QuantizedWeight:
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02
    return rtn_quantize_weight(w, 4, group, sym)


@pytest.mark.parametrize("sym", [False, True])
def test_pack_unpack_round_trip_keeps_codes_scales_and_zeros(sym):
    qw = qweight(sym=sym, seed=1)
    packed = ct4.pack(qw, sym)
    assert set(packed) == {"weight_packed", "weight_scale", "weight_shape"} | (set() if sym else {"weight_zero_point"})
    assert packed["weight_packed"].dtype == torch.int32 and packed["weight_packed"].shape == (48, 32)
    assert packed["weight_scale"].dtype == torch.float16 and packed["weight_scale"].shape == (48, 2)
    assert packed["weight_shape"].tolist() == [48, 256] and packed["weight_shape"].dtype == torch.int64
    if not sym:
        assert packed["weight_zero_point"].dtype == torch.int32 and packed["weight_zero_point"].shape == (6, 2)
    back = ct4.unpack(packed, 128)
    assert torch.equal(back.w_int, qw.w_int.to(torch.int32)) and torch.equal(back.zeros, qw.zeros.to(torch.int32))
    assert torch.equal(back.scales, qw.scales) and back.group_size == 128
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_nibble_order_is_little_endian_along_the_input():
    qw = QuantizedWeight(w_int=torch.arange(16, dtype=torch.int32).reshape(1, 16) % 16,
                         scales=torch.ones(1, 1), zeros=torch.full((1, 1), 8, dtype=torch.int32), bits=4, group_size=16)
    words = ct4.pack(qw, sym=True)["weight_packed"]
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0x76543210, 0xFEDCBA98]


def test_the_package_packs_the_same_words_and_dequantizes_to_the_same_weight():
    """Cross-check against compressed-tensors itself (skipped where it is not installed)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    for sym, preset in ((True, "W4A16"), (False, "W4A16_ASYM")):
        parsed = QuantizationConfig.model_validate(ct4.quantization_config(128, sym))
        scheme = parsed.config_groups["group_0"]
        assert scheme.weights == preset_name_to_scheme(preset, ["Linear"]).weights, preset
        assert parsed.format == "pack-quantized" and scheme.input_activations is None

        qw = qweight(out_features=40, sym=sym, seed=2)  # 40 outputs: 5 zero-point words
        ours = ct4.pack(qw, sym)
        codes = (qw.w_int - 8).to(torch.int8)
        assert torch.equal(pack_to_int32(codes, 4), ours["weight_packed"])
        if not sym:
            assert torch.equal(pack_to_int32((qw.zeros - 8).to(torch.int8), 4, packed_dim=0), ours["weight_zero_point"])
        # The package's own decompress of our tensors: the dequantized weight (fp16 scales) we compute.
        state = PackedQuantizationCompressor.decompress(dict(ours), scheme)
        assert state["weight"].dtype == torch.float16
        assert torch.equal(state["weight"], qw.dequantize().half()), preset


def test_errors_name_the_problem():
    with pytest.raises(QuantizationError, match="zero points other than 8"):
        ct4.pack(qweight(sym=False, seed=3), sym=True)
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(0)).to(torch.int32) // 128
    qw = qweight(sym=True)
    with pytest.raises(QuantizationError, match="permuted g_idx"):
        ct4.pack(QuantizedWeight(qw.w_int, qw.scales, qw.zeros, 4, 128, g_idx), sym=True)
    with pytest.raises(QuantizationError, match=r"lacks \['weight_shape'\]"):
        ct4.unpack({"weight_packed": torch.zeros(1, 1, dtype=torch.int32), "weight_scale": torch.ones(1, 1)})
    with pytest.raises(QuantizationError, match="group size 128, the config says 32"):
        ct4.unpack(ct4.pack(qweight(sym=True), True), 32)
    with pytest.raises(QuantizationError, match="not an AWQ or GPTQ folder"):
        ct4.convert_folder(TINY_MODEL, TINY_MODEL.parent / "never-written")


# ---------------------------------------------------------------------------------------------------- converter


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    from pipeline.quant.rtn import quantize_checkpoint_rtn

    out = tmp_path_factory.mktemp("awq") / "model"
    quantize_checkpoint_rtn(TINY_MODEL, out, bits=4, group_size=128)
    return out


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    """A symmetric GPTQ v1 folder of the tiny model (RTN codes on GPTQ's symmetric grid, packed by formats.gptq)."""
    from pipeline.formats import gptq
    from pipeline.formats.checkpoint import CheckpointWriter, copy_side_files, open_checkpoint, write_config

    out = tmp_path_factory.mktemp("gptq") / "model"
    writer = CheckpointWriter(out)
    with open_checkpoint(TINY_MODEL) as ck:
        for name in ck.keys():
            t = ck.get(name)
            if ".layers." in name and name.endswith("proj.weight"):
                for suffix, packed in gptq.pack(rtn_quantize_weight(t, 4, 128, sym=True)).items():
                    writer.add(f"{name[:-len('weight')]}{suffix}", packed)
            else:
                writer.add(name, t)
    writer.close()
    write_config(TINY_MODEL, out, gptq.quantization_config(4, 128, desc_act=False, sym=True))
    copy_side_files(TINY_MODEL, out)
    return out


def _linears(folder):
    from safetensors import safe_open

    by_module: dict[str, dict] = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            module, _, leaf = k.rpartition(".")
            if ".layers." in k:
                by_module.setdefault(module, {})[leaf] = f.get_tensor(k)
    return by_module


@pytest.mark.parametrize("source", ["awq", "gptq"])
def test_convert_folder_carries_the_same_integers(request, tmp_path, source):
    from pipeline.formats import awq_gemm, gptq
    from pipeline.formats.detect import detect_format

    src = request.getfixturevalue(f"{source}_dir")
    out = tmp_path / "ct"
    info = ct4.convert_folder(src, out)
    sym = source == "gptq"
    assert info == {"source_format": source, "linears": 28, "sym": sym, "group_size": 128}
    settings = detect_format(out)
    assert (settings.fmt, settings.bits, settings.group_size, settings.sym) == ("ct-int4", 4, 128, sym)
    assert (out / "tokenizer.json").is_file()
    theirs, ours = _linears(src), _linears(out)
    assert set(theirs) == set(ours) and len([m for m in ours if "weight_packed" in ours[m]]) == 28
    for module, t in theirs.items():
        if "qweight" not in t:
            continue
        a = (awq_gemm.unpack(t["qweight"], t["qzeros"], t["scales"], 128) if source == "awq"
             else gptq.unpack(t, 4, "gptq"))
        b = ct4.unpack(ours[module], 128)
        assert torch.equal(a.w_int.to(torch.int32), b.w_int), module
        assert torch.equal(a.zeros.to(torch.int32), b.zeros), module
        assert torch.equal(a.scales, b.scales) and ours[module]["weight_scale"].dtype == torch.float16, module
        assert ("weight_zero_point" in ours[module]) is not sym


def test_the_converted_folder_runs_to_the_same_logits(awq_dir, tmp_path):
    from pipeline.engines.transformers_engine import load_model

    out = tmp_path / "ct"
    ct4.convert_folder(awq_dir, out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    ids = torch.arange(1, 65).reshape(2, 32)
    awq_model, _ = load_model(awq_dir, int4_kernel="dequantize")
    ct_model, _ = load_model(out, int4_kernel="dequantize")
    assert ct_model.quantization_info["kernels"] == {"dequantize": 28}
    with torch.no_grad():
        assert torch.equal(awq_model(ids).logits, ct_model(ids).logits)
