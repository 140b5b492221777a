"""The ``sglang`` target: SGLang's server (``python -m sglang.launch_server``) on the quantized folder as it is.

SGLang reads the folder's ``quantization_config`` (``awq``, ``gptq``, ``compressed-tensors``, ``fp8``); the build
hard-links it and writes the chat template file and ``launch.json``. ``--quantization`` forces the Marlin kernels
for AWQ / symmetric GPTQ and ``fp8``; compressed-tensors is left to detection from config.json.

Flags checked in sgl-project/sglang ``python/sglang/srt/server_args.py`` (``add_cli_args``): ``--model-path``,
``--host``, ``--port``, ``--served-model-name``, ``--tensor-parallel-size``/``--tp-size``, ``--context-length``,
``--mem-fraction-static``, ``--max-running-requests``, ``--quantization`` (``QUANTIZATION_CHOICES`` includes
``awq_marlin``, ``gptq_marlin``, ``gptq``, ``fp8``), ``--kv-cache-dtype`` (``fp8_e4m3``), ``--chat-template`` (a
file path), ``--disable-cuda-graph``, ``--trust-remote-code``, ``--api-key``. The key is a flag only, so it is passed
through ``sh -c`` from the environment (``hf_folder.with_api_key_flag``). Health: ``GET /health``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.engines import hf_folder
from pipeline.engines.base import Availability, ServeCommand

ENGINE = "SGLang"
PACKAGE = "sglang"
KV_CACHE_DTYPE = {"fp8": "fp8_e4m3"}  # compile.kv_cache -> --kv-cache-dtype


def available(device: str) -> Availability:
    return hf_folder.availability(PACKAGE, ENGINE, device)


def build(ctx) -> dict:
    """Hard-linked model folder, chat template file, launch settings."""
    flag = hf_folder.quantization_flag(ctx.fmt)
    return hf_folder.build_linked(ctx, None if flag == "compressed-tensors" else flag,
                                  KV_CACHE_DTYPE.get(ctx.cfg.kv_cache))


def serve_command(artifact: Path, host: str, port: int, api_key: str | None, model_name: str) -> ServeCommand:
    s = hf_folder.read_launch(artifact)
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(hf_folder.model_dir(artifact)),
            "--host", host, "--port", str(port), "--served-model-name", s["model_name"],
            "--tp-size", str(s["tp"]), "--context-length", str(s["max_seq_len"]),
            "--mem-fraction-static", str(s["kv_cache_fraction"]), "--max-running-requests", str(s["max_batch_size"])]
    if s["quantization"]:
        argv += ["--quantization", s["quantization"]]
    if s["kv_cache"] in KV_CACHE_DTYPE.values():
        argv += ["--kv-cache-dtype", s["kv_cache"]]
    if s["chat_template"]:
        argv += ["--chat-template", str(Path(artifact) / s["chat_template"])]
    if s["eager"]:
        argv.append("--disable-cuda-graph")
    if s["trust_remote_code"]:
        argv.append("--trust-remote-code")
    argv, env = hf_folder.with_api_key_flag(argv, "--api-key", api_key)
    return ServeCommand(argv, f"http://{host}:{port}", "/health", env, s["model_name"])


def check_run(artifact: Path, log) -> dict:
    """Load the artifact in SGLang's offline engine and generate a few tokens."""
    import sglang

    s = hf_folder.read_launch(artifact)
    engine = sglang.Engine(model_path=str(hf_folder.model_dir(artifact)), quantization=s["quantization"],
                           tp_size=s["tp"], context_length=s["max_seq_len"],
                           mem_fraction_static=s["kv_cache_fraction"], trust_remote_code=s["trust_remote_code"])
    try:
        text = engine.generate("Hello", {"max_new_tokens": 8})["text"]
    finally:
        engine.shutdown()
    log.info("SGLang generated %r", text)
    return {"generated": text}
