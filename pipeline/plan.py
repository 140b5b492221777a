"""Recipe -> plan: the ordered stage runs, each with its inputs and a cache key.

The key of a stage run is the sha256 of (stage kind, its recipe section, the keys of the runs it reads, the
fingerprints of the local files it reads, the versions of the tools it uses). Only what a stage reads goes
into its key, so changing one field reruns that stage and those downstream, and nothing else. Runs with the
same key are the same run: matrix variants share download and calibration (and anything else they agree on).
Artifacts live in ``<output_root>/<recipe>/<stage>-<key12>/``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from pipeline import __version__
from pipeline.artifacts import PLAN, is_complete, sha256_file, write_json
from pipeline.recipe import ENGINE_LIMITS, LoadedRecipe, Recipe
from pipeline.targets import METHODS_NEEDING_CALIBRATION

STAGE_ORDER = ("download", "calibrate", "quantize", "compile", "evaluate", "serve", "publish")
# Fields that change how a stage is run or judged but not what it produces.
_NOT_IN_KEY = {"evaluate": {"gates"},  # serve: how it listens and its load caps, not what the smoke test checks
               "serve": {"keep_running", "host", "port", "api_key", "health_timeout_s", *ENGINE_LIMITS},
               "publish": {"variants", "overwrite"}}
_TOOLS = ("torch", "transformers", "safetensors", "tokenizers")


@dataclass
class StageRun:
    id: str  # "download", "quantize@rtn", ...
    kind: str
    variants: list[str]  # the matrix variants this run serves
    config: dict[str, Any]  # the stage's recipe section, as hashed (secrets masked)
    deps: dict[str, str]  # upstream kind -> run id
    key: str
    dir: Path
    inputs: dict[str, Any] = field(default_factory=dict)  # fingerprints of local files read

    @property
    def key12(self) -> str:
        return self.key[:12]

    def done(self) -> bool:
        return is_complete(self.dir, self.key)


@dataclass
class Plan:
    recipe: LoadedRecipe
    root: Path  # <output_root>/<recipe name>
    runs: list[StageRun]
    variant_runs: dict[str, dict[str, str]]  # variant -> kind -> run id

    def run(self, run_id: str) -> StageRun:
        return next(r for r in self.runs if r.id == run_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "quantship": __version__,
            "recipe": str(self.recipe.path),
            "name": self.recipe.name,
            "variants": self.variant_runs,
            "runs": [
                {"id": r.id, "kind": r.kind, "key": r.key, "dir": str(r.dir), "deps": r.deps, "variants": r.variants,
                 "config": r.config, "inputs": r.inputs}
                for r in self.runs
            ],
        }

    def save(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / PLAN, self.to_json())
        return self.root / PLAN


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the tools whose behaviour a stage's output depends on (read without importing them); ``extra``
    names more distributions (a quantizer, an engine) for a manifest, outside the cache keys."""
    out = {"quantship": __version__}
    for name in (*_TOOLS, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _dump(section: BaseModel | None, drop: set[str] = frozenset()) -> dict[str, Any]:
    if section is None:
        return {}
    data = section.model_dump(mode="python", exclude=drop)
    return json.loads(json.dumps(_mask(data), default=str))


def _mask(data: Any) -> Any:
    if isinstance(data, SecretStr):
        return "**********"
    if isinstance(data, dict):
        return {k: _mask(v) for k, v in data.items()}
    return data


def _key(kind: str, config: dict, deps: dict[str, str], inputs: dict, versions: dict[str, str]) -> str:
    blob = json.dumps(
        {"stage": kind, "config": config, "deps": deps, "inputs": inputs, "versions": versions}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def folder_fingerprint(folder: Path) -> dict[str, Any]:
    """Cheap fingerprint of a local model folder: every file's size and mtime, and config.json's sha256.

    Hashing multi-GB weights on every plan would make ``pipeline plan`` slow; a changed file changes its
    size or mtime. The download stage's manifest records the full sha256 of every file it checked.
    """
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and ".cache" not in p.parts:
            st = p.stat()
            files[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    config = folder / "config.json"
    return {"files": files, "config_sha256": sha256_file(config) if config.is_file() else None}


def _file_fingerprint(path: Path) -> dict[str, Any]:
    return {"path": str(path), "sha256": sha256_file(path)} if path.is_file() else {"source": str(path)}


def _eval_inputs(loaded: LoadedRecipe, ev: Any) -> dict[str, Any]:
    """What the evaluate stage reads besides its section: the text, and the prompt and task files it uses (so
    editing a prompt set or a task YAML reruns the evaluation)."""
    from pipeline.textdata import SHIPPED_PROMPTS, SHIPPED_TASKS

    inputs: dict[str, Any] = {"text": _file_fingerprint(loaded.resolve(ev.text))}
    if ev.sanity:
        inputs["sanity_prompts"] = _file_fingerprint(loaded.resolve(ev.sanity_prompts) if ev.sanity_prompts
                                                     else SHIPPED_PROMPTS)
    if ev.tasks:
        folders = [SHIPPED_TASKS] + [loaded.resolve(p) for p in ev.task_paths]
        inputs["task_files"] = {str(f): {p.name: sha256_file(p) for p in sorted(Path(f).rglob("*")) if p.is_file()}
                                for f in folders if Path(f).is_dir()}
    return inputs


def make_plan(loaded: LoadedRecipe, output_root: Path | str = "outputs") -> Plan:
    """Resolve a loaded recipe into stage runs with cache keys. Reads only small local files."""
    root = Path(output_root).resolve() / loaded.name
    versions = tool_versions()
    runs: dict[str, StageRun] = {}
    by_key: dict[tuple[str, str], str] = {}
    variant_runs: dict[str, dict[str, str]] = {}

    def add(kind: str, variant: str, run_id: str, config: dict, deps: dict[str, str], inputs: dict) -> str:
        dep_keys = {k: runs[v].key for k, v in deps.items()}
        key = _key(kind, config, dep_keys, inputs, versions)
        if (kind, key) in by_key:  # the same work as another variant's: share it
            existing = runs[by_key[(kind, key)]]
            existing.variants.append(variant)
            return existing.id
        run = StageRun(run_id, kind, [variant], config, deps, key, root / f"{kind}-{key[:12]}", inputs)
        runs[run_id] = run
        by_key[(kind, key)] = run_id
        return run_id

    multi = len(loaded.variants) > 1
    for label, r in loaded.variants.items():
        ids: dict[str, str] = {}
        at = f"@{label}" if multi else ""
        src = loaded.resolve(r.model.source)
        model_inputs = {"local": folder_fingerprint(src)} if src.is_dir() else {"hub": r.model.source}
        ids["download"] = add("download", label, f"download{at}", _dump(r.model), {}, model_inputs)
        if r.calibration is not None:
            calib_src = loaded.resolve(r.calibration.source)
            ids["calibrate"] = add(
                "calibrate", label, f"calibrate{at}", _dump(r.calibration), {"download": ids["download"]},
                {"source": _file_fingerprint(calib_src)},
            )
        quant_deps = {"download": ids["download"]}
        if r.quantize.method in METHODS_NEEDING_CALIBRATION:
            quant_deps["calibrate"] = ids["calibrate"]
        ids["quantize"] = add("quantize", label, f"quantize{at}", _dump(r.quantize), quant_deps, {})
        ids["compile"] = add("compile", label, f"compile{at}", _dump(r.compile), {"quantize": ids["quantize"]}, {})
        if r.eval is not None:
            ids["evaluate"] = add(
                "evaluate", label, f"evaluate{at}", _dump(r.eval, _NOT_IN_KEY["evaluate"]),
                {"download": ids["download"], "compile": ids["compile"]},
                _eval_inputs(loaded, r.eval),
            )
        if r.serve is not None and r.serve.enabled:
            ids["serve"] = add(
                "serve", label, f"serve{at}", _dump(r.serve, _NOT_IN_KEY["serve"]), {"compile": ids["compile"]}, {}
            )
        variant_runs[label] = ids
        if r.publish is not None and r.eval is not None and (not r.publish.variants or label in r.publish.variants):
            # After its evaluate; the runner publishes only variants whose gates passed. Not in variant_runs: a
            # variant's verdict (eval/collect.py) is judged up to evaluate and serve, publishing follows from it.
            to = publish_destination(r.publish.to, loaded.name, label)
            deps = {k: ids[k] for k in ("compile", "evaluate", "serve") if k in ids}  # a failed smoke test: not published
            add("publish", label, f"publish{at}", {**_dump(r.publish, _NOT_IN_KEY["publish"]), "to": to}, deps, {})
    ordered = sorted(runs.values(), key=lambda s: STAGE_ORDER.index(s.kind))
    # Shared runs were named after the first variant that needed them; name them plainly instead.
    for s in ordered:
        if len(s.variants) == len(loaded.variants) and "@" in s.id:
            old, s.id = s.id, s.kind
            for ids in variant_runs.values():
                for k, v in ids.items():
                    if v == old:
                        ids[k] = s.id
            for other in ordered:
                other.deps = {k: (s.id if v == old else v) for k, v in other.deps.items()}
    return Plan(loaded, root, ordered, variant_runs)


def publish_destination(to: str, recipe: str, variant: str) -> str:
    """``publish.to`` with ``{recipe}`` and ``{variant}`` filled in."""
    return to.replace("{recipe}", recipe).replace("{variant}", variant)


def variant_recipe(plan: Plan, run: StageRun) -> Recipe:
    """The (first) variant recipe a run belongs to: all its variants agree on what the run reads."""
    return plan.recipe.variants[run.variants[0]]


def downstream(plan: Plan, selected: set[str]) -> set[str]:
    """Run ids of ``selected`` (ids or stage kinds) and everything that depends on them."""
    out = {r.id for r in plan.runs if r.id in selected or r.kind in selected}
    changed = True
    while changed:
        changed = False
        for r in plan.runs:
            if r.id not in out and set(r.deps.values()) & out:
                out.add(r.id)
                changed = True
    return out
