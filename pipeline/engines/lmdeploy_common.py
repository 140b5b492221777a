"""What the two lmdeploy targets share: the artifact, the engine-config file, the ``lmdeploy serve api_server``
command, the chat template and the check run.

Read from lmdeploy 0.18.0 (the PyPI wheel):

- ``lmdeploy/messages.py``: ``TurbomindEngineConfig`` and ``PytorchEngineConfig`` (the field names the
  artifact's ``lmdeploy_config.json`` mirrors); ``QuantPolicy``: KV cache int4 = 4, int8 = 8, fp8 = 16
  (``TurbomindEngineConfig.__post_init__`` refuses fp8: "FP8 quantization is not supported").
- ``lmdeploy/cli/serve.py`` + ``cli/utils.py`` (``ArgumentHelper``): ``--backend pytorch|turbomind``, ``--tp``,
  ``--session-len``, ``--cache-max-entry-count``, ``--quant-policy``, ``--max-batch-size``, ``--model-format``,
  ``--device``, ``--eager-mode``, ``--server-name``, ``--server-port``, ``--model-name``, ``--chat-template``,
  ``--api-keys`` (argv only, ``nargs='*'``; no environment variable is read).
- ``lmdeploy/serve/openai/endpoints/management.py``: ``GET /health`` (``serve/utils/server_utils.py``: the
  API-key middleware skips ``/health``, so the poll needs no key).
- Chat template: ``cli/utils.get_chat_template`` takes a ChatTemplateConfig JSON file or a registered name;
  the name ``hf`` (``model.py`` ``HFChatTemplate``) applies the model folder's own template through
  ``AutoTokenizer.from_pretrained(model_path).apply_chat_template`` with ``model_path`` = the served folder.
  A JSON file would have to carry ``model_path`` itself (``ChatTemplateConfig.from_json`` does not resolve it
  against the file, and without it ``HFChatTemplate('')`` fails), and the runner renames the artifact after
  the build, so ``--chat-template hf`` is how the folder's template is made explicit: lmdeploy never guesses
  one by matching the model's name.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from pipeline.engines.base import (
    ARTIFACT_MODEL, Availability, ServeCommand, chat_template_text, context_length, cuda_devices, link_model_folder,
    package_present,
)
from pipeline.errors import ModelFolderError, StageError
from pipeline.formats.checkpoint import read_config

LMDEPLOY_VERSION = "0.18.0"  # the source the rules and flags were read from
CONFIG_FILE = "lmdeploy_config.json"  # {backend, engine_config (the EngineConfig's fields), chat_template}
API_KEY_ENV = "QUANTSHIP_LMDEPLOY_API_KEY"
HEALTH_PATH = "/health"
KV_POLICY = {"auto": 0, "int4": 4, "int8": 8, "fp8": 16}  # compile.kv_cache -> QuantPolicy
# EngineConfig field -> api_server flag (the others are spelled --field-name).
_FLAG = {"device_type": "--device"}
_ARGV_FIELDS = ("tp", "session_len", "cache_max_entry_count", "quant_policy", "max_batch_size", "model_format",
                "device_type", "eager_mode")


def lmdeploy_missing() -> str | None:
    """Why lmdeploy cannot be imported here (package metadata only), or None."""
    if package_present("lmdeploy") is None:
        return f"lmdeploy is not installed (pip install lmdeploy=={LMDEPLOY_VERSION})"
    return None


def cuda_missing() -> str | None:
    """Why there is no CUDA GPU for lmdeploy, or None."""
    return None if cuda_devices() else "torch sees no CUDA GPU"


def availability(missing: list[str | None], runs_on: str) -> Availability:
    why = [m for m in missing if m]
    return Availability(not why, "; ".join(why) if why else runs_on)


def session_len(model_dir: Path, asked: int | None) -> int | None:
    """``compile.session_len``, else the model's ``max_position_embeddings`` (text_config for VL folders)."""
    return asked or context_length(model_dir)


def engine_config(ctx, **backend_fields: Any) -> dict[str, Any]:
    """The fields of lmdeploy's EngineConfig the recipe's compile section sets (names as in messages.py)."""
    cfg = ctx.cfg
    return {
        "tp": cfg.tp,
        "session_len": session_len(ctx.src, cfg.session_len),
        "cache_max_entry_count": cfg.kv_cache_fraction,
        "quant_policy": KV_POLICY[cfg.kv_cache],
        "max_batch_size": cfg.max_batch_size,
        **backend_fields,
    }


def build_artifact(ctx, backend: str, fields: dict[str, Any], config_fixes: dict[str, Any] | None = None) -> dict:
    """Write the artifact: ``model/`` (weights hard-linked; ``config.json`` a written copy when
    ``config_fixes`` changes its ``quantization_config``) and ``lmdeploy_config.json``. Returns build metrics."""
    config = read_config(ctx.src)
    fixes = {k: v for k, v in (config_fixes or {}).items() if (config.get("quantization_config") or {}).get(k) != v}
    files = link_model_folder(ctx.src, ctx.model_dir, skip=("config.json",) if fixes else ())
    if fixes:
        config["quantization_config"] = {**config["quantization_config"], **fixes}
        (ctx.model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        files.append("config.json")
        ctx.log.info("config.json written with quantization_config fixes for lmdeploy: %s", fixes)
    template = chat_template_text(ctx.model_dir)
    if template is None:
        ctx.log.warning("%s carries no chat template: lmdeploy will pick one by matching the model, not from the "
                        "folder; add chat_template.jinja to the model folder to serve its own", ctx.src)
    settings = {
        "backend": backend,
        "lmdeploy": LMDEPLOY_VERSION,
        "engine_config": fields,
        # a registered name: HFChatTemplate applies the served folder's own template (module docstring)
        "chat_template": "hf" if template is not None else None,
    }
    (ctx.out / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return {"files": sorted(files), "engine_config_file": CONFIG_FILE, "config_fixes": fixes, **settings}


def read_settings(artifact: Path) -> dict[str, Any]:
    path = Path(artifact) / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{artifact} has no {CONFIG_FILE}: it is not an lmdeploy artifact, or it is "
                               "incomplete. Re-run the compile stage.")
    return json.loads(path.read_text(encoding="utf-8"))


def lmdeploy_prefix() -> list[str]:
    """How lmdeploy's CLI is started: its console script where installed, else ``python -m lmdeploy``."""
    import shutil

    return ["lmdeploy"] if shutil.which("lmdeploy") else [sys.executable, "-m", "lmdeploy"]


def serve_argv(artifact: Path, host: str, port: int, model_name: str) -> list[str]:
    """``lmdeploy serve api_server <artifact>/model --backend ...`` from the artifact's engine config."""
    settings = read_settings(artifact)
    argv = [*lmdeploy_prefix(), "serve", "api_server", str(Path(artifact) / ARTIFACT_MODEL),
            "--backend", settings["backend"]]
    fields = settings["engine_config"]
    for name in _ARGV_FIELDS:
        value = fields.get(name)
        flag = _FLAG.get(name, "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    if settings.get("chat_template"):
        argv += ["--chat-template", settings["chat_template"]]
    return argv + ["--server-name", host, "--server-port", str(port), "--model-name", model_name]


def serve_command(artifact: Path, host: str, port: int, api_key: str | None, model_name: str) -> ServeCommand:
    """The api_server command. lmdeploy takes API keys only as ``--api-keys`` in argv, so with a key the
    command is ``sh -c 'exec ... --api-keys "$QUANTSHIP_LMDEPLOY_API_KEY"'`` and the key travels in ``env``: it
    never lands in engine.json, a manifest or a log (``ServeCommand.shell`` shows ``$NAME``), though the
    running server's own argv holds it, as lmdeploy requires."""
    argv = serve_argv(artifact, host, port, model_name)
    base_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if not api_key:
        return ServeCommand(argv, base_url, HEALTH_PATH, {}, model_name)
    script = f'exec {shlex.join(argv)} --api-keys "${API_KEY_ENV}"'
    return ServeCommand(["sh", "-c", script], base_url, HEALTH_PATH, {API_KEY_ENV: api_key}, model_name)


def open_pipeline(artifact: Path):
    """``lmdeploy.pipeline`` on the artifact's model folder with the engine config and chat template it was
    built with. Callers' ``__main__`` needs a guard: lmdeploy spawns its workers."""
    from lmdeploy import ChatTemplateConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline

    settings = read_settings(artifact)
    model_dir = Path(artifact) / ARTIFACT_MODEL
    config_cls = PytorchEngineConfig if settings["backend"] == "pytorch" else TurbomindEngineConfig
    template = ChatTemplateConfig(settings["chat_template"], model_path=str(model_dir)) if settings.get("chat_template") else None
    return pipeline(str(model_dir), backend_config=config_cls(**settings["engine_config"]), chat_template_config=template)


def check_run(artifact: Path, log, prompt: str = "What is Python?", max_new_tokens: int = 8) -> dict:
    """Load the artifact in lmdeploy (``open_pipeline``) and answer one greedy chat turn."""
    import time

    from lmdeploy import GenerationConfig

    t0 = time.perf_counter()
    pipe = open_pipeline(artifact)
    backend = read_settings(artifact)["backend"]
    try:
        loaded = time.perf_counter() - t0
        out = pipe([prompt], gen_config=GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False))[0]
    except Exception as e:
        raise StageError(f"lmdeploy ({backend}) loaded {artifact} but failed to generate: {e}") from e
    finally:
        pipe.close()
    seconds = time.perf_counter() - t0
    log.info("lmdeploy %s answered %r in %.1f s", backend, out.text, seconds)
    return {"reply": out.text, "tokens": out.generate_token_len, "seconds": round(seconds, 2),
            "load_seconds": round(loaded, 2)}
