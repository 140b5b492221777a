"""Target ``lmdeploy-pytorch``: lmdeploy's PyTorch engine on CUDA or Ascend NPUs (``compile.device: cuda |
ascend``), served by ``lmdeploy serve api_server --backend pytorch --device cuda|ascend [--eager-mode]``.

The engine reads the quantized folder as it is (``quantization_config`` in ``config.json``), so the artifact is
that folder hard-linked, plus ``lmdeploy_config.json`` (the ``PytorchEngineConfig`` fields the recipe sets).
Read from lmdeploy 0.18.0 (PyPI wheel):

- ``lmdeploy/pytorch/config.py`` ``QuantizationConfig.from_config``: quant methods ``awq``, ``smooth_quant``
  (``quant_dtype`` int8 or float8), ``fp8`` and ``compressed-tensors`` (``_parse_compressed_tensors_config``:
  pack-quantized, one ``group_0`` on Linear, 4-bit symmetric int, group 32, no activation quantization);
  anything else raises "Unsupported quant method" (no GPTQ).
- ``lmdeploy/pytorch/nn/linear/__init__.py`` ``build_linear``: fp8 with dynamic activations is
  ``BlockedF8Linear`` (``weight_scale_inv`` in 128x128 blocks); per-tensor static fp8 is the other case.
- ``lmdeploy/pytorch/backends/cuda/awq_modules.py``: AWQ g128 on SM90 may use TurboMind's GEMM, any other
  group size the Triton ``awq_linear`` kernel; the engine computes AWQ in float16 (``_update_torch_dtype``).
- ``lmdeploy/messages.py`` ``PytorchEngineConfig``: ``device_type`` cuda/ascend/maca/camb, ``eager_mode``,
  ``quant_policy`` 4/8/16 (KV int4/int8/fp8; CUDA and Ascend only). ``model_format`` there means *online* fp8
  quantization of an unquantized model, so the artifact never sets it.
- docs/en/supported_models/supported_models.md (Ascend table): W8A8 runs in graph mode, W4A16 in eager mode;
  docs/en/get_started/ascend/get_started.md: ``--device ascend`` (Atlas 800T A2).
"""

from __future__ import annotations

from pipeline.engines import lmdeploy_common as common
from pipeline.engines.base import Availability

# What lmdeploy documents for Ascend, by format: graph mode for W8A8, eager mode for W4A16 (AWQ).
ASCEND_EAGER = {"awq": True, "w8a8": False}


def _npu_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (Ascend's PyTorch adapter) and there is no NPU here"
    import torch
    import torch_npu  # noqa: F401  (registers torch.npu)

    return None if torch.npu.is_available() and torch.npu.device_count() else "torch_npu sees no NPU here"


def available(device: str) -> Availability:
    """lmdeploy plus a CUDA GPU (``cuda``) or torch_npu plus an Ascend NPU (``ascend``)."""
    lmdeploy = common.lmdeploy_missing()
    if device == "ascend":
        return common.availability([lmdeploy, _npu_missing()], "lmdeploy PyTorch engine on an Ascend NPU")
    return common.availability([lmdeploy, common.cuda_missing()], "lmdeploy PyTorch engine on CUDA")


def eager_mode(device: str, fmt: str, asked: bool | None) -> bool:
    """``compile.eager`` when set; else lmdeploy's default (graphs), except W4A16 on Ascend (eager)."""
    if asked is not None:
        return asked
    return ASCEND_EAGER.get(fmt, False) if device == "ascend" else False


def build(ctx) -> dict:
    """``model/`` (hard links) and ``lmdeploy_config.json`` with the PytorchEngineConfig fields."""
    fields = common.engine_config(ctx, device_type=ctx.device,
                                  eager_mode=eager_mode(ctx.device, ctx.fmt.fmt, ctx.cfg.eager))
    return common.build_artifact(ctx, "pytorch", fields)


serve_command = common.serve_command
check_run = common.check_run
