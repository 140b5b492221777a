"""Publish a variant: assemble the publishable folder, verify it, copy it to a folder or commit it to the hub.

The publishable folder is the compile artifact as it is served (its files hard-linked; an embedded-target artifact
that points at its quantized folder gets that folder linked in as ``model/`` and an ``engine.json`` that says so
relatively), plus ``README.md`` (``pipeline.release.card``) and ``manifest.json``: the sha256 of every file and the
provenance the compile manifest carries (recipe with secrets removed, source model and commit, calibration hash,
tool versions), the evaluation figures and the verdict. ``pipeline.verify.verify_folder`` must find nothing wrong
before anything leaves the machine.

Destinations (``publish.to``: ``file:///path`` or ``hf://org/name``) are in ``pipeline.release.transport``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import (ENGINE, MANIFEST, file_entries, link_or_copy, model_path, read_manifest,
                                write_json)
from pipeline.release.transport import Destination, PublishError, parse_destination, publish_folder

README = "README.md"
RECEIPT = "publication.json"  # the publish stage's output: where it went, which files, which commit


@dataclass
class Release:
    """One variant of a finished run, ready to be published."""

    root: Path  # the run folder (outputs/<recipe>/)
    recipe: str
    variant: str
    row: dict[str, Any]  # the report's row (verdict included)
    gates: dict[str, Any]
    config: dict[str, Any]  # the publish section (``to`` resolved for this variant)
    compile_dir: Path
    quantize: dict[str, Any]
    download_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # published path -> file to link (README/manifest aside)
    generated: dict[str, str] = field(default_factory=dict)  # published path -> text written at assembly

    @property
    def destination(self) -> Destination:
        return parse_destination(self.config["to"])


def release_for(root: Path, variant: str, config: dict[str, Any], gates: dict[str, Any] | None = None) -> Release:
    """The release of ``variant`` from the run folder ``root`` (its row judged with ``gates``, else the saved ones)."""
    from pipeline.eval.collect import collect_rows, read_plan, saved_gates

    root = Path(root)
    plan = read_plan(root)
    if variant not in plan["variants"]:
        raise PublishError(f"{root}: no variant named {variant!r}; its variants are {', '.join(plan['variants'])}.")
    all_gates = saved_gates(root, plan) or {}
    if gates is not None:
        all_gates = {**all_gates, variant: gates}
    row = next(r for r in collect_rows(root, gates=all_gates) if r["variant"] == variant)
    runs = {r["id"]: r for r in plan["runs"]}
    ids = plan["variants"][variant]
    if "compile" not in ids or read_manifest(root / Path(runs[ids["compile"]]["dir"]).name) is None:
        raise PublishError(f"{root}: variant {variant!r} has no finished compile artifact to publish. Run the recipe "
                           "first (pipeline run RECIPE).")
    compile_dir = root / Path(runs[ids["compile"]]["dir"]).name
    download = runs.get(ids.get("download", ""))
    rel = Release(root, plan.get("name") or root.name, variant, row, all_gates.get(variant) or {}, dict(config),
                  compile_dir, (runs.get(ids.get("quantize", "")) or {}).get("config", {}),
                  root / Path(download["dir"]).name if download else None)
    rel.files, rel.generated = _layout(compile_dir)
    return rel


def _layout(compile_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The compile artifact's files by published path; an embedded-target artifact's model folder as ``model/``
    with an engine.json that points there relatively."""
    files = {e["path"]: compile_dir / e["path"] for e in (read_manifest(compile_dir) or {}).get("files", [])}
    generated: dict[str, str] = {}
    engine = json.loads((compile_dir / ENGINE).read_text())
    if Path(str(engine.get("model_dir", ""))).is_absolute():
        model_dir = Path(engine["model_dir"])
        for p in sorted(model_dir.rglob("*")):
            rel = p.relative_to(model_dir)
            if p.is_file() and not rel.parts[0].startswith(".") and p.name != MANIFEST:
                files[f"model/{rel.as_posix()}"] = p
        engine = {**engine, "model_dir": "model", "source_model_dir": "model"}
        generated[ENGINE] = json.dumps(engine, indent=2) + "\n"
        files.pop(ENGINE, None)
    return files, generated


def serve_entries(release: Release, folder: Path, local_dir: str) -> list:
    """The serve command of every built target that loads this format (its module's ``serve_command`` on the
    folder, paths shown relative to ``local_dir``), ``pipeline serve`` first."""
    from pipeline.release.card import ServeEntry
    from pipeline.targets import TARGETS, FormatSettings, check_target_loads, engine_module

    engine = json.loads(release.generated[ENGINE]) if ENGINE in release.generated else \
        json.loads((folder / ENGINE).read_text())
    target, name = engine["target"], engine.get("model_name") or release.variant
    out = [ServeEntry("pipeline", "quantship", f"pipeline serve {local_dir} --port 8000",
                      "quantship's server: the compile target's own server where it runs here, else the embedded "
                      "one.")]
    fmt = FormatSettings(**engine["format"])
    others = [t for t in TARGETS if t != target and check_target_loads(t, fmt) is None]
    for t in [target, *others]:
        spec, module = TARGETS[t], engine_module(t)
        fn = getattr(module, "serve_command", None)
        try:
            cmd = fn(folder, "127.0.0.1", 8000, None, name) if fn else None
        except Exception as e:  # the folder lacks the files that target's server reads (built for another one)
            if t == target:
                from pipeline.provenance import scrub_text

                out.append(ServeEntry(t, spec.engine, None, f"Its command could not be built here: "
                                      f"{scrub_text(str(e)).replace(str(folder), local_dir)}"))
                continue
            out.append(ServeEntry(t, spec.engine, None, f"Loads this format, but this folder was built for "
                                  f"`{target}`: run the recipe with `compile.target: {t}` to get the files its server "
                                  "reads."))
            continue
        if cmd is None:
            if t == target:
                out.append(ServeEntry(t, spec.engine, None, "No server of its own: `pipeline serve` above serves it."))
            continue
        # this machine's interpreter and binary paths are not the reader's
        argv = ["python" if a == sys.executable else Path(a).name if i == 0 and os.path.isabs(a) else a
                for i, a in enumerate(cmd.argv)]
        line = " ".join(_shell(a.replace(str(folder), local_dir)) for a in argv)
        out.append(ServeEntry(t, spec.engine, line, "" if t == target else f"Also loads this format ({spec.needs})."))
    return out


def _shell(arg: str) -> str:
    import shlex

    return arg if arg.startswith("<") and "/" in arg and " " not in arg else shlex.quote(arg)


def card_text(release: Release, folder: Path) -> str:
    """README.md for the release (``folder`` holds the compile artifact's layout, for the serve commands)."""
    from pipeline.release.card import CardFacts, render_card

    dest = release.destination
    engine = json.loads(release.generated[ENGINE]) if ENGINE in release.generated else \
        json.loads((release.compile_dir / ENGINE).read_text())
    source = source_of(release)
    base = release.config.get("base_model")
    if not base and (source or {}).get("kind") == "hub":
        base = source.get("id")
    # Relative to wherever the folder lands: no path of the publishing machine in the card.
    local_dir = dest.repo_id.split("/")[-1] if dest.kind == "hf" else f"./{dest.path.name}"
    revision = f" --revision {release.config['revision']}" if release.config.get("revision") else ""
    fetch = f"hf download {dest.repo_id} --local-dir {local_dir}{revision}" if dest.kind == "hf" else ""
    facts = CardFacts(
        name=dest.repo_id if dest.kind == "hf" else engine.get("model_name") or dest.path.name, variant=release.variant, recipe=release.recipe,
        row=release.row, quantize=release.quantize, engine=engine, base_model=base, source=source,
        license=source_license(release.download_dir), gates=release.gates, fetch=fetch, local_dir=local_dir,
    )
    facts.serve = serve_entries(release, folder, local_dir)
    from pipeline.provenance import scrub_text

    return scrub_text(render_card(facts))


def source_of(release: Release) -> dict[str, Any] | None:
    """The source model's facts (id, kind, revision, commit, fingerprint): from the compile manifest's provenance,
    else from the download artifact (a compile artifact from before provenance was recorded)."""
    from pipeline.artifacts import MODEL_LINK
    from pipeline.provenance import source_facts

    source = (read_manifest(release.compile_dir) or {}).get("source")
    if source or release.download_dir is None:
        return source
    source = (read_manifest(release.download_dir) or {}).get("source")
    try:
        return source or source_facts(json.loads((release.download_dir / MODEL_LINK).read_text()))
    except (OSError, ValueError):
        return None


def source_license(download_dir: Path | None) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link``) from the source model's README front matter, else its
    config.json; empty when it states none."""
    if download_dir is None:
        return {}
    try:
        folder = model_path(download_dir)
    except (OSError, ValueError, KeyError):
        return {}
    meta: dict[str, Any] = {}
    readme = folder / README
    if readme.is_file():
        import yaml

        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except (yaml.YAMLError, IndexError):
                meta = {}
    if not meta.get("license"):
        try:
            meta = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            meta = {}
    return {k: str(meta[k]) for k in ("license", "license_name", "license_link") if isinstance(meta, dict) and meta.get(k)}


def listing(release: Release) -> list[tuple[str, int]]:
    """What would be published, without writing: (path, bytes); the manifest's size is known only once written."""
    card = card_text(release, release.compile_dir)
    out = [(rel, p.stat().st_size) for rel, p in release.files.items()]
    out += [(rel, len(text.encode())) for rel, text in release.generated.items()]
    out += [(README, len(card.encode())), (MANIFEST, -1)]
    return sorted(out)


def assemble(release: Release, folder: Path) -> Path:
    """Write the publishable folder into the empty folder ``folder`` and verify it; returns ``folder``."""
    from pipeline.provenance import portable, redact
    from pipeline.verify import explain, verify_folder

    folder.mkdir(parents=True, exist_ok=True)
    for rel, src in release.files.items():
        link_or_copy(src, folder / rel)
    for rel, text in release.generated.items():
        (folder / rel).write_text(text, encoding="utf-8")
    (folder / README).write_text(card_text(release, folder), encoding="utf-8")
    cm = read_manifest(release.compile_dir) or {}
    ev = release.row
    manifest = {
        "quantship": cm.get("quantship"),
        "kind": "publication",
        "recipe_name": release.recipe,
        "variant": release.variant,
        "destination": str(release.destination),
        "revision": release.config.get("revision"),
        "verdict": ev.get("verdict"),
        "gates": release.gates,
        "source": source_of(release),
        "recipe": cm.get("recipe"),
        "calibration": cm.get("calibration"),
        "environment": cm.get("environment"),
        "compile": {"key": cm.get("key"), "dir": release.compile_dir.name, "config": cm.get("config")},
        "quantize": release.quantize,
        "metrics": {k: v for k, v in ev.items() if k not in ("stages", "gate_failures")},
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest = portable(redact(manifest))
    manifest["destination"] = _portable_url(manifest["destination"])
    publish = (manifest.get("recipe") or {}).get("publish") or {}
    if publish.get("to"):
        publish["to"] = _portable_url(publish["to"])
    write_json(folder / MANIFEST, {**manifest, "files": file_entries(folder)})
    problems = verify_folder(folder)
    if problems:
        raise PublishError(f"the publishable folder of {release.variant!r} does not verify: "
                           f"{explain({folder: problems})} Nothing was published.")
    return folder


def _portable_url(url: str) -> str:
    """A file:// destination with its folder shown as ``<local>/<name>`` (hub URLs unchanged)."""
    from pipeline.provenance import portable

    return f"file://{portable(url.removeprefix('file://'))}" if url.startswith("file://") else url


def publish_release(release: Release, scratch: Path) -> dict[str, Any]:
    """Assemble (in ``scratch``, removed afterwards), verify and send one release; returns the receipt."""
    from pipeline.eval.collect import PASS

    if release.row.get("verdict") != PASS:
        raise PublishError(f"variant {release.variant!r} is not published: its verdict is "
                           f"{release.row.get('verdict')} ({release.row.get('verdict_why')}). Only variants whose "
                           "gates passed are published.")
    try:
        folder = assemble(release, scratch)
        message = (f"quantship: {release.recipe}/{release.variant} ({release.quantize.get('method')}, "
                   f"{release.row.get('target')})")
        sent = publish_folder(folder, release.destination, release.config, message)
        files = [{"path": e["path"], "bytes": e["bytes"], "sha256": e["sha256"]} for e in file_entries(folder)]
        manifest_sha = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**sent, "variant": release.variant, "files": files, "manifest_sha256": manifest_sha,
            "bytes": sum(f["bytes"] for f in files)}


def releases_of_run(root: Path, to: str | None = None, variants: tuple[str, ...] = (),
                    overwrite: bool = False) -> tuple[list[Release], list[tuple[str, str]]]:
    """The releases of a finished run folder: the variants its recipe publishes (or every variant, with ``to``),
    limited to ``variants``; returns (whose gates passed, [(variant, why not)] for the others)."""
    from pipeline.errors import RecipeError
    from pipeline.eval.collect import PASS, read_plan
    from pipeline.plan import publish_destination
    from pipeline.recipe import PublishSection

    root = Path(root)
    plan = read_plan(root)
    name = plan.get("name") or root.name
    configs = {r["variants"][0]: r["config"] for r in plan["runs"] if r["kind"] == "publish"}
    unknown = [v for v in variants if v not in plan["variants"]]
    if unknown:
        raise RecipeError(f"--variant {unknown[0]}: {root} has no such variant; its variants: "
                          f"{', '.join(plan['variants'])}.")
    if to is not None:
        try:
            PublishSection(to=to)
        except ValueError as e:
            raise RecipeError(f"--to {to!r}: {str(e).splitlines()[-1].strip()}") from None
        chosen = list(variants) or list(plan["variants"])
        if len(chosen) > 1 and "{variant}" not in to:
            raise RecipeError(f"--to {to!r}: {len(chosen)} variants would go to the same destination; put {{variant}} "
                              "in it, or pick one with --variant.")
        configs = {v: {**PublishSection(to=to).model_dump(), **configs.get(v, {}), "to": publish_destination(to, name, v)}
                   for v in chosen}
    elif not configs:
        raise RecipeError(f"{root}: its recipe has no publish section, so there is no destination. Pass --to "
                          "hf://ORG/NAME or --to file:///PATH ({variant} for each variant's own).")
    out, refused = [], []
    for variant, config in configs.items():
        if variants and variant not in variants:
            continue
        release = release_for(root, variant, {**config, **({"overwrite": True} if overwrite else {})})
        if release.row.get("verdict") == PASS:
            out.append(release)
        else:
            refused.append((variant, f"{release.row.get('verdict')} ({release.row.get('verdict_why')})"))
    return out, refused
