"""Manifest hashing (pipeline/artifacts.py): the same entries as a plain sha256 of every file, with files already
hashed (hard links, or the same inode/size/mtime as a complete artifact's file) not read again, and verify still
reading every file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

import pipeline.artifacts as artifacts
from pipeline.artifacts import MANIFEST, MODEL_LINK, commit_dir, file_entries, new_tmp_dir, write_json
from pipeline.verify import verify_folder

OLD_NS = 1_600_000_000 * 10**9  # an mtime well before any hash in these tests (not a racy, just-written file)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(artifacts, "_HASHES", {})
    monkeypatch.setattr(artifacts, "_REMEMBERED", set())


@pytest.fixture
def reads(monkeypatch):
    """Paths artifacts reads to hash (every call of its sha256_file), thread-safe."""
    seen: list[str] = []
    lock = threading.Lock()
    real = artifacts.sha256_file

    def counting(path, *a, **k):
        with lock:
            seen.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(artifacts, "sha256_file", counting)
    return seen


def _write(folder, files: dict[str, bytes], old: bool = True):
    for rel, data in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if old:
            os.utime(p, ns=(OLD_NS, OLD_NS))


def _plain(folder) -> list[dict]:
    return [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size,
             "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]


FILES = {"a.bin": os.urandom(9 << 20), "b/c.safetensors": os.urandom(3 << 20) + b"x", "empty": b"",
         "d.json": b'{"x": 1}', "b/e/f.txt": b"tail"}


def test_entries_are_a_plain_sha256_of_every_file_in_path_order(tmp_path, reads):
    _write(tmp_path, FILES)
    assert file_entries(tmp_path) == _plain(tmp_path)
    assert sorted(reads) == sorted(os.path.basename(k) for k in FILES)
    assert file_entries(tmp_path) == _plain(tmp_path)  # again, from the cache: the same entries
    assert len(reads) == len(FILES)


def _artifact(root, name: str, files: dict[str, bytes], inputs: dict | None = None):
    final = root / name
    tmp = new_tmp_dir(final)
    _write(tmp, files)
    commit_dir(tmp, final, {"key": name, "inputs": inputs or {}})
    return final


def _linked(src, dst, rels):
    for rel in rels:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / rel, dst / rel)


@pytest.mark.parametrize("same_process", [True, False])
def test_a_hard_linked_file_of_an_input_artifact_is_not_read_again(tmp_path, reads, same_process):
    quant = _artifact(tmp_path, "quantize-aaaa", FILES)
    assert len(reads) == len(FILES)
    if not same_process:  # another process (a Ray worker): what it knows comes from the input's manifest
        artifacts._HASHES.clear()
        artifacts._REMEMBERED.clear()
    reads.clear()
    final = tmp_path / "compile-bbbb"
    tmp = new_tmp_dir(final)
    _linked(quant, tmp / "model", FILES)
    _write(tmp, {"engine.json": b"{}"})
    commit_dir(tmp, final, {"key": "b", "inputs": {"quantize": {"run": "q", "key": "aaaa", "dir": quant.name}}})
    assert reads == ["engine.json"]
    assert json.loads((final / MANIFEST).read_text())["files"] == _plain(final)
    assert verify_folder(final) == []


def test_a_reference_folder_recorded_by_download_is_not_read_again(tmp_path, reads):
    source = tmp_path / "hf-model"
    source.mkdir()
    _write(source, FILES)
    entries = _plain(source)
    download = tmp_path / "out" / "download-cccc"
    tmp = new_tmp_dir(download)
    write_json(tmp / MODEL_LINK, {"path": str(source), "files": entries})
    os.utime(tmp / MODEL_LINK, ns=(OLD_NS + 5 * 10**9, OLD_NS + 5 * 10**9))
    commit_dir(tmp, download, {"key": "c", "inputs": {}})
    quant = _artifact(tmp_path / "out", "quantize-dddd", {MODEL_LINK: b'{"kind": "reference"}'},
                      {"download": {"dir": download.name}})
    reads.clear()
    final = tmp_path / "out" / "compile-eeee"
    tmp = new_tmp_dir(final)
    _linked(source, tmp / "model", FILES)
    commit_dir(tmp, final, {"key": "e", "inputs": {"quantize": {"dir": quant.name}}})
    assert reads == []  # quantize -> download -> model.json's files: every linked file known
    assert json.loads((final / MANIFEST).read_text())["files"] == _plain(final)


def test_a_modified_file_is_hashed_again(tmp_path, reads):
    _write(tmp_path, FILES)
    first = file_entries(tmp_path)
    reads.clear()
    (tmp_path / "d.json").write_bytes(b'{"x": 2}')  # same size, new mtime
    again = file_entries(tmp_path)
    assert reads == ["d.json"]
    assert again == _plain(tmp_path) and again != first


def test_a_file_written_in_the_last_second_is_not_cached(tmp_path, reads):
    _write(tmp_path, {"fresh.bin": b"new"}, old=False)
    file_entries(tmp_path)
    file_entries(tmp_path)
    assert reads == ["fresh.bin", "fresh.bin"]


def test_a_file_changed_after_its_manifest_is_not_taken_from_the_manifest(tmp_path, reads):
    quant = _artifact(tmp_path, "quantize-ffff", FILES)
    (quant / "d.json").write_bytes(b'{"x": 3}')  # mtime now: newer than the manifest
    artifacts._HASHES.clear()
    artifacts._REMEMBERED.clear()
    reads.clear()
    final = tmp_path / "compile-gggg"
    tmp = new_tmp_dir(final)
    _linked(quant, tmp, ["d.json", "a.bin"])
    commit_dir(tmp, final, {"key": "g", "inputs": {"quantize": {"dir": quant.name}}})
    assert reads == ["d.json"]
    assert json.loads((final / MANIFEST).read_text())["files"] == _plain(final)


def test_verify_reads_every_file_even_when_the_cache_would_answer(tmp_path, reads):
    quant = _artifact(tmp_path, "quantize-hhhh", FILES)
    target = quant / "d.json"
    before = target.stat()
    target.write_bytes(b'{"x": 9}')  # same size; the mtime put back: only reading the bytes can tell
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert [p.kind for p in verify_folder(quant)] == ["changed"]


# --- temporary folders on an output root several machines share ----------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_temporary_folder_names_its_host_and_process(tmp_path):
    tmp = new_tmp_dir(tmp_path / "quantize-0123456789ab")
    assert tmp.name.startswith(f".tmp-quantize-0123456789ab@{artifacts._host()}-{os.getpid()}-")
    assert artifacts._owner_of(tmp.name) == (artifacts._host(), os.getpid())


def test_clean_stale_removes_only_this_hosts_dead_folders_and_old_style_dead_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_host", lambda: "node-a.local")
    dead, alive = _dead_pid(), os.getppid()
    names = {
        f".tmp-compile-0123456789ab@node-a.local-{dead}-1": True,  # this host, process gone
        f".tmp-compile-0123456789ab@node-a.local-{os.getpid()}-2": True,  # this process: not running it now
        f".tmp-compile-0123456789ab@node-a.local-{alive}-3": False,  # this host, still running
        f".tmp-compile-0123456789ab@node-b-7-{dead}-4": False,  # another host (a '-' in its name): may be running
        f".tmp-compile-0123456789ab@node-b-7-{alive}-5": False,
        f".tmp-quantize-0123456789ab-{dead}-6": True,  # the older name, without a host: judged here, as before
        f".tmp-quantize-0123456789ab-{alive}-7": False,
        ".tmp-unparseable": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
    removed = {p.name for p in artifacts.clean_stale(tmp_path)}
    assert removed == {n for n, gone in names.items() if gone}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, gone in names.items() if not gone}


def test_a_retried_ray_task_removes_its_earlier_attempts_from_any_host(tmp_path):
    from types import SimpleNamespace

    from pipeline.executors.ray_executor import remove_attempt_leftovers

    final = tmp_path / "quantize-0123456789ab"
    mine = [new_tmp_dir(final), tmp_path / ".tmp-quantize-0123456789ab@node-b-12-5",
            tmp_path / ".tmp-quantize-0123456789ab-12-6"]  # this host, another host, the older name
    others = [tmp_path / ".tmp-quantize-ba9876543210@node-b-12-5", tmp_path / ".tmp-compile-0123456789ab-12-6"]
    for p in mine + others:
        p.mkdir(exist_ok=True)
    assert sorted(remove_attempt_leftovers(SimpleNamespace(dir=final))) == sorted(mine)
    assert sorted(tmp_path.iterdir()) == sorted(others)
