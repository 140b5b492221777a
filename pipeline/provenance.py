"""Provenance: what every artifact's manifest says about where it came from, with secrets and local paths kept out.

Stable API (the model card and publish stage call these):

``redact(data) -> data``
    A copy of a JSON-like value (dicts, lists, pydantic ``SecretStr``) with secrets replaced by ``"**********"``:
    ``SecretStr`` values, the values of keys that name a secret (``token``, ``api_key``, ``password``, ``secret``,
    ``authorization``, ``credential``...), credentials inside URLs, and any string holding the value of a secret
    environment variable (``HF_TOKEN``, ``*_API_KEY``, ``*_TOKEN``, ...; see ``secret_values``).
``scrub_text(text) -> str``, ``scrub_values(data) -> data``
    ``text`` (every string in ``data``) with the value of every secret environment variable and URL credentials
    replaced (for logs, cards, error messages, manifests; ``commit_dir`` applies it to every manifest).
``portable(data) -> data``
    A copy with absolute local paths replaced by ``"<local>/<name>"`` (the last path part), so a manifest carries
    no path of the machine that built it (artifacts are relocatable; publishable folders leak no home folders).
``calibration_hash(path) -> dict``
    The sha256 of the token tensor in a ``calib_tokens.safetensors`` (its raw little-endian bytes, read from the
    safetensors header without torch), with its dtype and shape, and the file's own sha256.
``source_facts(model_json: dict) -> dict``
    The source model of a download artifact: ``id`` (hub repo id, or the local folder's name), ``kind``
    (hub|local), the ``revision`` asked for, the resolved ``commit`` (or None with ``commit_why``) and a
    ``fingerprint`` (sha256 over every file's name and sha256). Computed by the download stage
    (``resolve_source``) and stored in its ``model.json``.
``resolve_source(folder, origin, files) -> dict``
    Builds ``source_facts`` for a folder the download stage checked.
``environment(packages=()) -> dict``
    ``{"quantship", "python", "platform", "tools": {name: version}, "cuda": cuda_facts()}``.
``cuda_facts() -> dict``
    ``torch.version.cuda``, the driver version and GPU names from ``nvidia-smi`` (or pynvml), each None with a
    ``why`` on a machine without them; never fails.
``stage_packages(kind, config) -> tuple[str, ...]``
    The distributions a stage run's output depends on beyond torch/transformers: the quantizer (bitsandbytes for
    bnb methods; our own code otherwise), the engine package of a compile target, lm-eval for tasks.
``manifest_facts(plan, run, out) -> dict``
    What the runner adds to a stage run's manifest: ``recipe`` (the variant's recipe, redacted and portable),
    ``source`` (``source_facts``), ``calibration`` (``calibration_hash`` of the tokens this run's lineage used,
    or None), ``environment``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline import __version__

MASK = "**********"
# Keys whose values are secrets wherever they appear (recipe fields, configs, request headers).
_SECRET_KEY = re.compile(r"(^|_|-)(token|api_?key|apikey|password|passwd|secret|authorization|auth|credentials?|"
                         r"private_key|access_key)$", re.IGNORECASE)
# Keys that contain such a word but hold no secret (token counts, tokenizer settings).
_NOT_SECRET_KEY = re.compile(r"tokens?_|_tokens$|tokenizer|token_id|^(eos|bos|pad|unk|sep|cls|mask)_token$",
                             re.IGNORECASE)
_SECRET_ENV = re.compile(r"(TOKEN|API_KEY|APIKEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?|ACCESS_KEY)$|^HF_TOKEN", re.I)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@", re.IGNORECASE)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")

# compile.target -> the distributions its engine is (what a reader needs to reproduce a build or a run).
ENGINE_PACKAGES: dict[str, tuple[str, ...]] = {
    "transformers": (),
    "onnxruntime": ("onnxruntime", "onnxruntime-genai", "onnx"),
    "gguf": ("gguf", "llama-cpp-python"),
    "lmdeploy-pytorch": ("lmdeploy",),
    "turbomind": ("lmdeploy",),
    "tensorrt-llm": ("tensorrt_llm",),
    "vllm": ("vllm",),
    "sglang": ("sglang",),
}
QUANTIZER_PACKAGES: dict[str, tuple[str, ...]] = {"bnb-nf4": ("bitsandbytes",), "bnb-int8": ("bitsandbytes",)}


# ----------------------------------------------------------------------------------------------- secrets


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they are secrets (8+ characters, longest first)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV.search(k) and v and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def scrub_text(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with secret environment values and URL credentials replaced by the mask."""
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def scrub_values(data: Any, environ: dict[str, str] | None = None) -> Any:
    """A copy of JSON-like ``data`` with secret environment values and URL credentials masked in every string
    (by value only: no key is judged, so metrics such as ``time_to_first_token`` stay as they are)."""
    if isinstance(data, dict):
        return {k: scrub_values(v, environ) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [scrub_values(v, environ) for v in data]
    return scrub_text(data, environ) if isinstance(data, str) else data


def is_secret_key(key: str) -> bool:
    """Whether a field name says its value is a secret (``hf_token``, ``api_key``; not ``max_tokens``)."""
    return bool(_SECRET_KEY.search(key)) and not _NOT_SECRET_KEY.search(key)


def redact(data: Any, environ: dict[str, str] | None = None) -> Any:
    """A copy of ``data`` with every secret masked (see the module docstring)."""
    secrets = secret_values(environ)

    def walk(value: Any, key: str = "") -> Any:
        if _is_secret_str(value):
            return MASK
        if isinstance(value, dict):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, key) for v in value]
        if key and is_secret_key(key) and value not in (None, "", False):
            return MASK
        if isinstance(value, str):
            for s in secrets:
                value = value.replace(s, MASK)
            return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", value)
        return value

    return walk(data)


def _is_secret_str(value: Any) -> bool:
    return type(value).__name__ == "SecretStr" and hasattr(value, "get_secret_value")


# ----------------------------------------------------------------------------------------------- local paths


def portable(data: Any) -> Any:
    """A copy of ``data`` whose absolute local paths are replaced by ``<local>/<last part>``."""
    if isinstance(data, dict):
        return {k: portable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [portable(v) for v in data]
    if isinstance(data, Path):
        data = str(data)
    if isinstance(data, str) and _is_local_path(data):
        return f"<local>/{Path(data).name}"
    return data


def _is_local_path(text: str) -> bool:
    if "\n" in text or "://" in text:
        return False
    return text.startswith(("/", "~")) or bool(re.match(r"^[A-Za-z]:[\\/]", text))


# ----------------------------------------------------------------------------------------------- calibration


def calibration_hash(path: Path, tensor: str = "input_ids") -> dict[str, Any]:
    """sha256 of the token tensor's bytes in a safetensors file (header parsed here; torch not needed)."""
    from pipeline.artifacts import sha256_file

    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        entry = header[tensor]
        start, end = entry["data_offsets"]
        f.seek(8 + n + start)
        h = hashlib.sha256()
        left = end - start
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return {"file": path.name, "tensor": tensor, "dtype": entry["dtype"], "shape": entry["shape"],
            "sha256_tokens": h.hexdigest(), "sha256_file": sha256_file(path)}


# ----------------------------------------------------------------------------------------------- source model


def resolve_source(folder: Path, origin: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """The source record of a checked model folder: id, kind, revision asked for, resolved commit, fingerprint."""
    folder = Path(folder)
    fingerprint = hashlib.sha256(
        json.dumps([[f["path"], f["sha256"]] for f in files], sort_keys=True).encode()).hexdigest()
    if origin.get("kind") == "hub":
        commit, why = _hub_snapshot_commit(folder)
        return {"id": origin.get("repo_id"), "kind": "hub", "revision": origin.get("revision"), "commit": commit,
                "commit_why": why, "fingerprint": fingerprint}
    commit, why = _hub_snapshot_commit(folder)
    source = "hub cache"
    if commit is None:
        commit, why = _git_commit(folder)
        source = "git"
    record = {"id": folder.name, "kind": "local", "revision": None, "commit": commit, "commit_why": why,
              "fingerprint": fingerprint}
    if commit is not None:
        record["commit_from"] = source
    return record


def _hub_snapshot_commit(folder: Path) -> tuple[str | None, str]:
    """A hub cache snapshot lives in ``.../snapshots/<commit>/``: that folder name is the resolved commit."""
    resolved = folder.resolve()
    for part in (folder, resolved):
        if part.parent.name == "snapshots" and _HEX40.match(part.name):
            return part.name, "the hub cache snapshot folder's name"
    return None, "not a hub cache snapshot folder"


def _git_commit(folder: Path) -> tuple[str | None, str]:
    """HEAD of the git checkout holding ``folder``, and whether the folder differs from it."""
    if shutil.which("git") is None:
        return None, "git is not installed, so the folder's commit cannot be read"
    try:
        top = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0:
            return None, ("a local folder that is neither a hub cache snapshot nor inside a git checkout: "
                          "the fingerprint (sha256 of every file) identifies it")
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"git could not be asked ({e})"
    commit = top.stdout.strip()
    if dirty.returncode == 0 and dirty.stdout.strip():
        return commit, "HEAD of the git checkout holding the folder, which has uncommitted changes there"
    return commit, "HEAD of the git checkout holding the folder (no uncommitted changes in it)"


def source_facts(model_json: dict[str, Any]) -> dict[str, Any] | None:
    """The source record stored in a download artifact's ``model.json`` (None for one written before it had one)."""
    return model_json.get("source")


# ----------------------------------------------------------------------------------------------- environment


def environment(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """The project, Python, platform, tool versions (torch, transformers, ... and ``packages``) and CUDA facts."""
    from pipeline.plan import tool_versions

    return {"quantship": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "tools": tool_versions(extra=packages), "cuda": cuda_facts()}


@functools.lru_cache(maxsize=1)
def cuda_facts() -> dict[str, Any]:
    """CUDA as torch was built for it, the driver and the GPUs, each None with a reason when absent."""
    facts: dict[str, Any] = {"torch_cuda": _torch_cuda_version(), "driver": None, "gpus": [], "why": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
            rows = [r.split(",", 1) for r in out.stdout.strip().splitlines() if "," in r]
            if out.returncode == 0 and rows:
                facts["driver"] = rows[0][0].strip()
                facts["gpus"] = [r[1].strip() for r in rows]
                return facts
            facts["why"] = f"nvidia-smi exited {out.returncode}: {out.stderr.strip()[:200]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            facts["why"] = f"nvidia-smi failed: {e}"
    try:
        import pynvml  # optional

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        facts["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        facts["gpus"] = [_decode(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
                         for i in range(pynvml.nvmlDeviceGetCount())]
        facts["why"] = None
    except Exception as e:  # absent package or no driver: both mean 'no NVIDIA driver here'
        facts["why"] = facts["why"] or ("no NVIDIA driver here (no nvidia-smi, pynvml "
                                        f"{'absent' if isinstance(e, ImportError) else f'failed: {e}'})")
    return facts


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _torch_cuda_version() -> str | None:
    """``torch.version.cuda`` without importing torch when it is not loaded yet (torch/version.py is plain)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return getattr(getattr(torch, "version", None), "cuda", None)
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        version_py = Path(location) / "version.py"
        if version_py.is_file():
            m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", version_py.read_text(), re.MULTILINE)
            return m.group(1) if m else None
    return None


def stage_packages(kind: str, config: dict[str, Any]) -> tuple[str, ...]:
    """Distributions a stage run's output depends on beyond the base tools (see ``plan._TOOLS``)."""
    if kind == "quantize":
        return QUANTIZER_PACKAGES.get(config.get("method", ""), ())
    if kind in ("compile", "serve"):
        target = config.get("target")
        return ENGINE_PACKAGES.get(target, ()) if target else ()
    if kind == "evaluate" and config.get("tasks"):
        return ("lm_eval",)
    return ()


# ----------------------------------------------------------------------------------------------- manifests


def manifest_facts(plan: Any, run: Any, out: Path) -> dict[str, Any]:
    """The provenance fields of a stage run's manifest; ``out`` is the folder the run wrote (not yet renamed)."""
    from pipeline.artifacts import CALIB_TOKENS, MODEL_LINK

    def folder_of(run_id: str) -> Path:
        return Path(out) if run_id == run.id else plan.run(run_id).dir

    lineage = _lineage(plan, run)
    source = calibration = None
    for r in lineage:
        if r.kind == "download":
            try:
                source = source_facts(json.loads((folder_of(r.id) / MODEL_LINK).read_text()))
            except (OSError, ValueError):
                source = None
        if r.kind == "calibrate" and (folder_of(r.id) / CALIB_TOKENS).is_file():
            calibration = calibration_hash(folder_of(r.id) / CALIB_TOKENS)
    recipe = plan.recipe.variants[run.variants[0]]
    packages = set(stage_packages(run.kind, run.config))
    for r in lineage:  # the engine of the compile an evaluation or serve run reads counts too
        if r.kind in ("quantize", "compile"):
            packages.update(stage_packages(r.kind, r.config))
    return {
        "recipe": portable(redact(recipe.model_dump(mode="python"))),
        "recipe_file": Path(str(plan.recipe.path)).name,
        "source": source,
        "calibration": calibration,
        "environment": environment(tuple(sorted(packages))),
    }


def _lineage(plan: Any, run: Any) -> list[Any]:
    """``run`` and every run it reads, directly or not (each once, upstream first)."""
    seen: dict[str, Any] = {}

    def visit(r: Any) -> None:
        for dep in r.deps.values():
            if dep not in seen:
                visit(plan.run(dep))
        seen[r.id] = r

    visit(run)
    return list(seen.values())
