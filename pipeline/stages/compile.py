"""compile: prepare the quantized checkpoint for an engine target and record how to load it (engine.json).

Only the embedded ``transformers`` target is built so far; the table of what every target loads is in
``pipeline/targets.py`` and is checked at validation, so an unbuilt target never reaches this stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import ENGINE, model_path, write_json
from pipeline.stages import StageContext


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    quant = json.loads((ctx.inputs["quantize"] / "manifest.json").read_text())
    engine = {
        "target": cfg.target,
        "device": cfg.device,
        "format": quant["metrics"]["format"],
        "model_dir": str(model_path(ctx.inputs["quantize"])),
        "allow_pickle": ctx.recipe.variant.model.allow_pickle,
        "trust_remote_code": ctx.recipe.variant.model.trust_remote_code,
    }
    write_json(ctx.out / ENGINE, engine)
    return {"target": cfg.target, "format": engine["format"]}


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_engine(engine_dir: Path):
    """Load the model and tokenizer an engine artifact describes (the transformers target)."""
    import torch

    from pipeline.engines.transformers_engine import load_model

    engine = json.loads((engine_dir / ENGINE).read_text())
    device = resolve_device(engine["device"])
    dtype = torch.float32 if device == "cpu" else torch.float16
    return load_model(
        Path(engine["model_dir"]), device=device, dtype=dtype,
        allow_pickle=engine["allow_pickle"], trust_remote_code=engine["trust_remote_code"],
    )
