"""Artifact folders: file-name constants, manifests, sha256, and the temp-folder-then-rename protocol.

An artifact is a folder ``outputs/<recipe>/<stage>-<key12>/`` that holds ``manifest.json``. The manifest is
written last, inside the temporary folder, and the folder is renamed into place only when complete, so a
folder with a manifest whose key matches is complete, and nothing else is ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """The sha256 of a file, read for real (pipeline/verify.py's check; never cached)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)  # hashlib releases the GIL for large buffers: threads hash files in parallel
    return h.hexdigest()


# sha256 of files this process hashed, or that a complete artifact's manifest lists, by what identifies the file's
# content without reading it: (st_dev, st_ino, st_size, st_mtime_ns). A hard link of a hashed file (compile links
# the quantized or reference folder in) has the same inode and is not read again; a rewritten file has a new
# mtime (or inode) and is. Only files whose mtime is older than the hash (or the manifest) by RACY_NS are kept: a
# write in the same clock tick as the reading could leave the mtime unchanged.
_HASHES: dict[tuple[int, int, int, int], str] = {}
_HASHES_LOCK = threading.Lock()
_HASHES_MAX = 200_000
_REMEMBERED: set[tuple[str, int, int]] = set()  # manifests already read into _HASHES: (folder, inode, mtime_ns)
RACY_NS = 1_000_000_000
HASH_THREADS = 4


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _keep(st: os.stat_result, digest: str, before_ns: int) -> None:
    if stat.S_ISREG(st.st_mode) and st.st_mtime_ns < before_ns - RACY_NS:
        with _HASHES_LOCK:
            if len(_HASHES) >= _HASHES_MAX:
                _HASHES.clear()
            _HASHES[_identity(st)] = digest


def _hash_one(path: Path) -> tuple[int, str]:
    """(size, sha256) of one file: from the cache when the same file (inode, size, mtime) was hashed, else read."""
    st = os.stat(path)
    with _HASHES_LOCK:
        known = _HASHES.get(_identity(st))
    if known is not None:
        return st.st_size, known
    started = time.time_ns()
    digest = sha256_file(path)
    after = os.stat(path)
    if _identity(after) == _identity(st):  # unchanged while it was read
        _keep(st, digest, started)
    return st.st_size, digest


def sha256_files(paths: list[Path]) -> list[tuple[int, str]]:
    """(size, sha256) of each path, in order: known files from the cache, the rest read in a few threads."""
    paths = list(paths)
    if len(paths) < 2:
        return [_hash_one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(paths)), thread_name_prefix="sha256") as pool:
        return list(pool.map(_hash_one, paths))


def remember_hashes(folder: Path, _seen_depth: int = 0) -> None:
    """Put the sha256 of the files a complete artifact's manifest lists (and those its ``model.json`` pointer
    recorded, and its input artifacts', siblings named in ``inputs``) into the cache, for files still as they were:
    same size and an mtime older than the manifest's. Cheap: a stat per file, each manifest read once."""
    folder = Path(folder)
    try:
        mst = (folder / MANIFEST).stat()
    except OSError:
        return
    memo = (str(folder.resolve()), mst.st_ino, mst.st_mtime_ns)
    if memo in _REMEMBERED or _seen_depth > 16:
        return
    _REMEMBERED.add(memo)
    manifest = read_manifest(folder)
    if not isinstance(manifest, dict):
        return
    listed = manifest.get("files") if isinstance(manifest.get("files"), list) else []
    _remember_entries(folder, listed, mst.st_mtime_ns)
    if any(isinstance(e, dict) and e.get("path") == MODEL_LINK for e in listed):
        try:
            link = json.loads((folder / MODEL_LINK).read_text())
            if isinstance(link, dict) and isinstance(link.get("files"), list) and link.get("path"):
                _remember_entries(Path(link["path"]), link["files"], (folder / MODEL_LINK).stat().st_mtime_ns)
        except (OSError, ValueError):
            pass
    for entry in (manifest.get("inputs") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("dir"), str) and "/" not in entry["dir"]:
            remember_hashes(folder.parent / entry["dir"], _seen_depth + 1)


def _remember_entries(root: Path, entries: list, before_ns: int) -> None:
    for e in entries:
        try:
            st = os.stat(root / e["path"])
            if st.st_size == e["bytes"] and isinstance(e["sha256"], str):
                _keep(st, e["sha256"], before_ns)
        except (OSError, KeyError, TypeError):
            continue


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Every file under ``root`` (manifest excluded) with its size and sha256, sorted by path."""
    paths = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]
    return [{"path": p.relative_to(root).as_posix(), "bytes": size, "sha256": digest}
            for p, (size, digest) in zip(paths, sha256_files(paths))]


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


def _host() -> str:
    """This machine's name as it goes into a temporary folder's name (no '@', '/' or other odd characters)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def new_tmp_dir(final: Path) -> Path:
    """A fresh temporary sibling of ``final``, ``.tmp-<name>@<host>-<pid>-<ns>``: the host and pid say whose it
    is, so ``clean_stale`` removes it only on that host once that process is gone (the output root may be shared
    by several machines: a Ray cluster)."""
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}@{_host()}-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    return tmp


def tmp_dirs_of(final: Path) -> list[Path]:
    """Every temporary folder of ``final``, whichever host or process made it (either name format)."""
    return sorted(p for pattern in (f"{TMP_PREFIX}{final.name}@*", f"{TMP_PREFIX}{final.name}-*")
                  for p in final.parent.glob(pattern))


def commit_dir(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (with file checksums) into ``tmp`` and rename it to ``final``. Secret environment values
    (``HF_TOKEN``, ``*_API_KEY``...) are masked wherever a stage's metrics or config might have carried them."""
    from pipeline.provenance import scrub_values

    for entry in (manifest.get("inputs") or {}).values():  # files linked in from the inputs are not read again
        if isinstance(entry, dict) and isinstance(entry.get("dir"), str) and "/" not in entry["dir"]:
            remember_hashes(final.parent / entry["dir"])
    manifest = scrub_values({**manifest, "files": file_entries(tmp)})
    write_json(tmp / MANIFEST, manifest)
    if final.exists():  # an earlier incomplete or stale folder of the same name: never read, now replaced
        shutil.rmtree(final)
    os.replace(tmp, final)


def clean_stale(root: Path) -> list[Path]:
    """Remove temporary folders left by runs that were killed: those this host made whose process is gone (or is
    this one), and those in the older name without a host (``.tmp-<name>-<pid>-<ns>``), judged by their pid here.
    Another host's folders stay: its process may still be writing them (a shared output root). Returns what was
    removed."""
    removed = []
    if root.is_dir():
        host = _host()
        for p in root.glob(f"{TMP_PREFIX}*"):
            owner, pid = _owner_of(p.name)
            if owner is not None and owner != host:
                continue
            if pid is None or not _alive(pid) or pid == os.getpid():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _owner_of(name: str) -> tuple[str | None, int | None]:
    """(host, pid) of a temporary folder's name; host None in the older format without one."""
    head, at, tail = name.rpartition("@")
    parts = (tail if at else name).rsplit("-", 2)
    try:
        pid = int(parts[-2]) if len(parts) == 3 else None
    except ValueError:
        pid = None
    return (parts[0] if at and len(parts) == 3 else None), pid


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


def link_or_copy(src: Path, target: Path) -> None:
    """``target`` becomes a hard link of ``src`` (no bytes copied, the same inode: its sha256 is reused), or a
    copy where the two are on different file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), target)
    except OSError:
        shutil.copy2(src, target)


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
