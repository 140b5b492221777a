"""The lmdeploy targets (``turbomind``, ``lmdeploy-pytorch``): artifacts built by the real pipeline from the
shipped tiny model, the engine config and serve argv lmdeploy 0.18 takes, the folders' config fix-ups, the
validation messages, and 'not run here' where lmdeploy cannot run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MANIFEST
from pipeline.cli import main
from pipeline.engines import lmdeploy_common as common
from pipeline.engines import lmdeploy_engine, turbomind_engine
from pipeline.engines.base import BuildContext
from pipeline.errors import QuantizationError, RecipeError
from pipeline.formats.detect import detect_format
from pipeline.recipe import CompileSection
from pipeline.recipe_load import load_recipe
from tests.conftest import CALIB_TEXT, TINY_MODEL, write_recipe

RECIPES = {
    # name: (target, methods, compile section)
    "tm": ("turbomind", ["rtn", "gptq", "fp8"], "{target: turbomind, kv_cache: int4, kv_cache_fraction: 0.5, max_batch_size: 8}"),
    "pt": ("lmdeploy-pytorch", ["rtn", "smoothquant", "fp8"],
           "{target: lmdeploy-pytorch, kv_cache: int8, session_len: 1024, tp: 2, max_batch_size: 4}"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """(recipe, method) -> {'compile': manifest, 'artifact': Path, 'quantized': Path} from ``pipeline run``."""
    out = tmp_path_factory.mktemp("lmdeploy")
    found = {}
    for name, (_, methods, compile_) in RECIPES.items():
        recipe = out / f"{name}.yaml"
        recipe.write_text(
            f"name: {name}\nmodel: {{source: {TINY_MODEL}}}\n"
            f"calibration: {{source: {CALIB_TEXT}, samples: 8, seq_len: 128}}\n"
            f"quantize: {{method: rtn, device: cpu, fp8: {{block: true}}}}\ncompile: {compile_}\nserve: {{enabled: false}}\n"
            f"matrix: {{quantize.method: [{', '.join(methods)}]}}\n"
        )
        res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        for m in (json.loads(p.read_text()) for p in (out / name).glob(f"compile-*/{MANIFEST}")):
            artifact = next(p for p in (out / name).glob("compile-*") if p.name.endswith(m["key"][:12]))
            engine = json.loads((artifact / "engine.json").read_text())
            quantized = next(p for p in (out / name).glob("quantize-*") if (p / "model" / "config.json").is_file()
                             and os.path.samefile(p / "model" / "model.safetensors", artifact / "model" / "model.safetensors"))
            found[name, m["variants"][0]] = {"compile": m, "engine": engine, "artifact": artifact, "quantized": quantized}
    return found


def _qc(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("key, model_format, qc", [
    (("tm", "rtn"), "awq", {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}),
    (("tm", "gptq"), "gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}),
    (("tm", "fp8"), "fp8", {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}),
])
def test_turbomind_artifact_is_the_folder_it_reads(runs, key, model_format, qc):
    run = runs[key]
    model = run["artifact"] / "model"
    assert {k: _qc(model).get(k) for k in qc} == qc
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert os.path.samefile(model / name, run["quantized"] / "model" / name), name  # hard links, not copies
    assert json.loads((run["artifact"] / common.CONFIG_FILE).read_text()) == {
        "backend": "turbomind", "lmdeploy": "0.18.0", "chat_template": "hf",
        "engine_config": {"tp": 1, "session_len": 2048, "cache_max_entry_count": 0.5, "quant_policy": 4,
                          "max_batch_size": 8, "model_format": model_format},
    }
    assert run["engine"]["serving_files"]["chat_template"] == "chat_template.jinja"
    assert run["engine"]["build"]["config_fixes"] == {}


def test_turbomind_serve_argv(runs):
    artifact = runs["tm", "rtn"]["artifact"]
    cmd = turbomind_engine.serve_command(artifact, "127.0.0.1", 8123, None, "tiny")
    assert cmd.argv == [*common.lmdeploy_prefix(), "serve", "api_server", str(artifact / "model"),
                        "--backend", "turbomind", "--tp", "1", "--session-len", "2048", "--cache-max-entry-count", "0.5",
                        "--quant-policy", "4", "--max-batch-size", "8", "--model-format", "awq", "--chat-template", "hf",
                        "--server-name", "127.0.0.1", "--server-port", "8123", "--model-name", "tiny"]
    assert (cmd.base_url, cmd.health_path, cmd.env, cmd.model_name) == ("http://127.0.0.1:8123", "/health", {}, "tiny")


def test_pytorch_engine_fp8_artifact_sets_no_model_format(runs):
    # PytorchEngineConfig.model_format 'fp8' means quantizing an unquantized model online: never set it.
    run = runs["pt", "fp8"]
    assert _qc(run["artifact"] / "model")["weight_block_size"] == [128, 128]
    settings = json.loads((run["artifact"] / common.CONFIG_FILE).read_text())
    assert "model_format" not in settings["engine_config"]
    argv = lmdeploy_engine.serve_command(run["artifact"], "127.0.0.1", 1, None, "m").argv
    assert "--model-format" not in argv and argv[argv.index("--backend") + 1] == "pytorch"


def test_pytorch_engine_artifact_and_argv(runs):
    run = runs["pt", "smoothquant"]
    artifact = run["artifact"]
    assert _qc(artifact / "model") == _qc(run["quantized"] / "model")
    assert _qc(artifact / "model")["quant_method"] == "smooth_quant"
    settings = json.loads((artifact / common.CONFIG_FILE).read_text())
    assert settings["engine_config"] == {"tp": 2, "session_len": 1024, "cache_max_entry_count": 0.8, "quant_policy": 8,
                                         "max_batch_size": 4, "device_type": "cuda", "eager_mode": False}
    cmd = lmdeploy_engine.serve_command(artifact, "::1", 9000, None, "pt-smoothquant")
    assert cmd.argv[len(common.lmdeploy_prefix()):] == [
        "serve", "api_server", str(artifact / "model"), "--backend", "pytorch", "--tp", "2", "--session-len", "1024",
        "--cache-max-entry-count", "0.8", "--quant-policy", "8", "--max-batch-size", "4", "--device", "cuda",
        "--chat-template", "hf", "--server-name", "::1", "--server-port", "9000", "--model-name", "pt-smoothquant"]
    assert cmd.base_url == "http://[::1]:9000"


def test_api_key_travels_in_the_environment_only(runs):
    artifact = runs["pt", "rtn"]["artifact"]
    cmd = lmdeploy_engine.serve_command(artifact, "127.0.0.1", 8000, "sk-secret-123", "m")
    assert cmd.argv[:2] == ["sh", "-c"] and len(cmd.argv) == 3
    assert cmd.argv[2].endswith(' --model-name m --api-keys "$QUANTSHIP_LMDEPLOY_API_KEY"')
    assert cmd.env == {"QUANTSHIP_LMDEPLOY_API_KEY": "sk-secret-123"}
    assert "sk-secret-123" not in " ".join(cmd.argv) and "sk-secret-123" not in cmd.shell()


@pytest.mark.parametrize("key, target", [(("tm", "rtn"), "turbomind"), (("pt", "smoothquant"), "lmdeploy-pytorch")])
def test_not_run_here_is_said(runs, key, target):
    module = turbomind_engine if target == "turbomind" else lmdeploy_engine
    avail = module.available("cuda")
    if avail.runs:
        pytest.skip("lmdeploy runs on this machine")
    run = runs[key]
    status = f"not run here: {avail.why}"
    assert (run["engine"]["status"], run["engine"]["run_here"], run["engine"]["check_run"]) == (status, False, None)
    assert run["compile"]["metrics"]["status"] == status
    if common.lmdeploy_missing():
        assert avail.why.startswith("lmdeploy is not installed (pip install lmdeploy==0.18.0)")


def test_require_run_fails_with_exit_code_1(tmp_path):
    if turbomind_engine.available("cuda").runs:
        pytest.skip("TurboMind runs on this machine")
    why = turbomind_engine.available("cuda").why
    recipe = write_recipe(tmp_path, "model: {{source: {model}}}\nquantize: {{method: rtn}}\n"
                                    "compile: {{target: turbomind, require_run: true}}\nserve: {{enabled: false}}\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert (f"compile.target 'turbomind' with require_run: true, but this machine cannot run lmdeploy TurboMind: {why}. "
            "Run the recipe where it is installed, or set require_run: false") in text


# (quantize, compile, the reason (exact), lmdeploy targets that the message lists as able to load it, or None
# where the message has no such list). The other targets in the list belong to other rows of targets.py.
REFUSED = [
    ("{method: smoothquant}", "{target: turbomind}",
     "field 'compile.target': lmdeploy TurboMind does not load the w8a8 format; targets that do: ", {"lmdeploy-pytorch"}),
    ("{method: rtn, w_group_size: 64}", "{target: turbomind}",
     "field 'compile.target': lmdeploy TurboMind loads awq only with group size 128, not 64 (lmdeploy 0.18 "
     "turbomind/converter.py get_tm_config: group size 128); targets that load it: ", {"lmdeploy-pytorch"}),
    ("{method: gptq, w_sym: false}", "{target: turbomind}",
     "field 'compile.target': lmdeploy TurboMind loads gptq only with symmetric weights (w_sym: true) (lmdeploy 0.18 "
     "turbomind/converter.py: desc_act false, sym, group size 128); targets that load it: ", set()),
    ("{method: gptq, gptq: {desc_act: true, static_groups: false}}", "{target: turbomind}",
     "field 'compile.target': lmdeploy TurboMind does not read g_idx, so it cannot load act-order with a permuted "
     "g_idx (desc_act: true needs static_groups: true) (lmdeploy 0.18 turbomind/converter.py: desc_act false, sym, "
     "group size 128); targets that load it: ", set()),
    ("{method: fp8}", "{target: turbomind}",
     "field 'compile.target': lmdeploy TurboMind loads fp8 only with 128x128 weight blocks (fp8.block: true) (lmdeploy "
     "0.18 turbomind/weight_format.py FP8Format: 128x128 blocks); targets that load it: ", set()),
    ("{method: fp8}", "{target: lmdeploy-pytorch}",
     "field 'compile.target': lmdeploy PyTorch engine loads fp8 only with 128x128 weight blocks (fp8.block: true) "
     "(lmdeploy 0.18 pytorch/nn/linear/__init__.py: dynamic fp8 is BlockedF8Linear, 128x128 blocks); targets that "
     "load it: ", set()),
    ("{method: gptq}", "{target: lmdeploy-pytorch}",
     "field 'compile.target': lmdeploy PyTorch engine does not load the gptq format; targets that do: ", {"turbomind"}),
    ("{method: rtn}", "{target: turbomind, kv_cache: fp8}",
     "field 'compile.kv_cache': compile.kv_cache 'fp8': lmdeploy TurboMind offers int8, int4 (or 'auto').", None),
]


@pytest.mark.parametrize("quantize, compile_, reason, lmdeploy_able", REFUSED)
def test_recipes_the_lmdeploy_targets_refuse(tmp_path, quantize, compile_, reason, lmdeploy_able):
    esc = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    path = write_recipe(tmp_path, "model: {{source: {model}}}\ncalibration: {{source: {calib}}}\n"
                                  f"quantize: {esc(quantize)}\ncompile: {esc(compile_)}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = str(e.value)
    head = f"{path.resolve()}:4: {reason}"
    if lmdeploy_able is None:
        assert text == head
        return
    assert text.startswith(head) and text.endswith(".")
    able = set(text[len(head):-1].split(", "))
    assert "transformers" in able
    assert able & {"turbomind", "lmdeploy-pytorch"} == lmdeploy_able


def test_kv_cache_policies_follow_lmdeploy_quant_policy(tmp_path):
    path = write_recipe(tmp_path, "model: {{source: {model}}}\nquantize: {{method: rtn}}\n"
                                  "compile: {{target: lmdeploy-pytorch, kv_cache: fp8}}\n")
    assert load_recipe(path).variants["rtn"].compile.kv_cache == "fp8"
    assert common.KV_POLICY == {"auto": 0, "int4": 4, "int8": 8, "fp8": 16}  # messages.py QuantPolicy


# ------------------------------------------------------------- folders quantized elsewhere: config fix-ups


def _folder_with(tmp_path: Path, src: Path, qc: dict) -> Path:
    """A copy of ``src`` (hard links) whose config.json declares ``qc``."""
    folder = tmp_path / "src"
    shutil.copytree(src, folder, copy_function=os.link)
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return folder


def _build(module, tmp_path: Path, src: Path, device: str = "cuda", **compile_) -> dict:
    ctx = BuildContext(src=src, fmt=detect_format(src), cfg=CompileSection(**compile_), out=tmp_path / "artifact",
                       device=device, model_name="m")
    return module.build(ctx)


CT_INT4 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
           "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
               "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}}},
           "ignore": ["lm_head"]}


def test_turbomind_gets_a_fixed_config_copy_for_compressed_tensors(runs, tmp_path):
    src = _folder_with(tmp_path, runs["tm", "rtn"]["quantized"] / "model", CT_INT4)
    before = (src / "config.json").read_text()
    build = _build(turbomind_engine, tmp_path, src, kv_cache="int8")
    model = tmp_path / "artifact" / "model"
    assert _qc(model)["config_groups"]["group_0"]["format"] == "pack-quantized"  # converter.py reads it there
    assert {k: v for k, v in _qc(model).items() if k != "config_groups"} == {k: v for k, v in CT_INT4.items() if k != "config_groups"}
    assert (src / "config.json").read_text() == before  # the input is never changed
    assert not os.path.samefile(model / "config.json", src / "config.json")
    assert os.path.samefile(model / "model.safetensors", src / "model.safetensors")
    assert build["engine_config"]["model_format"] == "compressed-tensors"
    assert build["engine_config"]["quant_policy"] == 8
    assert list(build["config_fixes"]) == ["config_groups"]


def test_turbomind_fp8_blocks(runs, tmp_path):
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    src = _folder_with(tmp_path, runs["tm", "rtn"]["quantized"] / "model", qc)
    build = _build(turbomind_engine, tmp_path, src)
    assert (build["engine_config"]["model_format"], build["config_fixes"]) == ("fp8", {})
    assert _qc(tmp_path / "artifact" / "model") == qc
    src64 = _folder_with(tmp_path / "b", src, {**qc, "weight_block_size": [64, 64]})
    with pytest.raises(QuantizationError, match=r"fp8 weight_block_size \[64, 64\]; TurboMind reads 128x128 blocks only"):
        _build(turbomind_engine, tmp_path / "b", src64)


@pytest.mark.parametrize("version, fixed", [("GEMM", "gemm"), ("gemm", None)])
def test_turbomind_awq_version_is_lower_case_gemm(runs, tmp_path, version, fixed):
    qc = {**_qc(runs["tm", "rtn"]["quantized"] / "model"), "version": version}
    build = _build(turbomind_engine, tmp_path, _folder_with(tmp_path, runs["tm", "rtn"]["quantized"] / "model", qc))
    assert build["config_fixes"] == ({"version": fixed} if fixed else {})
    assert _qc(tmp_path / "artifact" / "model")["version"] == "gemm"


def test_turbomind_refuses_gemv_awq(runs, tmp_path):
    qc = {**_qc(runs["tm", "rtn"]["quantized"] / "model"), "version": "gemv"}
    with pytest.raises(QuantizationError, match="AWQ version 'gemv'; TurboMind reads only the GEMM layout"):
        _build(turbomind_engine, tmp_path, _folder_with(tmp_path, runs["tm", "rtn"]["quantized"] / "model", qc))


# ------------------------------------------------------------- Ascend


@pytest.mark.parametrize("method, eager, asked", [("rtn", True, None), ("smoothquant", False, None), ("rtn", False, False),
                                                  ("smoothquant", True, True)])
def test_ascend_graph_for_w8a8_eager_for_w4a16(runs, tmp_path, method, eager, asked):
    build = _build(lmdeploy_engine, tmp_path, runs["pt", method]["quantized"] / "model", device="ascend", eager=asked)
    assert (build["engine_config"]["device_type"], build["engine_config"]["eager_mode"]) == ("ascend", eager)
    argv = lmdeploy_engine.serve_command(tmp_path / "artifact", "127.0.0.1", 1, None, "m").argv
    assert argv[argv.index("--device"):argv.index("--device") + 2 + eager] == ["--device", "ascend"] + ["--eager-mode"] * eager


def test_ascend_availability_names_the_npu():
    avail = lmdeploy_engine.available("ascend")
    assert not avail.runs and "no NPU here" in avail.why


def test_session_len_defaults_to_max_position_embeddings():
    assert common.session_len(TINY_MODEL, None) == 2048
    assert common.session_len(TINY_MODEL, 512) == 512


@pytest.mark.gpu
def test_pytorch_engine_check_run_on_gpu(tmp_path):
    """With lmdeploy installed and a GPU, compile loads the artifact in lmdeploy's PyTorch engine for real."""
    if not lmdeploy_engine.available("cuda").runs:
        pytest.skip(lmdeploy_engine.available("cuda").why)
    recipe = write_recipe(tmp_path, "name: g\nmodel: {{source: {model}}}\nquantize: {{method: rtn, device: cuda}}\n"
                                    "compile: {{target: lmdeploy-pytorch, kv_cache_fraction: 0.05, session_len: 512, "
                                    "max_batch_size: 2, require_run: true}}\nserve: {{enabled: false}}\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    engine = json.loads(next((tmp_path / "out" / "g").glob("compile-*/engine.json")).read_text())
    assert engine["status"] == "ran here" and engine["check_run"]["tokens"] > 0, engine
