"""Verify artifact folders against their manifests: every file's sha256, nothing missing, nothing added.

Stable API (``pipeline verify``, the model card and publish stage use these):

``verify_folder(path) -> list[Problem]``
    Recomputes the sha256 of every file of one artifact folder (the one holding ``manifest.json``) and compares
    them with the manifest's ``files``: a ``changed`` file (other bytes), a ``missing`` one (listed, absent), an
    ``added`` one (present, not listed); ``manifest`` when there is no readable manifest. A pointer artifact
    (``model.json``: a local model folder or the unquantized reference, kept where it is by design) is verified
    as the small folder it is, and the local files it points at are checked against the sha256 that
    ``model.json`` recorded for them (``source-changed`` / ``source-missing``) where it recorded them. An empty
    list means the folder is exactly what its manifest says.
``artifact_folders(path) -> list[Path]``
    ``path`` itself when it is an artifact folder, else the artifact folders directly inside it (a run's
    ``outputs/<recipe>`` folder), sorted; temporary folders of unfinished runs are skipped.
``verify_tree(path) -> dict[Path, list[Problem]]``
    ``verify_folder`` on each of ``artifact_folders(path)``; raises ``VerifyError`` when there is none.
``pointer_note(path) -> str | None``
    For a pointer artifact, one sentence saying where it points and that it is not a publishable artifact (its
    weights are not inside it); None for a self-contained folder.
``explain(results) -> str``
    One paragraph naming every problem (artifact, file, what), what it means and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import MANIFEST, MODEL_LINK, TMP_PREFIX, read_manifest, sha256_file
from pipeline.errors import QuantshipError


class VerifyError(QuantshipError):
    """An artifact folder does not match its manifest (or there is no artifact to verify)."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    kind: str  # changed | missing | added | manifest | source-changed | source-missing
    path: str  # the file, relative to the artifact folder ('' for the manifest as a whole)
    detail: str = ""

    def __str__(self) -> str:
        what = {"changed": "changed (sha256 differs)", "missing": "missing", "added": "added (not in the manifest)",
                "manifest": "no readable manifest", "source-changed": "changed in the local folder it points at",
                "source-missing": "missing from the local folder it points at"}.get(self.kind, self.kind)
        return f"{self.path or MANIFEST}: {what}{f' ({self.detail})' if self.detail else ''}"


def verify_folder(path: Path) -> list[Problem]:
    """Problems of one artifact folder against its manifest (empty: it verifies)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if manifest is None or not isinstance(manifest.get("files"), list):
        why = ("no manifest.json" if not (folder / MANIFEST).is_file()
               else "manifest.json unreadable or has no files list")
        return [Problem("manifest", "", why)]
    listed = {f["path"]: f for f in manifest["files"]}
    present = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
               if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}
    problems = []
    for rel, entry in sorted(listed.items()):
        p = present.get(rel)
        if p is None:
            problems.append(Problem("missing", rel))
        elif p.stat().st_size != entry.get("bytes", p.stat().st_size) or sha256_file(p) != entry["sha256"]:
            problems.append(Problem("changed", rel))
    problems += [Problem("added", rel) for rel in sorted(set(present) - set(listed))]
    if not problems:
        problems += _pointer_problems(folder)
    return problems


def _pointer_problems(folder: Path) -> list[Problem]:
    """The files a ``model.json`` pointer recorded, checked where it points (sizes first, then sha256)."""
    link = _read_link(folder)
    if not link or not link.get("files"):
        return []
    target = Path(link.get("path", ""))
    out = []
    for entry in link["files"]:
        p = target / entry["path"]
        if not p.is_file():
            out.append(Problem("source-missing", f"{MODEL_LINK} -> {entry['path']}"))
        elif p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            out.append(Problem("source-changed", f"{MODEL_LINK} -> {entry['path']}"))
    return out


def _read_link(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MODEL_LINK).read_text())
    except (OSError, ValueError):
        return None


def pointer_note(path: Path) -> str | None:
    """What a pointer artifact is (None for a self-contained folder)."""
    link = _read_link(path)
    if link is None:
        return None
    name = link.get("repo_id") or Path(str(link.get("path", ""))).name  # a hub snapshot: its repo, not its hash
    what = f"the unquantized reference {name}" if link.get("kind") == "reference" else f"the model folder {name}"
    return (f"{Path(path).name} is a pointer ({MODEL_LINK}) to {what}, kept where it is by design (never a needless "
            "copy); its weights are not inside it, so it is not a publishable artifact: publish a compile artifact.")


def artifact_folders(path: Path) -> list[Path]:
    """``path`` when it holds a manifest, else its artifact subfolders (temporary ones skipped)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir()
                  if p.is_dir() and not p.name.startswith(TMP_PREFIX) and (p / MANIFEST).is_file())


def verify_tree(path: Path) -> dict[Path, list[Problem]]:
    """``verify_folder`` for every artifact folder at or directly under ``path``."""
    folders = artifact_folders(path)
    if not folders:
        raise VerifyError(
            f"{path} is neither an artifact folder (one holding {MANIFEST}) nor a run's output folder with artifact "
            "folders in it, so there is nothing to verify. Pass an artifact folder such as outputs/<recipe>/"
            "compile-<key>/ or the run folder outputs/<recipe>/."
        )
    return {f: verify_folder(f) for f in folders}


def explain(results: dict[Path, list[Problem]]) -> str:
    """One paragraph: which files of which artifacts differ from their manifests, and what to do."""
    bad = {f: ps for f, ps in results.items() if ps}
    if not bad:
        return f"{len(results)} artifact folder(s) verified: every file matches its manifest's sha256."
    parts = [f"{folder.name}: {', '.join(str(p) for p in problems)}" for folder, problems in bad.items()]
    source = any(p.kind.startswith("source-") for ps in bad.values() for p in ps)
    return (f"{len(bad)} of {len(results)} artifact folder(s) do not match their manifests: {'; '.join(parts)}. "
            "An artifact is never modified after its manifest is written, so these files were edited, removed or "
            "added afterwards (or the copy is incomplete). "
            + ("The local model folder a download artifact points at has changed since it was checked; "
               if source else "")
            + "Re-copy the folder from its origin, or rebuild it with `pipeline run RECIPE --force STAGE`.")
