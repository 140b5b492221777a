"""Reading a recipe file into the typed schema of :mod:`pipeline.recipe`.

YAML is read with the line of every key, ``${ENV_VAR}`` (``${VAR:-default}`` too) is interpolated, pydantic
validates (unknown keys are errors), ``matrix:`` expands into variants, and the rules that span stages
(``pipeline/rules.py``) are checked before any heavy work. Every failure is one ``RecipeError`` naming the file,
the line, the field and what would be valid.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import RecipeError
from pipeline.recipe import LoadedRecipe, Recipe


# ---------------------------------------------------------------- YAML with line numbers and ${ENV}

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (for error messages)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    mapping["__lines__"] = lines
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(data: Any, lines: dict[tuple, int], path: tuple = ()) -> Any:
    """Remove the ``__lines__`` bookkeeping, recording each field path's line in ``lines``."""
    if isinstance(data, dict):
        own = data.pop("__lines__", {})
        for k, line in own.items():
            lines[path + (k,)] = line
        return {k: _strip_lines(v, lines, path + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        return [_strip_lines(v, lines, path + (i,)) for i, v in enumerate(data)]
    return data


def _interpolate(data: Any, where: str, lines: dict[tuple, int], path: tuple = ()) -> Any:
    if isinstance(data, dict):
        return {k: _interpolate(v, where, lines, path + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, where, lines, path + (i,)) for i, v in enumerate(data)]
    if isinstance(data, str):

        def sub(m: re.Match) -> str:
            value = os.environ.get(m.group(1), m.group(2))
            if value is None:
                raise RecipeError(
                    f"{where}:{line_of(lines, path)}: field '{_dotted(path)}' uses ${{{m.group(1)}}}, which is not set "
                    f"in the environment. Set it, or give a default as ${{{m.group(1)}:-value}}."
                )
            return value

        return _ENV.sub(sub, data)
    return data


def line_of(lines: dict[tuple, int], path: tuple) -> int | str:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return "?"


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _pydantic_message(err: ValidationError, where: str, lines: dict[tuple, int], prefix: tuple = ()) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = prefix + tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        if e["type"] == "extra_forbidden":
            msg = "unknown key; " + _valid_keys_hint(loc)
        elif e["type"] == "literal_error":
            msg = f"{e['msg'].lower()} (got {e.get('input')!r})"
        elif e["type"] == "missing":
            msg = "is required but missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}:{line_of(lines, loc)}: field '{_dotted(loc)}': {msg}")
    return "; ".join(parts) + "."


def _valid_keys_hint(loc: tuple) -> str:
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    keys = sorted(model.model_fields) if model else []
    return f"valid keys here: {', '.join(keys)}" if keys else "not a recipe field"


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read, interpolate, validate and expand a recipe file. Raises RecipeError with file:line: field: why."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such recipe file. Check the path (see recipes/ for examples).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{where}: cannot read the recipe: {e}.") from None
    try:
        raw = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else "?"
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}:{line}: not valid YAML: {problem}. Fix the syntax at that line.") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}:1: a recipe is a YAML mapping with keys model, quantize, ...; got {type(raw).__name__}.")
    lines: dict[tuple, int] = {}
    data = _interpolate(_strip_lines(raw, lines), where, lines)
    return build_recipe(data, path.resolve(), lines)


def build_recipe(data: dict, path: Path, lines: dict[tuple, int] | None = None) -> LoadedRecipe:
    """Validate a recipe given as a dict (already interpolated) and expand its matrix."""
    lines = lines or {}
    where = str(path)
    try:
        base = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_pydantic_message(e, where, lines)) from None
    variants = _expand(base, data, where, lines)
    name = base.name or re.sub(r"[^A-Za-z0-9._-]", "-", path.stem)
    loaded = LoadedRecipe(path=path, name=name, base=base, variants=variants)
    _check_publish(loaded, lines)
    from pipeline.rules import check_rules  # rules read the schema; the schema does not read the rules

    check_rules(loaded, lines)
    return loaded


def _check_publish(loaded: LoadedRecipe, lines: dict[tuple, int]) -> None:
    """publish.variants names variants; several variants published need {variant} in publish.to."""
    pub = loaded.base.publish
    if pub is None:
        return
    where = f"{loaded.path}:{line_of(lines, ('publish',))}"
    unknown = [v for v in pub.variants or [] if v not in loaded.variants]
    if unknown:
        raise RecipeError(f"{where}: field 'publish.variants': no variant named {unknown[0]!r}; the variants are "
                          f"{', '.join(loaded.variants)}.")
    chosen = [v for v in loaded.variants if not pub.variants or v in pub.variants]
    if len(chosen) > 1 and "{variant}" not in pub.to:
        raise RecipeError(f"{where}: field 'publish.to': {len(chosen)} variants would be published to the same "
                          f"destination {pub.to!r}. Put {{variant}} in it (e.g. {pub.to}-{{variant}}), or list one "
                          "variant in publish.variants.")


def _expand(base: Recipe, data: dict, where: str, lines: dict[tuple, int]) -> dict[str, Recipe]:
    if not base.matrix:
        return {base.quantize.method: base}
    keys = list(base.matrix)
    for k in keys:
        if _field_at(k) is None:
            raise RecipeError(
                f"{where}:{line_of(lines, ('matrix', k))}: field 'matrix.{k}': not a recipe field. Use a dotted path "
                f"to a field, e.g. quantize.method, quantize.w_bits or quantize.smoothquant.alpha."
            )
        if not base.matrix[k]:
            raise RecipeError(f"{where}:{line_of(lines, ('matrix', k))}: field 'matrix.{k}': needs at least one value.")
    variants: dict[str, Recipe] = {}
    for combo in itertools.product(*(base.matrix[k] for k in keys)):
        variant = copy.deepcopy({k: v for k, v in data.items() if k != "matrix"})
        for k, v in zip(keys, combo):
            *parents, leaf = k.split(".")
            node = variant
            for part in parents:
                node[part] = dict(node.get(part) or {})
                node = node[part]
            node[leaf] = v
        label = "-".join(_label(k, v) for k, v in zip(keys, combo))
        try:
            variants[label] = Recipe.model_validate(variant)
        except ValidationError as e:
            raise RecipeError(
                f"variant '{label}' of the matrix: " + _pydantic_message(e, where, lines)
            ) from None
    if len(variants) != len(list(itertools.product(*base.matrix.values()))):
        raise RecipeError(f"{where}:{line_of(lines, ('matrix',))}: field 'matrix': values repeat; each variant must differ.")
    return variants


def _label(key: str, value: Any) -> str:
    """A variant's name part: a string value itself (rtn, lmdeploy), else the field and value (groupsize64)."""
    if isinstance(value, str):
        return value.lower()
    field = key.rsplit(".", 1)[-1]
    return f"{field.removeprefix('w_').replace('_', '')}{str(value).lower()}"


def _field_at(dotted: str) -> Any:
    """The pydantic field a dotted matrix key names, or None."""
    model: type[BaseModel] | None = Recipe
    field = None
    for part in dotted.split("."):
        if model is None or part not in model.model_fields or part == "matrix":
            return None
        field = model.model_fields[part]
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return field if "." in dotted else None
