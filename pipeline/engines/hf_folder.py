"""What the targets that serve a Hugging Face folder share (TensorRT-LLM's PyTorch backend, vLLM, SGLang).

Each of them reads the model folder ``<artifact>/model`` (hard-linked from the quantized folder, or converted), the
chat template as a file (``<artifact>/chat_template.jinja``, passed on the command line so the server never guesses
one), and settings from the recipe's compile section. ``launch.json`` records those settings in the artifact, so
``serve_command`` rebuilds the argv from the artifact alone; nothing here imports a vendor package.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.engines.base import (
    ARTIFACT_MODEL, Availability, chat_template_text, context_length, cuda_devices, link_model_folder,
)
from pipeline.errors import ModelFolderError

LAUNCH = "launch.json"  # the settings serve_command reads back
CHAT_TEMPLATE = "chat_template.jinja"
API_KEY_ENV = "QUANTSHIP_API_KEY"  # where a secret travels when the engine takes it only as a flag


@dataclass(frozen=True)
class LaunchSettings:
    """The compile section's settings, resolved, as every HF-folder engine takes them."""

    tp: int
    max_seq_len: int
    max_batch_size: int
    kv_cache_fraction: float
    kv_cache: str  # 'auto' or the target's KV-cache precision
    eager: bool  # no CUDA graphs
    trust_remote_code: bool
    model_name: str
    chat_template: str | None  # file name inside the artifact
    quantization: str | None  # the engine's --quantization value (None: read from config.json)


def availability(package: str, engine: str, device: str) -> Availability:
    """Runs here when the package is installed (by metadata, no import) and a CUDA GPU is visible."""
    from pipeline.engines.base import package_present

    version = package_present(package)
    if version is None:
        return Availability(False, f"{engine} is not installed")
    if device != "cuda":
        return Availability(False, f"{engine} runs on CUDA GPUs, not on {device!r}")
    gpus = cuda_devices()
    if not gpus:
        return Availability(False, f"{engine} {version} is installed but torch sees no CUDA device")
    return Availability(True, f"{engine} {version} on {', '.join(gpus)}")


def max_seq_len(model_dir: Path, session_len: int | None) -> int:
    """``compile.session_len``, else the model's ``max_position_embeddings``."""
    if session_len:
        return int(session_len)
    value = context_length(model_dir)
    if not value:
        raise ModelFolderError(
            f"{model_dir}/config.json has no max_position_embeddings, so the engine's maximum sequence length is "
            "unknown. Set compile.session_len in the recipe."
        )
    return int(value)


def link_folder(ctx, skip: tuple[str, ...] = ()) -> list[str]:
    """Hard-link the quantized folder into ``<artifact>/model`` (all files but ``skip``). Returns the names."""
    return link_model_folder(ctx.src, ctx.model_dir, skip=skip)


def write_chat_template(ctx) -> str | None:
    """The folder's chat template as ``<artifact>/chat_template.jinja``; None when the model has none."""
    text = chat_template_text(ctx.src)
    if not text:
        ctx.log.warning("%s carries no chat template: the server will answer /v1/chat/completions with its own "
                        "default or an error; /v1/completions works", ctx.src)
        return None
    (ctx.out / CHAT_TEMPLATE).write_text(text, encoding="utf-8")
    return CHAT_TEMPLATE


def settings(ctx, quantization: str | None, kv_cache: str | None = None) -> LaunchSettings:
    """The launch settings of a build, from the compile section (``kv_cache`` overrides the recipe's spelling)."""
    cfg = ctx.cfg
    return LaunchSettings(
        tp=cfg.tp, max_seq_len=max_seq_len(ctx.src, cfg.session_len), max_batch_size=cfg.max_batch_size,
        kv_cache_fraction=cfg.kv_cache_fraction, kv_cache=kv_cache or cfg.kv_cache, eager=bool(cfg.eager),
        trust_remote_code=ctx.trust_remote_code, model_name=ctx.model_name, chat_template=write_chat_template(ctx),
        quantization=quantization,
    )


def write_launch(out: Path, s: LaunchSettings, **extra: Any) -> dict[str, Any]:
    """Record the settings in ``<artifact>/launch.json``; returns them (with ``extra``) for engine.json."""
    data = {**asdict(s), **extra}
    (Path(out) / LAUNCH).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def read_launch(artifact: Path) -> dict[str, Any]:
    """``launch.json`` of an artifact."""
    path = Path(artifact) / LAUNCH
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFolderError(
            f"{artifact} has no {LAUNCH}: it is not a compile artifact of this target (or an incomplete one). "
            "Re-run the compile stage."
        ) from None


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    """A YAML config file (keys in the given order)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def model_dir(artifact: Path) -> Path:
    return Path(artifact) / ARTIFACT_MODEL


def with_api_key_flag(argv: list[str], flag: str, api_key: str | None) -> tuple[list[str], dict[str, str]]:
    """For a server that takes its key only as a flag: run it through ``sh -c 'exec "$@" FLAG "$KEY"'`` so the
    secret travels in the environment, never in the recorded argv."""
    if not api_key:
        return argv, {}
    return ["sh", "-c", f'exec "$@" {flag} "${API_KEY_ENV}"', "sh", *argv], {API_KEY_ENV: api_key}


def build_linked(ctx, quantization: str | None, kv_cache: str | None = None) -> dict[str, Any]:
    """The whole build of an engine that reads the quantized folder as it is: hard-linked model folder, chat
    template file, ``launch.json``. Returns engine.json's ``build``."""
    files = link_folder(ctx)
    launch = write_launch(ctx.out, settings(ctx, quantization, kv_cache))
    return {"model_dir": ARTIFACT_MODEL, "files": files, "layout": "linked", "launch": launch}


def quantization_flag(fmt) -> str | None:
    """vLLM's / SGLang's ``--quantization`` for a folder (None: nothing to force, read from config.json).

    Marlin kernels for AWQ (zero points included) and symmetric GPTQ: both servers pick them automatically only when
    ``--quantization`` is unset or names them, and fall back to the slow kernels when the plain name is forced
    (vLLM ``awq_marlin.py``/``gptq_marlin.py`` ``override_quantization_method``: ``user_quant`` must be None,
    ``marlin`` or the Marlin name). GPTQ Marlin has no zero points (``TYPE_MAP`` keys ``(bits, sym=True)``), so
    asymmetric GPTQ keeps ``gptq``.
    """
    if fmt.fmt == "awq":
        return "awq_marlin"
    if fmt.fmt == "gptq":
        return "gptq_marlin" if fmt.sym is not False else "gptq"
    if fmt.fmt.startswith("ct-"):
        return "compressed-tensors"
    return {"fp8": "fp8", "bnb": "bitsandbytes"}.get(fmt.fmt)
