"""The ``tensorrt-llm`` target: TensorRT-LLM's PyTorch backend serving a Hugging Face folder with ``trtllm-serve``.

What it loads, and why our checkpoints are converted or linked as they are, is in ``pipeline/formats/modelopt.py``
(TensorRT-LLM ``_torch/model_config.py`` and ``_torch/modules/linear.py``, NVIDIA ModelOpt's unified HF export):

- ``gptq`` (4-bit, ``sym: true``, in-order groups) and ``awq`` whose zeros are all 8 -> ModelOpt ``W4A16_AWQ``:
  ``weight`` uint8 [out/2, in], ``weight_scale`` [out, in/group], ``pre_quant_scale`` ones, ``hf_quant_config.json``
  and ModelOpt's inline ``quantization_config``; every integer is kept (no re-quantization).
- FP8 with 128x128 blocks (``fp8`` and compressed-tensors ``ct-fp8``) is read by TensorRT-LLM from config.json as
  it is (``FP8_BLOCK_SCALES``): hard-linked. Per-channel FP8 (``fp8``'s ``weight_scale_inv`` [out, 1] without
  ``weight_block_size``, which TensorRT-LLM would load as unquantized, and ``ct-fp8``'s ``weight_scale`` [out, 1],
  which ``FP8RowwiseLinearMethod`` cannot copy into its [out] parameter) -> ``FP8_PER_CHANNEL_PER_TOKEN`` with
  ``weight_scale`` [out] float32, the same codes and scale values.
- ``w8a8`` (lmdeploy smooth_quant) and ``ct-w8a8`` (compressed-tensors int W8A8) -> ModelOpt ``W8A16`` (int8
  weight-only per channel, ``WeightOnlyQuantLinearMethod``): the PyTorch backend has no W8A8 SmoothQuant linear (and
  its compressed-tensors reader maps any 8-bit ``channel`` scheme to FP8), but the same int8 weights [out, in] with
  ``weight_scale`` [out] float32 are what W8A16 reads; the smoothing is already in the norms, which are copied as
  they are. Same integers, activations left in 16-bit (no static ``input_scale`` accepted).
- ``hf`` (unquantized): hard-linked.
- Not loadable, so refused by ``targets.py`` before any work: AWQ with fitted zero points.

``trtllm-serve`` (``tensorrt_llm/commands/serve.py``, commit 00209af): ``trtllm-serve MODEL --backend pytorch --host
--port --tp_size --max_batch_size --max_seq_len --kv_cache_free_gpu_memory_fraction --extra_llm_api_options YAML
--chat_template FILE [--trust_remote_code]``; the YAML overrides the flags (``update_llm_args_with_extra_dict``), so
both carry the same values. The YAML's ``kv_cache_config.dtype`` is the PyTorch-backend KV-cache dtype
(``llmapi/llm_args.py`` ``KvCacheConfig.dtype``: "only for the Pytorch backend"). The server names the model by the
MODEL argument and has no API-key option. Health: ``GET /health``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from pipeline.engines import hf_folder
from pipeline.engines.base import ARTIFACT_MODEL, Availability, ServeCommand
from pipeline.errors import QuantizationError, TargetUnavailable
from pipeline.formats import modelopt
from pipeline.formats.checkpoint import (
    CONFIG, PICKLE_INDEX, SAFE_INDEX, CheckpointWriter, open_checkpoint, read_config,
)

ENGINE = "TensorRT-LLM"
PACKAGE = "tensorrt_llm"
EXTRA_OPTIONS = "extra_llm_api_options.yaml"
KV_CACHE_DTYPE = {"fp8": "fp8"}  # compile.kv_cache -> KvCacheConfig.dtype (PyTorch backend)


def available(device: str) -> Availability:
    """Runs where ``tensorrt_llm`` is installed (NVIDIA's index, not PyPI) and a CUDA GPU is visible."""
    return hf_folder.availability(PACKAGE, ENGINE, device)


def build(ctx) -> dict:
    """``<artifact>/model`` as TensorRT-LLM reads it, its ``extra_llm_api_options.yaml`` and ``launch.json``."""
    fmt = ctx.fmt
    if fmt.fmt == "hf" or (fmt.fmt in ("fp8", "ct-fp8") and fmt.fp8_block):
        files = hf_folder.link_folder(ctx)
        quant = {"layout": "linked", "quant_algo": _linked_algo(fmt)}
    elif fmt.fmt in ("gptq", "awq", "fp8", "ct-fp8", "w8a8", "ct-w8a8"):
        quant = _convert(ctx)
        files = sorted(p.name for p in ctx.model_dir.iterdir())
    else:
        raise QuantizationError(
            f"{ctx.src}: the tensorrt-llm target does not load the {fmt.fmt} format (see pipeline/targets.py); "
            "compile it for another target."
        )
    s = hf_folder.settings(ctx, quantization=quant["quant_algo"])
    options = extra_llm_api_options(s)
    hf_folder.write_yaml(ctx.out / EXTRA_OPTIONS, options)
    launch = hf_folder.write_launch(ctx.out, s, extra_llm_api_options=EXTRA_OPTIONS)
    return {"model_dir": ARTIFACT_MODEL, "files": files, **quant,
            "extra_llm_api_options": options, "launch": launch}


def _linked_algo(fmt) -> str | None:
    return None if fmt.fmt == "hf" else modelopt.FP8_BLOCK_SCALES


def extra_llm_api_options(s: hf_folder.LaunchSettings) -> dict:
    """The ``--extra_llm_api_options`` YAML (LLM-API argument names, llmapi/llm_args.py)."""
    kv: dict = {"free_gpu_memory_fraction": s.kv_cache_fraction}
    if s.kv_cache in KV_CACHE_DTYPE:
        kv["dtype"] = KV_CACHE_DTYPE[s.kv_cache]
    options: dict = {
        "backend": "pytorch",
        "tensor_parallel_size": s.tp,
        "max_batch_size": s.max_batch_size,
        "max_seq_len": s.max_seq_len,
        "kv_cache_config": kv,
    }
    if s.eager:
        options["cuda_graph_config"] = None  # no CUDA graphs
    if s.trust_remote_code:
        options["trust_remote_code"] = True
    return options


def _convert(ctx) -> dict:
    """Write the ModelOpt unified layout of a GPTQ/AWQ (-> W4A16_AWQ), W8A8 (-> W8A16) or per-channel FP8 folder."""
    src, out = ctx.src, ctx.model_dir
    config = read_config(src)
    qc = config.get("quantization_config") or {}
    dtype = _model_dtype(config)
    weights = {p.name for p in src.iterdir() if p.suffix == ".safetensors"} | {SAFE_INDEX, PICKLE_INDEX, CONFIG}
    hf_folder.link_folder(ctx, skip=tuple(sorted(weights)))  # tokenizer, chat template, generation config, ...
    writer = CheckpointWriter(out)
    quantized, algos, group_size = set(), set(), None
    with open_checkpoint(src, allow_pickle=ctx.allow_pickle) as ck:
        by_module: dict[str, list[str]] = defaultdict(list)
        for name in ck.keys():
            by_module[name.rpartition(".")[0]].append(name)
        for module, names in sorted(by_module.items()):
            leaves = {n.rpartition(".")[2]: n for n in names}
            tensors = _convert_linear(ctx.fmt.fmt, leaves, ck, qc, dtype)
            if tensors is None:
                for n in names:
                    writer.add(n, ck.get(n))
                continue
            algo, group, converted = tensors
            algos.add(algo)
            group_size = group
            quantized.add(module)
            for leaf, t in converted.items():
                writer.add(f"{module}.{leaf}", t)
    writer.close()
    if len(algos) != 1:
        raise QuantizationError(
            f"{src}: expected one quantization algorithm across the linears, found {sorted(algos) or 'none'}; "
            "a checkpoint without quantized linears or with mixed FP8 granularities cannot be converted."
        )
    algo = algos.pop()
    excluded = [n for n in _linear_names(src, ctx.trust_remote_code) if n not in quantized]
    hf = modelopt.hf_quant_config(algo, group_size if algo == modelopt.W4A16_AWQ else None, ctx.cfg.kv_cache, excluded)
    (out / modelopt.HF_QUANT_CONFIG).write_text(json.dumps(hf, indent=4) + "\n")
    config["quantization_config"] = modelopt.inline_quantization_config(hf)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"layout": "converted", "quant_algo": algo, "group_size": hf["quantization"].get("group_size"),
            "quantized_linears": len(quantized), "exclude_modules": hf["quantization"]["exclude_modules"]}


def _convert_linear(fmt: str, leaves: dict[str, str], ck, qc: dict, dtype):
    """``(quant_algo, group_size, tensors)`` for one quantized linear, or None for any other module."""
    if fmt in ("gptq", "awq") and "qweight" in leaves:
        from pipeline.formats import awq_gemm, gptq

        t = {leaf: ck.get(n) for leaf, n in leaves.items()}
        if fmt == "gptq":
            qw = gptq.unpack(t, int(qc.get("bits", 4)), qc.get("checkpoint_format", "gptq"))
        else:
            _, group = awq_gemm.read_quantization_config(qc)
            qw = awq_gemm.unpack(t["qweight"], t["qzeros"], t["scales"], group)
        leaf = next(iter(leaves.values())).rpartition(".")[0].rpartition(".")[2]
        converted = modelopt.w4a16_awq_tensors(qw, dtype, pre_quant_scale=leaf not in modelopt.FUSED_LINEARS)
        if "bias" in t:
            converted["bias"] = t["bias"]
        return modelopt.W4A16_AWQ, qw.group_size, converted
    if fmt in ("w8a8", "ct-w8a8") and "weight" in leaves and ("scale" in leaves or "weight_scale" in leaves):
        from pipeline.formats import w8a8

        extra = set(leaves) - {"weight", "scale", "weight_scale", "weight_zero_point", "bias"}
        if extra:
            raise QuantizationError(
                f"a W8A8 linear has tensors {sorted(extra)} besides its int8 weight, scale and bias (static "
                "activation scales?); W8A16 has no place for them. Quantize with dynamic per-token activations."
            )
        t = {leaf: ck.get(n) for leaf, n in leaves.items()}
        w_int8, scale = w8a8.unpack_lmdeploy(t) if fmt == "w8a8" else w8a8.unpack_compressed_tensors(t)
        converted = modelopt.w8a16_tensors(w_int8, scale)
        if "bias" in t:
            converted["bias"] = t["bias"]
        return modelopt.W8A16, None, converted
    if fmt in ("fp8", "ct-fp8") and "weight" in leaves and ("weight_scale" in leaves or "weight_scale_inv" in leaves):
        weight = ck.get(leaves["weight"])
        scale = ck.get(leaves.get("weight_scale_inv") or leaves["weight_scale"])
        converted = modelopt.fp8_tensors(weight, scale)
        for leaf in set(leaves) - {"weight", "weight_scale", "weight_scale_inv"}:
            converted[leaf] = ck.get(leaves[leaf])  # bias, input_scale
        return modelopt.fp8_algo(scale, weight.shape[0]), None, converted
    return None


def _model_dtype(config: dict):
    import torch

    name = str(config.get("dtype") or config.get("torch_dtype") or "float16")
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else torch.float16


def _linear_names(model_dir: Path, trust_remote_code: bool) -> list[str]:
    """Every ``nn.Linear`` and ``nn.Embedding`` of the architecture (built on the meta device: no weights read);
    ModelOpt 0.47 lists both kinds in ``exclude_modules`` when they stay unquantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]


def serve_command(artifact: Path, host: str, port: int, api_key: str | None, model_name: str) -> ServeCommand:
    """``trtllm-serve <artifact>/model --backend pytorch ...`` with the compile section's settings."""
    if api_key:
        raise TargetUnavailable(
            "serve.api_key is set, but trtllm-serve has no API-key option (tensorrt_llm/commands/serve.py), so the "
            "server would accept every request. Put it behind an authenticating proxy and remove serve.api_key, or "
            "serve another target."
        )
    s = hf_folder.read_launch(artifact)
    model = hf_folder.model_dir(artifact)
    argv = ["trtllm-serve", str(model), "--backend", "pytorch", "--host", host, "--port", str(port),
            "--tp_size", str(s["tp"]), "--max_batch_size", str(s["max_batch_size"]),
            "--max_seq_len", str(s["max_seq_len"]),
            "--kv_cache_free_gpu_memory_fraction", str(s["kv_cache_fraction"]),
            "--extra_llm_api_options", str(Path(artifact) / s["extra_llm_api_options"])]
    if s["chat_template"]:
        argv += ["--chat_template", str(Path(artifact) / s["chat_template"])]
    if s["trust_remote_code"]:
        argv.append("--trust_remote_code")
    # trtllm-serve names the model by its MODEL argument (OpenAIServer(model=model)).
    return ServeCommand(argv, f"http://{host}:{port}", "/health", {}, str(model))


def check_run(artifact: Path, log) -> dict:
    """Load the artifact in TensorRT-LLM's LLM API (PyTorch backend) and generate a few tokens."""
    import yaml
    from tensorrt_llm import LLM, SamplingParams

    options = yaml.safe_load((Path(artifact) / EXTRA_OPTIONS).read_text())
    options.pop("backend", None)
    llm = LLM(model=str(hf_folder.model_dir(artifact)), **options)
    try:
        out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
        text = out[0].outputs[0].text
    finally:
        llm.shutdown()
    log.info("TensorRT-LLM generated %r", text)
    return {"generated": text}
