"""Artifact folders: file-name constants, manifests, sha256, and the temp-folder-then-rename protocol.

An artifact is a folder ``outputs/<recipe>/<stage>-<key12>/`` that holds ``manifest.json``. The manifest is
written last, inside the temporary folder, and the folder is renamed into place only when complete, so a
folder with a manifest whose key matches is complete, and nothing else is ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PLAN = "plan.json"
REPORT_MD = "report.md"
RUN_LOG = "run.log"
METRICS = "metrics.json"
ENGINE = "engine.json"  # compile output: which engine loads what, and how
SMOKE = "smoke.json"  # serve output: the smoke-test request and reply
CALIB_TOKENS = "calib_tokens.safetensors"  # calibrate output: int64 [samples, seq_len]
MODEL_LINK = "model.json"  # download output for a local folder: where it is, never a needless copy
MODEL_DIR = "model"  # download output for a hub snapshot / quantize output: a Hugging Face model folder
TMP_PREFIX = ".tmp-"
MANIFEST_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Every file under ``root`` (manifest excluded) with its size and sha256, sorted by path."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete artifact, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: Path, key: str) -> bool:
    m = read_manifest(folder)
    return m is not None and m.get("key") == key


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def new_tmp_dir(final: Path) -> Path:
    """A fresh temporary sibling of ``final``; leftovers of killed runs are removed by ``clean_stale``."""
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (with file checksums) into ``tmp`` and rename it to ``final``. Secret environment values
    (``HF_TOKEN``, ``*_API_KEY``...) are masked wherever a stage's metrics or config might have carried them."""
    from pipeline.provenance import scrub_values

    manifest = scrub_values({**manifest, "files": file_entries(tmp)})
    write_json(tmp / MANIFEST, manifest)
    if final.exists():  # an earlier incomplete or stale folder of the same name: never read, now replaced
        shutil.rmtree(final)
    os.replace(tmp, final)


def clean_stale(root: Path) -> list[Path]:
    """Remove temporary folders left by runs that were killed. Returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.glob(f"{TMP_PREFIX}*"):
            pid = _pid_of(p.name)
            if pid is None or not _alive(pid) or pid == os.getpid():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _pid_of(name: str) -> int | None:
    try:
        return int(name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def model_path(artifact: Path) -> Path:
    """The Hugging Face model folder an artifact holds: its ``model/`` folder, or where ``model.json`` points."""
    link = artifact / MODEL_LINK
    if link.is_file():
        return Path(json.loads(link.read_text())["path"])
    return artifact / MODEL_DIR


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
