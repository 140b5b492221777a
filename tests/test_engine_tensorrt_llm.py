"""The tensorrt-llm target: ModelOpt's unified HF layout written from our integers, checked against TensorRT-LLM's
loader (as data, cited), against what nvidia-modelopt itself exports for the same tiny model, and end to end through
``pipeline run`` on this machine (where TensorRT-LLM is not installed: 'not run here', never a pretended run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.engines import tensorrt_llm_engine as trt
from pipeline.engines.base import BuildContext
from pipeline.errors import QuantizationError, TargetUnavailable
from pipeline.formats import awq_gemm, gptq, modelopt
from pipeline.formats.detect import detect_format
from pipeline.quant.primitives import quantize_groupwise
from pipeline.recipe import CompileSection
from pipeline.targets import FormatSettings, check_target_loads
from tests.conftest import TINY_MODEL, make_tiny_llama, write_recipe

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VANILLA = ("self_attn.o_proj", "mlp.down_proj")  # loaded on their own (not fused into qkv / gate_up)

# What TensorRT-LLM's PyTorch backend reads for W4A16_AWQ, per linear: suffix -> (dtype, shape of [out, in, group]).
# tensorrt_llm/_torch/modules/linear.py (00bbf71) W4A16_AWQ_LinearMethod: ``weight`` parameter int8 (in, out // 2)
# filled from the checkpoint's weight by ``.T`` (load_weights_vanilla_helper -> preprocess_weights_for_mixed_gemm),
# ``weight_scale`` (in // group, out) copied from the checkpoint's ``.T``, ``pre_quant_scale`` (in,) indexed for
# vanilla linears; ModelOpt 0.47 unified_export_hf writes uint8 / float32 / the model dtype (float16 here).
W4A16_AWQ_TENSORS = {
    "weight": (torch.uint8, lambda o, i, g: (o // 2, i)),
    "weight_scale": (torch.float32, lambda o, i, g: (o, i // g)),
    "pre_quant_scale": (torch.float16, lambda o, i, g: (i,)),
}
# FP8RowwiseLinearMethod (FP8_PER_CHANNEL_PER_TOKEN): weight float8_e4m3fn (out, in), weight_scale (out,) float32.
FP8_PC_TENSORS = {
    "weight": (torch.float8_e4m3fn, lambda o, i: (o, i)),
    "weight_scale": (torch.float32, lambda o, i: (o,)),
}


def _write_folder(src: Path, out: Path, tensors: dict, quantization_config: dict) -> Path:
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def write_int4_folder(src: Path, out: Path, fmt: str, sym: bool, group: int = 128) -> Path:
    """An RTN 4-bit checkpoint of ``src`` in our GPTQ or AWQ GEMM layout (no calibration: the layout is the point)."""
    new = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module.endswith(LINEARS):
            qw = quantize_groupwise(t.float(), 4, group, sym=sym)
            packed = gptq.pack(qw) if fmt == "gptq" else awq_gemm.pack(qw)
            new.update({f"{module}.{k}": v for k, v in packed.items()})
        else:
            new[name] = t
    qc = gptq.quantization_config(4, group, False, sym) if fmt == "gptq" else awq_gemm.quantization_config(4, group)
    return _write_folder(src, out, new, qc)


def write_fp8_folder(src: Path, out: Path) -> Path:
    """Per-channel FP8 as pipeline/formats/fp8.py describes it: weight e4m3 + weight_scale_inv float32 [out, 1]."""
    new = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module.endswith(LINEARS):
            scale = (t.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
            new[f"{module}.weight"] = (t.float() / scale).to(torch.float8_e4m3fn)
            new[f"{module}.weight_scale_inv"] = scale
        else:
            new[name] = t
    return _write_folder(src, out, new, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "modules_to_not_convert": ["lm_head"]})


def build(src: Path, out: Path, **compile_kw) -> dict:
    out.mkdir(parents=True)
    cfg = CompileSection(target="tensorrt-llm", **compile_kw)
    ctx = BuildContext(src=src, fmt=detect_format(src), cfg=cfg, out=out, device="cuda", model_name="tiny")
    return trt.build(ctx)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def gptq_sym(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-gptq")
    src = write_int4_folder(TINY_MODEL, root / "gptq", "gptq", sym=True)
    return src, build(src, root / "artifact", kv_cache="fp8"), root / "artifact"


def test_int4_pairs_pack_as_modelopt_and_round_trip():
    codes = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    packed = modelopt.pack_int4_pairs(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 10)
    expect = (codes[0::2].to(torch.int16) & 15) | ((codes[1::2].to(torch.int16) & 15) << 4)
    assert torch.equal(packed.to(torch.int16), expect)  # row 2j low nibble, 2j+1 high (pack_int4_in_uint8)
    assert torch.equal(modelopt.unpack_int4_pairs(packed), codes)


def test_gptq_sym_converts_to_w4a16_awq_with_our_integers(gptq_sym):
    src, info, art = gptq_sym
    ours, theirs = tensors_of(src), tensors_of(art / "model")
    assert info["quant_algo"] == "W4A16_AWQ" and info["quantized_linears"] == 4 * len(LINEARS)
    for layer in range(4):
        for lin in LINEARS:
            m = f"model.layers.{layer}.{lin}"
            qw = gptq.unpack({k: ours[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 4)
            o, i = qw.w_int.shape
            names = {k.rpartition(".")[2] for k in theirs if k.rpartition(".")[0] == m}
            assert names == ({"weight", "weight_scale", "pre_quant_scale"} if lin in VANILLA else
                             {"weight", "weight_scale"})
            for leaf in names:
                dtype, shape = W4A16_AWQ_TENSORS[leaf]
                assert theirs[f"{m}.{leaf}"].dtype == dtype and tuple(theirs[f"{m}.{leaf}"].shape) == shape(o, i, 128)
            assert torch.equal(modelopt.unpack_int4_pairs(theirs[f"{m}.weight"]).int() + 8, qw.w_int)
            assert torch.equal(theirs[f"{m}.weight_scale"], qw.scales)
            if lin in VANILLA:
                assert torch.equal(theirs[f"{m}.pre_quant_scale"], torch.ones(i, dtype=torch.float16))
            deq = modelopt.unpack_int4_pairs(theirs[f"{m}.weight"]).float() * theirs[f"{m}.weight_scale"].repeat_interleave(128, 1)
            assert torch.equal(deq, qw.dequantize())
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(theirs[name], ours[name])


def test_hf_quant_config_and_inline_config_fields(gptq_sym):
    _, _, art = gptq_sym
    hf = json.loads((art / "model" / "hf_quant_config.json").read_text())
    # ModelConfig._build_modelopt_quant_config reads these keys of the legacy "quantization" dict.
    assert hf == {"producer": {"name": "modelopt", "version": modelopt.MODELOPT_VERSION},
                  "quantization": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "FP8", "group_size": 128,
                                   "has_zero_point": False, "pre_quant_scale": True,
                                   "exclude_modules": ["lm_head", "model.embed_tokens"]}}
    inline = json.loads((art / "model" / "config.json").read_text())["quantization_config"]
    assert inline == {"ignore": ["lm_head", "model.embed_tokens"], "quant_algo": "W4A16_AWQ",
                      "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
                      "producer": hf["producer"], "quant_method": "modelopt"}


def test_side_files_are_hard_linked_and_chat_template_written(gptq_sym):
    src, info, art = gptq_sym
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.samefile(src / name, art / "model" / name)
    assert (art / "chat_template.jinja").read_text() == (TINY_MODEL / "chat_template.jinja").read_text()
    assert sorted(info["files"]) == sorted(p.name for p in (art / "model").iterdir())


def test_extra_llm_api_options_and_serve_command(gptq_sym):
    import yaml

    _, info, art = gptq_sym
    options = yaml.safe_load((art / trt.EXTRA_OPTIONS).read_text())
    assert options == info["extra_llm_api_options"] == {
        "backend": "pytorch", "tensor_parallel_size": 1, "max_batch_size": 128, "max_seq_len": 2048,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.8, "dtype": "fp8"}}
    cmd = trt.serve_command(art, "127.0.0.1", 8123, None, "tiny")
    assert cmd.argv == [
        "trtllm-serve", str(art / "model"), "--backend", "pytorch", "--host", "127.0.0.1", "--port", "8123",
        "--tp_size", "1", "--max_batch_size", "128", "--max_seq_len", "2048",
        "--kv_cache_free_gpu_memory_fraction", "0.8", "--extra_llm_api_options", str(art / trt.EXTRA_OPTIONS),
        "--chat_template", str(art / "chat_template.jinja")]
    assert (cmd.base_url, cmd.health_path, cmd.model_name) == ("http://127.0.0.1:8123", "/health", str(art / "model"))
    with pytest.raises(TargetUnavailable, match="no API-key option"):
        trt.serve_command(art, "127.0.0.1", 8123, "secret", "tiny")


def test_awq_with_fitted_zeros_is_refused_before_and_during_build(tmp_path):
    why = check_target_loads("tensorrt-llm", FormatSettings("awq", 4, 128, sym=False))
    assert "only with symmetric weights" in why and "no zero points" in why and "gptq" in why
    src = write_int4_folder(TINY_MODEL, tmp_path / "awq", "awq", sym=False)
    with pytest.raises(QuantizationError, match="has no zero points"):
        build(src, tmp_path / "artifact")


def test_awq_gemm_with_midpoint_zeros_converts_exactly(tmp_path):
    src = write_int4_folder(TINY_MODEL, tmp_path / "awq", "awq", sym=True)  # zeros all 8: representable
    build(src, tmp_path / "artifact")
    ours, theirs = tensors_of(src), tensors_of(tmp_path / "artifact" / "model")
    m = "model.layers.2.mlp.down_proj"
    qw = awq_gemm.unpack(ours[f"{m}.qweight"], ours[f"{m}.qzeros"], ours[f"{m}.scales"], 128)
    assert torch.equal(modelopt.unpack_int4_pairs(theirs[f"{m}.weight"]).int() + 8, qw.w_int)
    assert torch.equal(theirs[f"{m}.weight_scale"], qw.scales)


@pytest.mark.parametrize("fmt, why", [
    (FormatSettings("w8a8", 8), "does not load the w8a8 format"),
    (FormatSettings("ct-w8a8", 8), "does not load the ct-w8a8 format"),
    (FormatSettings("gptq", 4, 128, sym=False), "only with symmetric weights"),
    (FormatSettings("gptq", 4, 128, sym=True, permuted_g_idx=True), "cannot load act-order"),
    (FormatSettings("gptq", 4, 32, sym=True), "only with group size 64/128"),
])
def test_validator_refuses_what_the_pytorch_backend_cannot_load(fmt, why):
    assert why in check_target_loads("tensorrt-llm", fmt)


def test_fp8_per_channel_converts_and_blocks_are_linked(tmp_path):
    src = write_fp8_folder(TINY_MODEL, tmp_path / "fp8")
    info = build(src, tmp_path / "artifact")
    assert info["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    ours, theirs = tensors_of(src), tensors_of(tmp_path / "artifact" / "model")
    m = "model.layers.0.self_attn.q_proj"
    for leaf, (dtype, shape) in FP8_PC_TENSORS.items():
        assert theirs[f"{m}.{leaf}"].dtype == dtype and tuple(theirs[f"{m}.{leaf}"].shape) == shape(256, 256)
    assert torch.equal(theirs[f"{m}.weight"].view(torch.uint8), ours[f"{m}.weight"].view(torch.uint8))
    assert torch.equal(theirs[f"{m}.weight_scale"], ours[f"{m}.weight_scale_inv"].reshape(-1))
    hf = json.loads((tmp_path / "artifact" / "model" / "hf_quant_config.json").read_text())
    assert hf["quantization"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": None,
                                  "exclude_modules": ["lm_head", "model.embed_tokens"]}
    # 128x128 blocks: TensorRT-LLM reads quant_method fp8 + weight_block_size from config.json; linked as is.
    block = tmp_path / "block"
    shutil.copytree(src, block)
    config = json.loads((block / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128, 128]
    (block / "config.json").write_text(json.dumps(config))
    info = build(block, tmp_path / "block-artifact")
    assert info["layout"] == "linked" and info["quant_algo"] == "FP8_BLOCK_SCALES"
    assert os.path.samefile(block / "model.safetensors", tmp_path / "block-artifact" / "model" / "model.safetensors")
    assert not (tmp_path / "block-artifact" / "model" / "hf_quant_config.json").exists()


# ---------------------------------------------------------------- against nvidia-modelopt's own export (CPU)


def _modelopt_export(src: Path, out: Path, cfg_name: str) -> Path:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model = mtq.quantize(model, getattr(mtq, cfg_name), lambda m: m(ids))
    export_hf_checkpoint(model, export_dir=out)
    return out


@pytest.fixture(scope="module")
def modelopt_pair(tmp_path_factory):
    pytest.importorskip("modelopt.torch.export", reason="nvidia-modelopt is not installed")
    root = tmp_path_factory.mktemp("modelopt")
    src = make_tiny_llama(root / "src", layers=1)
    pairs = {}
    for cfg_name, fmt in (("INT4_AWQ_CFG", "gptq"), ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "fp8")):
        theirs = _modelopt_export(src, root / f"{fmt}-modelopt", cfg_name)
        q = (write_int4_folder(src, root / fmt, "gptq", sym=True) if fmt == "gptq"
             else write_fp8_folder(src, root / fmt))
        build(q, root / f"{fmt}-artifact")
        pairs[fmt] = (root / f"{fmt}-artifact" / "model", theirs)
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "fp8"])
def test_same_names_dtypes_shapes_and_config_as_modelopt_export(modelopt_pair, fmt):
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    ours_dir, theirs_dir = modelopt_pair[fmt]
    ours, theirs = tensors_of(ours_dir), tensors_of(theirs_dir)
    layer = {k for k in theirs if ".layers.0." in k}
    ours_layer = {k for k in ours if ".layers.0." in k}
    # ModelOpt's FP8 export also records the static input_scale it calibrated; ours is dynamic (per token).
    assert ours_layer == {k for k in layer if not k.endswith(".input_scale")}
    for name in ours_layer:
        assert (ours[name].dtype, tuple(ours[name].shape)) == (theirs[name].dtype, tuple(theirs[name].shape)), name
    hf_ours = json.loads((ours_dir / "hf_quant_config.json").read_text())
    hf_theirs = json.loads((theirs_dir / "hf_quant_config.json").read_text())
    assert hf_ours["quantization"] == hf_theirs["quantization"]
    assert hf_ours["producer"]["name"] == hf_theirs["producer"]["name"] == "modelopt"
    inline = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    assert inline == convert_hf_quant_config_format(hf_ours)
    assert set(inline) == set(json.loads((theirs_dir / "config.json").read_text())["quantization_config"])


# ---------------------------------------------------------------- end to end through `pipeline run`

E2E = """\
name: trt
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 4, seq_len: 64}}
quantize: {{method: gptq, w_group_size: 128, device: cpu}}
compile: {{target: tensorrt-llm, require_run: {require_run}}}
"""


@pytest.mark.slow
def test_pipeline_run_builds_the_artifact_and_says_not_run_here(tmp_path):
    from pipeline.cli import main

    recipe = write_recipe(tmp_path, E2E.replace("{require_run}", "false"))
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (compile_dir,) = (tmp_path / "out" / "trt").glob("compile-*")
    engine = json.loads((compile_dir / "engine.json").read_text())
    manifest = json.loads((compile_dir / "manifest.json").read_text())
    status = "not run here: TensorRT-LLM is not installed"
    assert engine["status"] == status and manifest["metrics"]["status"] == status
    assert engine["check_run"] is None and engine["build"]["quant_algo"] == "W4A16_AWQ"
    assert (compile_dir / "model" / "hf_quant_config.json").is_file()
    assert (compile_dir / "extra_llm_api_options.yaml").is_file()


@pytest.mark.slow
def test_require_run_fails_with_exit_1_and_says_why(tmp_path):
    from pipeline.cli import main

    recipe = write_recipe(tmp_path, E2E.replace("{require_run}", "true"))
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "require_run: true, but this machine cannot run TensorRT-LLM (PyTorch backend): TensorRT-LLM is not " \
           "installed" in res.output
