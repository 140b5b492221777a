"""compile: turn the quantized checkpoint into the artifact its engine target loads, and say whether it ran.

The stage is thin: it reads what the quantized folder declares (``pipeline.formats.detect``), checks the
target's row in ``pipeline/targets.py`` again (the recipe validator checked it before any work, but a source
quantized elsewhere is only known now), and calls the target's module (contract in
``pipeline/engines/base.py``). When this machine can run the engine, the module's ``check_run`` loads the
artifact in the real engine; when it cannot, the artifact is still built and ``engine.json`` and the manifest
say 'not run here' and why — never a pretended run. ``compile.require_run: true`` turns that into a failure.

The artifact is relocatable: ``engine.json`` names only paths relative to the artifact. A target that reads the
quantized folder in place (the embedded one) gets it hard-linked into ``model/`` (copied across file systems),
and the quantized folder the artifact was built from is named relative to it (``source_artifact``: the sibling
quantize artifact, read only by the evaluate stand-in for targets that do not run here). Text files that still
name a local absolute path after the build are listed in ``engine.json``'s ``absolute_paths``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.artifacts import ENGINE, model_path, write_json
from pipeline.errors import ModelFolderError, QuantizationError, TargetUnavailable
from pipeline.stages import StageContext
from pipeline.targets import TARGETS, check_target_loads, engine_module
from pipeline.resources import releases_models

ENGINE_JSON_VERSION = 3  # 3: relative paths only (source_artifact replaces the absolute source_model_dir)


@releases_models
def run(ctx: StageContext) -> dict:
    """The compile stage: the quantized folder built into the target engine's artifact (``engine.json``)."""
    from pipeline.engines.base import ARTIFACT_MODEL, BuildContext, link_model_folder, serving_files
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
    model_dir = build.pop("model_dir", None) or ARTIFACT_MODEL
    if Path(model_dir).is_absolute():  # a target reading its input in place: link it in, so the folder travels
        linked = link_model_folder(Path(model_dir), ctx.out / ARTIFACT_MODEL)
        ctx.log.info("%s: linked %d file(s) of %s into %s/", ctx.run_id, len(linked), Path(model_dir).name,
                     ARTIFACT_MODEL)
        model_dir = ARTIFACT_MODEL
    checked = None
    if availability.runs and hasattr(module, "check_run"):
        ctx.progress(1, 2, f"loading in {spec.engine}")
        checked = module.check_run(ctx.out, ctx.log)
    status = ("ran here" if checked is not None else "runs here") if availability.runs else f"not run here: {availability.why}"
    served = serving_files(ctx.out / model_dir)
    engine = {
        "version": ENGINE_JSON_VERSION,
        "target": cfg.target,
        "engine": spec.engine,
        "device": device,
        "format": fmt.__dict__,
        "model_dir": model_dir,  # relative to the artifact
        # the quantize artifact it was built from, relative to this one (the evaluate stand-in reads its model)
        "source_artifact": os.path.relpath(ctx.inputs["quantize"], ctx.out),
        "model_name": bctx.model_name,
        "status": status,
        "run_here": availability.runs,
        "why": availability.why,
        "check_run": checked,
        "serving_files": served,
        "build": _relative(build, ctx.out),
        "allow_pickle": model.allow_pickle,
        "trust_remote_code": model.trust_remote_code,
    }
    roots = [ctx.out, ctx.out.parent, src, src.resolve(), Path.home(), Path.cwd()]
    engine["absolute_paths"] = absolute_paths(ctx.out, roots)  # e.g. a source folder's own logs, carried verbatim
    if engine["absolute_paths"]:
        ctx.log.info("%s: the artifact names local paths, so a copy of it may not load elsewhere: %s",
                        ctx.run_id, "; ".join(engine["absolute_paths"][:3]))
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

    model, tokenizer = load_folder(source_model_dir(engine_dir), embedded_device(), engine)
    return model, tokenizer, f"transformers on the same checkpoint ({engine['engine']} not run here)"


def source_model_dir(engine_dir: Path) -> Path:
    """The quantized model folder a compile artifact was built from (``source_artifact``, relative to it)."""
    engine_dir = Path(engine_dir)
    engine = read_engine(engine_dir)
    if "source_artifact" not in engine:  # engine.json version 2 named it absolutely
        return Path(engine["source_model_dir"])
    artifact = engine_dir / engine["source_artifact"]
    if not artifact.is_dir():
        raise ModelFolderError(
            f"{engine_dir} was built from the quantize artifact {engine['source_artifact']} (beside it in the run's "
            f"output folder), which is not there: the folder was copied without it. Its own model is complete; only "
            f"evaluating a {engine['target']!r} artifact where {engine['engine']} does not run needs the quantized "
            "checkpoint. Copy the quantize artifact beside it, or evaluate where the engine runs."
        )
    return model_path(artifact)


def _relative(value, out: Path):
    """``value`` with paths inside ``out`` made relative to it and other absolute local paths shown by name."""
    from pipeline.provenance import portable

    if isinstance(value, dict):
        return {k: _relative(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative(v, out) for v in value]
    if isinstance(value, (str, Path)) and Path(value).is_absolute() and not any(c.isspace() for c in str(value)):
        try:
            return Path(value).relative_to(out).as_posix()
        except ValueError:
            return portable(str(value))
    return value


_TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".jinja", ".cfg", ".ini", ".toml", ".py", ".md", ".log",
                  "Modelfile")


def absolute_paths(folder: Path, roots: list[Path]) -> list[str]:
    """``file: which root`` for each text file under ``folder`` (1 MiB at most) that names one of ``roots``."""
    needles = sorted({str(r) for r in roots if str(r) not in ("", "/")}, key=len, reverse=True)
    found = []
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file() or not p.name.endswith(_TEXT_SUFFIXES) or p.stat().st_size > 1 << 20:
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        hit = next((n for n in needles if n in text), None)
        if hit:
            found.append(f"{p.relative_to(folder).as_posix()}: {_root_name(Path(hit), folder)}")
    return found


def _root_name(root: Path, folder: Path) -> str:
    """Which local path a file names, said without naming it (engine.json must not carry it either)."""
    if root == folder:
        return "the artifact's own build folder"
    if root == folder.parent:
        return "the run's output folder"
    return f"<local>/{root.name}"
