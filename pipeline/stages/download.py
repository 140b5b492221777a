"""download: a local model folder (checked, never copied) or a hub snapshot pinned to a revision.

Hub models go through ``huggingface_hub.snapshot_download`` into the usual HF cache (so ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` work as everywhere else); the artifact records where the snapshot is.
The token comes from the environment (``HF_TOKEN``) and is never written anywhere. ``model.json`` records the
source's id, the commit it resolved to (the snapshot folder's name for the hub; the git checkout's HEAD or the hub
cache snapshot for a local folder, else None with why) and a fingerprint of its files (``pipeline.provenance``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pipeline.artifacts import MODEL_LINK, sha256_files, write_json
from pipeline.errors import ModelFolderError
from pipeline.provenance import resolve_source
from pipeline.stages import StageContext

SAFE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    local = ctx.recipe.resolve(cfg.source)
    if local.is_dir():
        folder = local
        origin = {"kind": "local", "path": str(local)}
    elif local.exists() or cfg.source.startswith((".", "/", "~")):
        raise ModelFolderError(f"model.source {cfg.source!r} ({local}) is not a folder. Point it at a model folder or a hub id.")
    else:
        folder = _snapshot(cfg)
        origin = {"kind": "hub", "repo_id": cfg.source, "revision": cfg.revision}
    files = check_model_folder(folder, allow_pickle=cfg.allow_pickle)
    ctx.progress(1, 1, "checked")
    source = resolve_source(folder, origin, files)  # id, resolved commit, fingerprint: copied into every manifest
    # A pointer by design (DESIGN.md: never a needless copy): the one artifact that names an absolute path, and
    # not a publishable one (pipeline.verify.pointer_note says so; verify checks the files it points at).
    write_json(ctx.out / MODEL_LINK, {"path": str(folder), **origin, "source": source, "files": files})
    config = json.loads((folder / "config.json").read_text())
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "bytes": sum(f["bytes"] for f in files),
        "files": len(files),
        "commit": source["commit"],
    }


def _snapshot(cfg) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = cfg.allow_patterns or SAFE_PATTERNS + (PICKLE_PATTERNS if cfg.allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id=cfg.source, revision=cfg.revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelFolderError(
            f"model {cfg.source!r} at revision {cfg.revision!r} is not in the Hugging Face cache and the hub cannot be "
            "reached (offline, HF_HUB_OFFLINE=1, or no network). Download it once where the hub is reachable "
            "(same HF_HOME), or point model.source at a local folder."
        ) from None
    except RevisionNotFoundError:
        raise ModelFolderError(f"revision {cfg.revision!r} of {cfg.source!r} does not exist on the hub. Check model.revision.") from None
    except GatedRepoError:
        raise ModelFolderError(
            f"{cfg.source!r} is gated: accept its licence on the hub and set HF_TOKEN in the environment."
        ) from None
    except RepositoryNotFoundError:
        raise ModelFolderError(
            f"no hub repository {cfg.source!r} (or it is private: set HF_TOKEN). Check model.source."
        ) from None


def check_model_folder(folder: Path, allow_pickle: bool = False) -> list[dict]:
    """Check a model folder is complete and safe to load; return its files with sizes and sha256."""
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"model folder {folder} has no config.json; it is not a Hugging Face model folder.")
    try:
        json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise ModelFolderError(f"{folder / 'config.json'} is not valid JSON ({e}).") from None
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for pat in PICKLE_PATTERNS for p in folder.glob(pat))
    if not weights:
        if pickles and not allow_pickle:
            raise ModelFolderError(
                f"model folder {folder} has only pickle weights ({pickles[0].name}); loading pickles can run arbitrary "
                "code. Convert them to safetensors, or set model.allow_pickle: true if you trust the source."
            )
        if not pickles:
            raise ModelFolderError(f"model folder {folder} has no weights (*.safetensors).")
    for w in weights:
        check_safetensors(w)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(
            f"model folder {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); quantship needs it for "
            "calibration, evaluation and serving. Copy the tokenizer files of the base model into the folder."
        )
    files = sorted(p for p in folder.iterdir() if p.is_file())
    # A few files at once (hashlib releases the GIL): an 8B model's four shards in ~1/4 of the time. Hashes are
    # remembered by inode, so a later manifest of an artifact that links these files does not read them again.
    return [
        {"path": p.relative_to(folder).as_posix(), "bytes": size, "sha256": digest}
        for p, (size, digest) in zip(files, sha256_files(files))
    ]


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors all fit in the file (not truncated)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not a valid safetensors file ({e}); re-download or re-save it.") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelFolderError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}. Re-download it."
        )
