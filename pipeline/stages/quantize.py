"""quantize: the reference (``none``, no copy) or a quantized checkpoint in an engine-loadable format.

Which format each method writes is data in ``pipeline/targets.py``; the algorithms live in ``pipeline/quant``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import MODEL_DIR, MODEL_LINK, folder_bytes, model_path, write_json
from pipeline.stages import StageContext


def run(ctx: StageContext) -> dict:
    from pipeline.formats.checkpoint import read_unquantized_config

    cfg = ctx.config
    src = model_path(ctx.inputs["download"])
    if cfg.method != "none":
        read_unquantized_config(src)  # every method starts from full-precision weights: refuse a quantized folder
    metrics = METHODS[cfg.method](ctx, src)
    out_model = model_path(ctx.out)
    return {"method": cfg.method, "format": cfg.format_settings().fmt, "bytes": folder_bytes(out_model), **metrics}


def _reference(ctx: StageContext, src: Path) -> dict:
    write_json(ctx.out / MODEL_LINK, {"path": str(src), "kind": "reference"})
    return {}


def _rtn(ctx: StageContext, src: Path) -> dict:
    from pipeline.quant.rtn import quantize_checkpoint_rtn

    cfg = ctx.config
    return quantize_checkpoint_rtn(
        src, ctx.out / MODEL_DIR, bits=cfg.w_bits, group_size=cfg.w_group_size, sym=cfg.w_sym, progress=ctx.progress
    )


def _calibrated(ctx: StageContext, src: Path) -> dict:
    """awq, gptq, smoothquant: layer by layer over the calibration tokens (pipeline/quant/layerwise.py)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from pipeline.artifacts import CALIB_TOKENS
    from pipeline.formats.checkpoint import CheckpointWriter, copy_side_files, open_checkpoint, write_config
    from pipeline.quant.arch import arch_spec
    from pipeline.quant.layerwise import quantize_layerwise

    cfg = ctx.config
    model = ctx.recipe.variant.model
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    config = AutoConfig.from_pretrained(src, trust_remote_code=model.trust_remote_code)
    spec = arch_spec((config.architectures or [None])[0])
    # On a GPU the layer runs in the model's half dtype (as the engines run it); on the CPU in fp32.
    dtype = torch.float32 if device == "cpu" else (getattr(config, "torch_dtype", None) or torch.bfloat16)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    method, qconfig = make_method(cfg)
    calib = load_file(ctx.inputs["calibrate"] / CALIB_TOKENS)["input_ids"]
    out = ctx.out / MODEL_DIR
    writer = CheckpointWriter(out)
    with open_checkpoint(src, allow_pickle=model.allow_pickle) as ck:
        stats = quantize_layerwise(ck, config, spec, calib, method, writer.add, device=device, dtype=dtype,
                                   progress=ctx.progress)
    writer.close()
    write_config(src, out, qconfig)
    copy_side_files(src, out)
    return {"device": device, **stats}


def make_method(cfg):
    """The layer method and the checkpoint's quantization_config for a quantize section."""
    from pipeline.formats import awq_gemm, gptq, w8a8
    from pipeline.quant.methods import AWQMethod, GPTQMethod, SmoothQuantMethod

    if cfg.method == "gptq":
        o = cfg.gptq
        method = GPTQMethod(cfg.w_bits, cfg.w_group_size, cfg.w_sym, o.desc_act, o.damp, o.block_size, o.static_groups)
        # The settings as run; the config declares desc_act: false for static act-order (in-order g_idx, which
        # TurboMind requires) and keeps the truth under meta (formats/gptq.py declared_desc_act).
        return method, gptq.quantization_config(cfg.w_bits, cfg.w_group_size, o.desc_act, cfg.w_sym,
                                                damp_percent=o.damp, static_groups=o.static_groups)
    if cfg.method == "awq":
        o = cfg.awq
        method = AWQMethod(cfg.w_bits, cfg.w_group_size, o.n_grid, o.clip, o.max_shrink, o.duo_scaling, sym=cfg.w_sym)
        return method, awq_gemm.quantization_config(cfg.w_bits, cfg.w_group_size, sym=cfg.w_sym)
    if cfg.method == "smoothquant":
        layout = cfg.smoothquant.layout
        qconfig = (w8a8.quantization_config_lmdeploy() if layout == "lmdeploy"
                   else w8a8.quantization_config_compressed_tensors())
        return SmoothQuantMethod(cfg.smoothquant.alpha, layout, weight_stat=cfg.smoothquant.weight_stat), qconfig
    raise ValueError(f"{cfg.method} is not a calibrated method")  # the recipe's Literal makes this unreachable


def _bnb(ctx: StageContext, src: Path) -> dict:
    from pipeline.engines.bnb_engine import quantize_checkpoint_bnb

    cfg, model = ctx.config, ctx.recipe.variant.model
    return quantize_checkpoint_bnb(src, ctx.out / MODEL_DIR, "nf4" if cfg.method == "bnb-nf4" else "int8",
                                   device=cfg.device, progress=ctx.progress,
                                   trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle)


def _fp8(ctx: StageContext, src: Path) -> dict:
    from pipeline.quant.fp8_checkpoint import quantize_checkpoint_fp8

    o, model = ctx.config.fp8, ctx.recipe.variant.model
    return quantize_checkpoint_fp8(src, ctx.out / MODEL_DIR, block=o.block, layout=o.layout, ignore=o.ignore,
                                   progress=ctx.progress, allow_pickle=model.allow_pickle)


METHODS = {"none": _reference, "rtn": _rtn, "awq": _calibrated, "gptq": _calibrated, "smoothquant": _calibrated,
           "fp8": _fp8, "bnb-nf4": _bnb, "bnb-int8": _bnb}
