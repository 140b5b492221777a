"""Target ``turbomind``: lmdeploy's TurboMind engine (CUDA), served by ``lmdeploy serve api_server --backend
turbomind``.

TurboMind converts a Hugging Face folder when it loads it (there is no ``lmdeploy convert`` step in 0.18), so
the artifact is the quantized folder itself, hard-linked, plus ``lmdeploy_config.json`` (the
``TurbomindEngineConfig`` fields the recipe sets) and the serve command. Read from lmdeploy 0.18.0 (PyPI wheel):

- ``lmdeploy/turbomind/converter.py`` ``get_tm_config``: ``quant_method`` from ``quantization_config``; awq needs
  ``version == 'gemm'``; gptq needs ``desc_act`` false and ``sym`` true (``GPTQFormat`` in
  ``turbomind/weight_format.py`` reads ``qweight/scales/qzeros``, never ``g_idx``); compressed-tensors needs
  ``config_groups.group_0.format == 'pack-quantized'`` and 4-bit int weights; ``_SUPPORTED_GROUP_SIZES``:
  awq 128, gptq 128, compressed-tensors 32 or 128, fp8 128 (``FP8Format(block_out=128)`` reads
  ``weight_scale_inv`` of shape [ceil(out/128), ceil(in/128)]: 128x128 blocks only). No W8A8 format.
- ``lmdeploy/messages.py`` ``TurbomindEngineConfig``: ``quant_policy`` 4 (int4 KV) or 8 (int8 KV); fp8 KV
  (16, 17) is refused in ``__post_init__``.
- The PyPI wheels ship ``lmdeploy/turbomind/_turbomind*.so`` built against the CUDA 12 runtime.

Shared with the PyTorch-engine target: ``pipeline/engines/lmdeploy_common.py``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.engines import lmdeploy_common as common
from pipeline.errors import QuantizationError

MODEL_FORMAT = {"hf": "hf", "awq": "awq", "gptq": "gptq", "ct-int4": "compressed-tensors", "fp8": "fp8"}


def _turbomind_extension_missing() -> str | None:
    """Why lmdeploy's compiled TurboMind module is absent (checked on disk, without importing lmdeploy)."""
    import importlib.util

    spec = importlib.util.find_spec("lmdeploy")
    dirs = [Path(d) / "turbomind" for d in (spec.submodule_search_locations or [])] if spec else []
    if any(p.name.startswith("_turbomind") and p.suffix in (".so", ".pyd") for d in dirs if d.is_dir() for p in d.iterdir()):
        return None
    return "lmdeploy has no compiled TurboMind module (lmdeploy/turbomind/_turbomind*.so; a build without TurboMind)"


def _cuda12_missing() -> str | None:
    """TurboMind's wheels link ``libcudart.so.12``: why this machine cannot load it, or None."""
    import ctypes

    import torch

    cuda = torch.version.cuda
    if cuda is None or cuda.startswith("12."):
        return None  # a CPU-only torch says nothing about the runtime; no GPU is reported separately
    try:
        ctypes.CDLL("libcudart.so.12")
        return None
    except OSError:
        return (f"TurboMind's PyPI wheels need the CUDA 12 runtime (libcudart.so.12); this machine has CUDA {cuda} "
                "(torch's build) and no libcudart.so.12")


def available(device: str):
    """TurboMind runs where lmdeploy with its compiled module, the CUDA 12 runtime and an NVIDIA GPU are."""
    lmdeploy = common.lmdeploy_missing()
    missing = [lmdeploy, None if lmdeploy else _turbomind_extension_missing(), common.cuda_missing(), _cuda12_missing()]
    if device != "cuda":
        missing.append(f"TurboMind runs on CUDA only, not {device!r}")
    return common.availability(missing, "lmdeploy TurboMind on CUDA")


def config_fixes(src: Path, fmt) -> dict:
    """The ``quantization_config`` entries TurboMind needs that a folder written elsewhere may spell differently
    (ours already has them): AWQ ``version`` lower-case 'gemm' and ``group_size`` (AutoAWQ's ``q_group_size``);
    a compressed-tensors ``group_0.format`` (llm-compressor may write the format only at the top level)."""
    from pipeline.formats.checkpoint import read_config

    qc = read_config(src).get("quantization_config") or {}
    if fmt.fmt == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(
                f"{src}: AWQ version {qc.get('version')!r}; TurboMind reads only the GEMM layout (lmdeploy "
                f"{common.LMDEPLOY_VERSION} turbomind/converter.py asserts version == 'gemm'). Re-quantize with "
                "method awq or rtn, which write GEMM, or compile for the transformers target."
            )
        return {"version": "gemm", "group_size": fmt.group_size}
    if fmt.fmt == "ct-int4":
        groups = qc.get("config_groups") or {}
        if list(groups) != ["group_0"]:
            raise QuantizationError(
                f"{src}: compressed-tensors config_groups {sorted(groups)}; TurboMind reads exactly one group named "
                "group_0 (lmdeploy turbomind/converter.py). Quantize all linears with one scheme."
            )
        return {"config_groups": {"group_0": {"format": qc.get("format", "pack-quantized"), **groups["group_0"]}}}
    if fmt.fmt == "fp8" and qc.get("weight_block_size") not in (None, [128, 128]):
        raise QuantizationError(
            f"{src}: fp8 weight_block_size {qc['weight_block_size']}; TurboMind reads 128x128 blocks only "
            "(lmdeploy turbomind/weight_format.py FP8Format(block_out=128)). Quantize with fp8.block: true."
        )
    return {}


def build(ctx) -> dict:
    """``model/`` as TurboMind reads it (hard links; ``config.json`` copied only when fixed) and the config."""
    fields = common.engine_config(ctx, model_format=MODEL_FORMAT[ctx.fmt.fmt])
    return common.build_artifact(ctx, "turbomind", fields, config_fixes(ctx.src, ctx.fmt))


serve_command = common.serve_command
check_run = common.check_run
