"""The ``vllm`` target: vLLM's OpenAI server (``vllm serve``) on the quantized folder as it is.

vLLM reads the folder's ``quantization_config`` itself (``awq``, ``gptq``, ``compressed-tensors`` W8A8 / INT4 / FP8,
``fp8``, ``bitsandbytes``), so the build hard-links it and writes the chat template file and ``launch.json``; the
``--quantization`` value is chosen by ``hf_folder.quantization_flag`` (Marlin kernels where they apply).

Flags checked in vllm-project/vllm (``vllm/engine/arg_utils.py`` commit 99d7eb5 and
``vllm/entrypoints/openai/cli_args.py``): ``--host``, ``--port``, ``--served-model-name``, ``--tensor-parallel-size``,
``--max-model-len``, ``--gpu-memory-utilization``, ``--max-num-seqs``, ``--quantization``,
``--kv-cache-dtype fp8``, ``--chat-template FILE``, ``--enforce-eager``, ``--trust-remote-code``. The API key is
read from ``VLLM_API_KEY`` when ``--api-key`` is absent (``api_server.py``: ``args.api_key or envs.VLLM_API_KEY``),
so the secret never appears in the argv. Health: ``GET /health``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.engines import hf_folder
from pipeline.engines.base import Availability, ServeCommand

ENGINE = "vLLM"
PACKAGE = "vllm"
KV_CACHE_DTYPE = {"fp8": "fp8"}  # compile.kv_cache -> --kv-cache-dtype


def available(device: str) -> Availability:
    return hf_folder.availability(PACKAGE, ENGINE, device)


def build(ctx) -> dict:
    """Hard-linked model folder, chat template file, launch settings."""
    return hf_folder.build_linked(ctx, hf_folder.quantization_flag(ctx.fmt), KV_CACHE_DTYPE.get(ctx.cfg.kv_cache))


def serve_command(artifact: Path, host: str, port: int, api_key: str | None, model_name: str) -> ServeCommand:
    s = hf_folder.read_launch(artifact)
    argv = ["vllm", "serve", str(hf_folder.model_dir(artifact)), "--host", host, "--port", str(port),
            "--served-model-name", s["model_name"], "--tensor-parallel-size", str(s["tp"]),
            "--max-model-len", str(s["max_seq_len"]), "--gpu-memory-utilization", str(s["kv_cache_fraction"]),
            "--max-num-seqs", str(s["max_batch_size"])]
    if s["quantization"]:
        argv += ["--quantization", s["quantization"]]
    if s["kv_cache"] in KV_CACHE_DTYPE.values():
        argv += ["--kv-cache-dtype", s["kv_cache"]]
    if s["chat_template"]:
        argv += ["--chat-template", str(Path(artifact) / s["chat_template"])]
    if s["eager"]:
        argv.append("--enforce-eager")
    if s["trust_remote_code"]:
        argv.append("--trust-remote-code")
    env = {"VLLM_API_KEY": api_key} if api_key else {}
    return ServeCommand(argv, f"http://{host}:{port}", "/health", env, s["model_name"])


def check_run(artifact: Path, log) -> dict:
    """Load the artifact in vLLM's offline engine and generate a few tokens."""
    from vllm import LLM, SamplingParams

    s = hf_folder.read_launch(artifact)
    llm = LLM(model=str(hf_folder.model_dir(artifact)), quantization=s["quantization"], tensor_parallel_size=s["tp"],
              max_model_len=s["max_seq_len"], gpu_memory_utilization=s["kv_cache_fraction"],
              enforce_eager=s["eager"], trust_remote_code=s["trust_remote_code"])
    text = llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text
    log.info("vLLM generated %r", text)
    return {"generated": text}
