"""quantize: the reference (``none``, no copy) or a quantized checkpoint in an engine-loadable format.

Which format each method writes is data in ``pipeline/targets.py``; the algorithms live in ``pipeline/quant``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import MODEL_DIR, MODEL_LINK, folder_bytes, model_path, write_json
from pipeline.stages import StageContext
from pipeline.targets import FORMAT_OF_METHOD


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    src = model_path(ctx.inputs["download"])
    metrics = METHODS[cfg.method](ctx, src)
    out_model = model_path(ctx.out)
    return {"method": cfg.method, "format": FORMAT_OF_METHOD[cfg.method], "bytes": folder_bytes(out_model), **metrics}


def _reference(ctx: StageContext, src: Path) -> dict:
    write_json(ctx.out / MODEL_LINK, {"path": str(src), "kind": "reference"})
    return {}


def _rtn(ctx: StageContext, src: Path) -> dict:
    from pipeline.quant.rtn import quantize_checkpoint_rtn

    cfg = ctx.config
    return quantize_checkpoint_rtn(
        src, ctx.out / MODEL_DIR, bits=cfg.w_bits, group_size=cfg.w_group_size, sym=cfg.w_sym, progress=ctx.progress
    )


METHODS = {"none": _reference, "rtn": _rtn}
