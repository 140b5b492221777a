"""Where an assembled publishable folder goes: a local folder (atomic copy) or a Hugging Face hub repo (one commit).

- ``file:///path``: copied into a temporary sibling, then renamed into place (a reader sees the old publication
  or the new one, never half of one). An identical publication already there is left as it is; a different one is
  an error unless ``publish.overwrite``.
- ``hf://org/name``: ``HfApi.create_repo(exist_ok=True, private=...)``, ``create_branch`` for a ``revision`` other
  than main, then ONE ``create_commit`` with every file (read against huggingface_hub 2.4.0 ``hf_api.py``:
  ``/api/repos/create``, ``/api/models/{repo}/branch/{rev}``, ``/api/models/{repo}/preupload/{rev}``,
  ``/api/validate-yaml``, ``/api/models/{repo}/commit/{rev}``). ``create_commit`` rather than ``upload_folder``:
  with hf_xet installed the latter may split a folder into several commits. The token comes from huggingface_hub's
  own lookup (``HF_TOKEN``, then the stored login); it is never passed, logged, or written into a manifest or card,
  and error messages are scrubbed of it (``provenance.scrub_text``). ``HF_ENDPOINT`` picks another hub.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import file_entries, read_manifest
from pipeline.errors import QuantshipError


class PublishError(QuantshipError):
    """A variant could not be published (bad destination, a different publication in the way, the hub refused)."""


@dataclass(frozen=True)
class Destination:
    kind: str  # hf | file
    repo_id: str | None = None
    path: Path | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo_id}" if self.kind == "hf" else f"file://{self.path}"


def parse_destination(to: str) -> Destination:
    """``hf://org/name`` or ``file:///abs/path`` (the recipe validated the form; placeholders are resolved)."""
    if to.startswith("hf://"):
        return Destination("hf", repo_id=to.removeprefix("hf://"))
    if to.startswith("file:///"):
        return Destination("file", path=Path(to.removeprefix("file://")))
    raise PublishError(f"publish.to {to!r} is neither hf://ORG/NAME nor file:///ABSOLUTE/PATH. Fix the recipe's "
                       "publish.to (or --to).")


def publish_folder(folder: Path, dest: Destination, config: dict[str, Any], message: str) -> dict[str, Any]:
    """Send an assembled folder to ``dest``; returns what happened (for the receipt and the terminal)."""
    if dest.kind == "file":
        return copy_folder(folder, dest.path, bool(config.get("overwrite")))
    return upload_folder(folder, dest.repo_id, config.get("revision"), bool(config.get("private", True)),
                         config.get("commit_message") or message)


def _file_set(folder: Path) -> set[tuple[str, str]] | None:
    m = read_manifest(folder)
    return None if m is None else {(f["path"], f["sha256"]) for f in m.get("files", [])}


def copy_folder(folder: Path, dest: Path, overwrite: bool) -> dict[str, Any]:
    """Copy through a temporary sibling and a rename; an identical publication there is kept as it is."""
    from pipeline.verify import verify_folder

    files = len(file_entries(folder)) + 1
    if dest.exists():
        if _file_set(dest) == _file_set(folder) and not verify_folder(dest):
            return {"destination": f"file://{dest}", "status": "unchanged", "files": files}
        if not overwrite and (not dest.is_dir() or any(dest.iterdir())):
            raise PublishError(
                f"{dest} already holds {'a different publication' if _file_set(dest) is not None else 'other files'}. "
                "Nothing was copied. Publish to another path, remove it, or set publish.overwrite: true "
                "(pipeline publish --overwrite) to replace it."
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = dest.with_name(f".{dest.name}.tmp-{stamp}")
    shutil.copytree(folder, tmp)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{stamp}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return {"destination": f"file://{dest}", "status": "replaced" if old else "copied", "files": files}


def upload_folder(folder: Path, repo_id: str, revision: str | None, private: bool, message: str) -> dict[str, Any]:
    """create_repo, then one create_commit with every file of ``folder`` (manifest and card included)."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    from pipeline.provenance import scrub_text

    if constants.is_offline_mode():
        raise PublishError(f"publishing to hf://{repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE is "
                           "set), so it makes no request. Unset HF_HUB_OFFLINE to publish.")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # token: huggingface_hub's own lookup
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in paths]
        info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=revision)
    except (HfHubHTTPError, OSError, ValueError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = (" Log in (`hf auth login`) or set HF_TOKEN to a token with write access to the repo's namespace."
                if status in (401, 403) else " Check the repo id, your network and the hub's status, then publish "
                "again (pipeline publish RUN_DIR).")
        raise PublishError(f"publishing to hf://{repo_id} failed: {scrub_text(str(e)).splitlines()[0]}.{hint}") \
            from None
    return {"destination": f"hf://{repo_id}", "status": "committed", "repo_url": str(url), "commit": info.oid,
            "commit_url": info.commit_url, "revision": revision or "main", "files": len(paths)}
