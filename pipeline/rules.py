"""The rules that span stages, checked on a loaded recipe before any work (STYLE habit 2): calibration for the
methods that need it, bit widths per method, pinned hub revisions, and which targets load which formats at which
settings (the data is in ``pipeline/targets.py``). One ``RecipeError`` lists every violation, each with the file,
line and field."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pipeline.errors import RecipeError
from pipeline.recipe import METHOD_BITS
from pipeline.recipe_load import line_of
from pipeline.targets import (
    METHODS_NEEDING_CALIBRATION,
    TARGETS,
    FormatSettings,
    check_target_loads,
    check_target_option,
)

if TYPE_CHECKING:
    from pipeline.recipe import LoadedRecipe, Recipe


def check_rules(loaded: LoadedRecipe, lines: dict[tuple, int]) -> None:
    """Cross-stage rules, checked before any work. One RecipeError listing every violation."""
    where = str(loaded.path)
    problems: list[str] = []
    for label, r in loaded.variants.items():
        tag = f" (variant '{label}')" if len(loaded.variants) > 1 else ""
        q = r.quantize
        src = r.model.source
        if _looks_like_hub_id(src) and not loaded.resolve(src).exists() and not r.model.revision:
            problems.append(
                f"{where}:{line_of(lines, ('model', 'source'))}: field 'model.source'{tag}: hub id {src!r} needs a pinned "
                f"'model.revision' (a commit sha or tag) so runs are reproducible"
            )
        if q.method in METHODS_NEEDING_CALIBRATION and r.calibration is None:
            problems.append(
                f"{where}:{line_of(lines, ('quantize', 'method'))}: field 'quantize.method'{tag}: {q.method} needs "
                f"calibration data; add a 'calibration:' section with a source"
            )
        allowed = METHOD_BITS[q.method][1]
        if q.method != "none" and q.w_bits not in allowed:
            why = {"rtn": "rtn writes the AWQ GEMM layout, which holds 4-bit weights only",
                   "awq": "awq writes the AWQ GEMM layout, which holds 4-bit weights only",
                   "smoothquant": "smoothquant is W8A8: 8-bit weights"}.get(q.method, f"{q.method} writes")
            problems.append(
                f"{where}:{line_of(lines, ('quantize', 'w_bits'))}: field 'quantize.w_bits'{tag}: {why}; valid: "
                f"{' or '.join(map(str, allowed))}; got {q.w_bits}"
            )
        if q.method == "smoothquant" and q.smoothquant.layout == "compressed-tensors" and r.compile.target.startswith(
                ("lmdeploy", "turbomind")):
            problems.append(
                f"{where}:{line_of(lines, ('quantize', 'smoothquant'))}: field 'quantize.smoothquant.layout'{tag}: lmdeploy "
                f"reads its own smooth_quant layout; set layout: lmdeploy"
            )
        # Static act-order (desc_act with static_groups) keeps g_idx = i // group_size and the checkpoint declares
        # desc_act: false (pipeline/formats/gptq.py declared_desc_act), which TurboMind loads; the targets' rows
        # refuse only a permuted g_idx and what else their loaders refuse.
        settings = _source_format(loaded, r) if q.method == "none" else q.format_settings()
        why = check_target_loads(r.compile.target, settings)
        if why:
            problems.append(f"{where}:{line_of(lines, ('compile', 'target'))}: field 'compile.target'{tag}: {why}")
        why = check_target_option(r.compile.target, r.compile.device, r.compile.kv_cache)
        if why:
            field = "device" if why.startswith("compile.device") else "kv_cache"
            problems.append(f"{where}:{line_of(lines, ('compile', field))}: field 'compile.{field}'{tag}: {why}")
        if r.eval is not None and r.eval.through == "endpoint" and not why:
            why = _no_server_here(r.compile.target, r.compile.device)
            if why:
                valid = [t for t in _targets_serving_here(settings, r.compile.device) if t != r.compile.target]
                problems.append(
                    f"{where}:{line_of(lines, ('eval', 'through'))}: field 'eval.through'{tag}: endpoint, but "
                    f"compile.target {r.compile.target!r} has no server that runs on this machine ({why}), so the "
                    f"evaluate stage could not start one; valid: eval.through auto (the endpoint where the target's "
                    f"server runs, else in process, labelled so) or in_process, or a compile.target whose server "
                    f"runs here for this format ({', '.join(valid) or 'none'}), or run the recipe on a machine that "
                    f"runs {TARGETS[r.compile.target].engine}"
                )
    if problems:
        raise RecipeError("; ".join(dict.fromkeys(problems)) + ".")


# Targets whose engine ships no OpenAI-compatible server (their module's ``serve_command`` returns None whatever
# the artifact): pipeline/engines/onnxruntime_engine.py serve_command.
_WITHOUT_SERVER = {"onnxruntime": "ONNX Runtime and onnxruntime-genai ship no OpenAI-compatible server"}


def _no_server_here(target: str, device: str) -> str | None:
    """Why ``target``'s server (its engine's own, or the embedded one for a target without ``serve_command``)
    cannot run on this machine at ``compile.device``, or None. The same facts the evaluate and serve stages use
    (``pipeline.stages.serve.engine_server``): the target's ``available(device)``."""
    from pipeline.stages.compile import resolve_target_device
    from pipeline.targets import engine_module

    if target in _WITHOUT_SERVER:
        return f"not served: {_WITHOUT_SERVER[target]}"
    if not TARGETS[target].built:
        return f"not built: quantship's {TARGETS[target].engine} target is not written yet"
    resolved = resolve_target_device(target, device)
    availability = engine_module(target).available(resolved)
    if not availability.runs:
        return f"not run here on {resolved}: {availability.why}"
    return None


def _targets_serving_here(settings: FormatSettings, device: str) -> list[str]:
    """The targets that load ``settings`` and whose server runs here (at ``device`` where they take it)."""
    out = []
    for target, spec in TARGETS.items():
        if check_target_loads(target, settings):
            continue
        at = device if device in spec.devices else "auto"
        if _no_server_here(target, at) is None:
            out.append(target)
    return out


def _source_format(loaded: LoadedRecipe, r: Recipe) -> FormatSettings:
    """What a local source folder declares (a checkpoint quantized elsewhere, passed through with method none)."""
    from pipeline.errors import QuantizationError
    from pipeline.formats.detect import detect_format

    src = loaded.resolve(r.model.source)
    if not (src / "config.json").is_file():
        return FormatSettings("hf")
    try:
        return detect_format(src)
    except (QuantizationError, ValueError):
        return FormatSettings("hf")


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.startswith((".", "/", "~"))


def check_model_widths(loaded: LoadedRecipe, config: dict) -> None:
    """Rules that need the model's config.json: the group size divides every linear's input width."""
    widths = {
        "hidden_size": config.get("hidden_size"),
        "intermediate_size": config.get("intermediate_size"),
    }
    for label, r in loaded.variants.items():
        q = r.quantize
        if q.method == "none":
            continue
        for name, width in widths.items():
            if isinstance(width, int) and width % q.w_group_size:
                raise RecipeError(
                    f"{loaded.path}: field 'quantize.w_group_size' (variant '{label}'): {q.w_group_size} does not divide "
                    f"the model's {name} {width}; valid group sizes for this model: "
                    f"{', '.join(str(g) for g in (32, 64, 128) if all(isinstance(w, int) and w % g == 0 for w in widths.values())) or 'none of 32/64/128'}."
                )
