"""compile: turn the quantized checkpoint into the artifact its engine target loads, and say whether it ran.

The stage is thin: it reads what the quantized folder declares (``pipeline.formats.detect``), checks the
target's row in ``pipeline/targets.py`` again (the recipe validator checked it before any work, but a source
quantized elsewhere is only known now), and calls the target's module (contract in
``pipeline/engines/base.py``). When this machine can run the engine, the module's ``check_run`` loads the
artifact in the real engine; when it cannot, the artifact is still built and ``engine.json`` and the manifest
say 'not run here' and why — never a pretended run. ``compile.require_run: true`` turns that into a failure.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import ENGINE, model_path, write_json
from pipeline.errors import QuantizationError, TargetUnavailable
from pipeline.stages import StageContext
from pipeline.targets import TARGETS, check_target_loads, engine_module

ENGINE_JSON_VERSION = 2


def run(ctx: StageContext) -> dict:
    from pipeline.engines.base import BuildContext, serving_files
    from pipeline.formats.detect import detect_format

    cfg = ctx.config
    spec = TARGETS[cfg.target]
    src = model_path(ctx.inputs["quantize"])
    fmt = detect_format(src)
    why = check_target_loads(cfg.target, fmt)
    if why:
        raise QuantizationError(f"{src}: compile.target {cfg.target!r}: {why}.")
    module = engine_module(cfg.target)
    device = resolve_target_device(cfg.target, cfg.device)
    availability = module.available(device)
    if cfg.require_run and not availability.runs:
        raise TargetUnavailable(
            f"compile.target {cfg.target!r} with require_run: true, but this machine cannot run {spec.engine}: "
            f"{availability.why}. Run the recipe where it is installed, or set require_run: false to build the "
            "artifact without running it."
        )
    model = ctx.recipe.variant.model
    bctx = BuildContext(src=src, fmt=fmt, cfg=cfg, out=ctx.out, device=device, model_name=model_name(ctx),
                        trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle, log=ctx.log)
    ctx.progress(0, 2, f"building for {spec.engine}")
    build = module.build(bctx) or {}
    model_dir = build.pop("model_dir", None) or "model"
    checked = None
    if availability.runs and hasattr(module, "check_run"):
        ctx.progress(1, 2, f"loading in {spec.engine}")
        checked = module.check_run(ctx.out, ctx.log)
    status = ("ran here" if checked is not None else "runs here") if availability.runs else f"not run here: {availability.why}"
    served = serving_files(ctx.out / model_dir if not Path(model_dir).is_absolute() else Path(model_dir))
    engine = {
        "version": ENGINE_JSON_VERSION,
        "target": cfg.target,
        "engine": spec.engine,
        "device": device,
        "format": fmt.__dict__,
        "model_dir": model_dir,  # relative to the artifact, except for the embedded target's link to its input
        "source_model_dir": str(src),  # the quantized folder it was built from (the embedded runtime reads it)
        "model_name": bctx.model_name,
        "status": status,
        "run_here": availability.runs,
        "why": availability.why,
        "check_run": checked,
        "serving_files": served,
        "build": build,
        "allow_pickle": model.allow_pickle,
        "trust_remote_code": model.trust_remote_code,
    }
    write_json(ctx.out / ENGINE, engine)
    ctx.progress(2, 2, status)
    if not availability.runs:
        ctx.log.warning("%s: %s", ctx.run_id, status)
    return {"target": cfg.target, "format": fmt.fmt, "status": status, "run_here": availability.runs,
            **({"check_run": checked} if checked else {})}


def model_name(ctx: StageContext) -> str:
    """The model id clients type: ``<recipe>-<variant>`` (or the recipe name alone without a matrix)."""
    name = getattr(ctx.recipe, "name", None) or "model"
    label = ctx.run_id.split("@", 1)[1] if "@" in ctx.run_id else ""
    return f"{name}-{label}" if label else name


def resolve_target_device(target: str, device: str) -> str:
    """``compile.device`` with 'auto' resolved: CUDA when the target runs there and it is present, else the
    target's first device."""
    devices = TARGETS[target].devices
    if device != "auto":
        return device
    if "cuda" in devices:
        import torch

        if torch.cuda.is_available() or devices[0] == "cuda":
            return "cuda"
    return devices[0]


def read_engine(engine_dir: Path) -> dict:
    """``engine.json`` of a compile artifact."""
    return json.loads((Path(engine_dir) / ENGINE).read_text())


def engine_model_dir(engine_dir: Path) -> Path:
    """The model folder of a compile artifact (relative paths resolved against the artifact)."""
    engine = read_engine(engine_dir)
    p = Path(engine["model_dir"])
    return p if p.is_absolute() else Path(engine_dir) / p


def embedded_device() -> str:
    """Where the embedded runtime runs on this machine: CUDA when torch sees a GPU, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_engine(engine_dir: Path):
    """``(model, tokenizer)`` in process for a compile artifact, through its target's ``load``."""
    engine = read_engine(engine_dir)
    module = engine_module(engine["target"])
    if not hasattr(module, "load"):
        raise TargetUnavailable(
            f"{engine_dir}: target {engine['target']!r} has no in-process runtime here; evaluate or serve it "
            "through its own server on a machine that runs it."
        )
    return module.load(Path(engine_dir), engine["device"])  # resolved at compile (resolve_target_device)


def load_for_eval(engine_dir: Path):
    """``(model, tokenizer, runtime)`` for evaluation: the target's own in-process runtime where it has one and
    runs here; otherwise the embedded runtime on the quantized folder the artifact was built from (the same
    weights, other kernels), named as such in ``runtime`` so no report passes it off as the engine's figure."""
    engine = read_engine(engine_dir)
    module = engine_module(engine["target"])
    if hasattr(module, "load") and module.available(engine["device"]).runs:
        model, tokenizer = module.load(Path(engine_dir), engine["device"])
        return model, tokenizer, engine["target"]
    from pipeline.engines.transformers_engine import load_folder

    model, tokenizer = load_folder(Path(engine["source_model_dir"]), embedded_device(), engine)
    return model, tokenizer, f"transformers on the same checkpoint ({engine['engine']} not run here)"
