"""The vllm and sglang targets: the files each build writes, the exact server argv for every format they load, the
API key kept out of the argv, and 'not run here' on this machine (neither package is installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.engines import hf_folder, sglang_engine, vllm_engine
from pipeline.engines.base import BuildContext
from pipeline.formats.detect import detect_format
from pipeline.recipe import CompileSection
from pipeline.targets import FormatSettings, check_target_loads
from tests.conftest import TINY_MODEL, write_recipe

ENGINES = {"vllm": vllm_engine, "sglang": sglang_engine}
CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
    "targets": ["Linear"]}}}
# format -> (quantization_config, vLLM --quantization, SGLang --quantization); None: not passed (read from config.json)
FORMATS = {
    "hf": (None, None, None),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
            "awq_marlin", "awq_marlin"),
    "gptq-sym": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
                 "gptq_marlin", "gptq_marlin"),
    "gptq-asym": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False},
                  "gptq", "gptq"),
    "ct-fp8": (CT_FP8, "compressed-tensors", None),
    "fp8-block": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128]}, "fp8", "fp8"),
}


def fake_quantized_folder(tmp_path: Path, qc: dict | None) -> Path:
    """The shipped model's folder with another quantization_config: the targets link it as it is, so the argv
    depends only on what config.json declares."""
    src = tmp_path / "src"
    shutil.copytree(TINY_MODEL, src)
    config = json.loads((src / "config.json").read_text())
    if qc:
        config["quantization_config"] = qc
    (src / "config.json").write_text(json.dumps(config))
    return src


def build(target: str, src: Path, out: Path, **compile_kw) -> dict:
    out.mkdir(parents=True)
    cfg = CompileSection(target=target, **compile_kw)
    ctx = BuildContext(src=src, fmt=detect_format(src), cfg=cfg, out=out, device="cuda", model_name="tiny-gptq")
    return ENGINES[target].build(ctx)


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_build_links_the_folder_and_writes_template_and_launch(tmp_path, target):
    src = fake_quantized_folder(tmp_path, FORMATS["gptq-sym"][0])
    info = build(target, src, tmp_path / "art")
    art = tmp_path / "art"
    assert sorted(os.listdir(art)) == ["chat_template.jinja", "launch.json", "model"]
    for name in info["files"]:
        assert os.path.samefile(src / name, art / "model" / name)
    assert sorted(info["files"]) == sorted(p.name for p in src.iterdir())
    assert (art / "chat_template.jinja").read_text() == (TINY_MODEL / "chat_template.jinja").read_text()
    launch = json.loads((art / "launch.json").read_text())
    assert launch == info["launch"] == {
        "tp": 1, "max_seq_len": 2048, "max_batch_size": 128, "kv_cache_fraction": 0.8, "kv_cache": "auto",
        "eager": False, "trust_remote_code": False, "model_name": "tiny-gptq",
        "chat_template": "chat_template.jinja", "quantization": "gptq_marlin"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_vllm_argv_for_each_format(tmp_path, fmt):
    qc, flag, _ = FORMATS[fmt]
    build("vllm", fake_quantized_folder(tmp_path, qc), tmp_path / "art", kv_cache="fp8", tp=2, session_len=1024,
          max_batch_size=16, kv_cache_fraction=0.5, eager=True)
    art = tmp_path / "art"
    cmd = vllm_engine.serve_command(art, "127.0.0.1", 8000, None, "ignored")
    expect = ["vllm", "serve", str(art / "model"), "--host", "127.0.0.1", "--port", "8000",
              "--served-model-name", "tiny-gptq", "--tensor-parallel-size", "2", "--max-model-len", "1024",
              "--gpu-memory-utilization", "0.5", "--max-num-seqs", "16"]
    expect += ["--quantization", flag] if flag else []
    expect += ["--kv-cache-dtype", "fp8", "--chat-template", str(art / "chat_template.jinja"), "--enforce-eager"]
    assert cmd.argv == expect
    assert (cmd.base_url, cmd.health_path, cmd.env, cmd.model_name) == ("http://127.0.0.1:8000", "/health", {},
                                                                        "tiny-gptq")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_sglang_argv_for_each_format(tmp_path, fmt):
    qc, _, flag = FORMATS[fmt]
    build("sglang", fake_quantized_folder(tmp_path, qc), tmp_path / "art", kv_cache="fp8", tp=2, session_len=1024,
          max_batch_size=16, kv_cache_fraction=0.5, eager=True)
    art = tmp_path / "art"
    cmd = sglang_engine.serve_command(art, "0.0.0.0", 30000, None, "ignored")
    expect = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(art / "model"), "--host", "0.0.0.0",
              "--port", "30000", "--served-model-name", "tiny-gptq", "--tp-size", "2", "--context-length", "1024",
              "--mem-fraction-static", "0.5", "--max-running-requests", "16"]
    expect += ["--quantization", flag] if flag else []
    expect += ["--kv-cache-dtype", "fp8_e4m3", "--chat-template", str(art / "chat_template.jinja"),
               "--disable-cuda-graph"]
    assert cmd.argv == expect
    assert (cmd.health_path, cmd.env) == ("/health", {})


def test_defaults_pass_no_optional_flags(tmp_path):
    build("vllm", fake_quantized_folder(tmp_path, None), tmp_path / "art")
    argv = vllm_engine.serve_command(tmp_path / "art", "h", 1, None, "x").argv
    assert not {"--quantization", "--kv-cache-dtype", "--enforce-eager", "--trust-remote-code"} & set(argv)


def test_api_key_travels_in_the_environment_never_the_argv(tmp_path):
    build("vllm", fake_quantized_folder(tmp_path, None), tmp_path / "v")
    cmd = vllm_engine.serve_command(tmp_path / "v", "h", 1, "s3cret", "x")
    assert cmd.env == {"VLLM_API_KEY": "s3cret"} and "s3cret" not in " ".join(cmd.argv)
    assert "s3cret" not in cmd.shell()
    build("sglang", fake_quantized_folder(tmp_path / "s", None), tmp_path / "s" / "art")
    cmd = sglang_engine.serve_command(tmp_path / "s" / "art", "h", 1, "s3cret", "x")
    assert "s3cret" not in " ".join(cmd.argv) and cmd.env == {hf_folder.API_KEY_ENV: "s3cret"}
    assert cmd.argv[:4] == ["sh", "-c", f'exec "$@" --api-key "${hf_folder.API_KEY_ENV}"', "sh"]
    # The wrapper really appends the key: run it with printf in place of the server.
    argv, env = hf_folder.with_api_key_flag(["printf", "%s|", "--port", "1"], "--api-key", "s3cret")
    out = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    assert out == "--port|1|--api-key|s3cret|"


@pytest.mark.parametrize("target, engine", [("vllm", "vLLM"), ("sglang", "SGLang")])
def test_not_installed_here(target, engine):
    a = ENGINES[target].available("cuda")
    assert (a.runs, a.why) == (False, f"{engine} is not installed")


@pytest.mark.parametrize("target, fmt, why", [
    ("vllm", FormatSettings("w8a8", 8), "does not load the w8a8 format"),
    ("sglang", FormatSettings("bnb", 4), "does not load the bnb format"),
    ("sglang", FormatSettings("w8a8", 8), "does not load the w8a8 format"),
])
def test_validator_refuses_formats_they_do_not_read(target, fmt, why):
    assert why in check_target_loads(target, fmt)


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_rows_are_built_for_what_they_load(target):
    for fmt in (FormatSettings("awq", 4, 128, sym=False), FormatSettings("gptq", 4, 128, sym=True),
                FormatSettings("ct-w8a8", 8), FormatSettings("ct-int4", 4, 128, sym=True),
                FormatSettings("fp8", 8, fp8_block=True)):
        assert check_target_loads(target, fmt) is None


@pytest.mark.parametrize("target, engine", [("vllm", "vLLM"), ("sglang", "SGLang")])
def test_pipeline_run_says_not_run_here(tmp_path, target, engine):
    from pipeline.cli import main

    text = "name: t\nmodel: {{source: {model}}}\nquantize: {{method: none}}\ncompile: {{target: TARGET}}\n"
    recipe = write_recipe(tmp_path, text.replace("TARGET", target))
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (compile_dir,) = (tmp_path / "out" / "t").glob("compile-*")
    engine_json = json.loads((compile_dir / "engine.json").read_text())
    assert engine_json["status"] == f"not run here: {engine} is not installed"
    assert engine_json["build"]["launch"]["quantization"] is None
    assert (compile_dir / "model" / "config.json").is_file() and (compile_dir / "launch.json").is_file()
