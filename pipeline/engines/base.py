"""The contract every compile target implements, and what the targets share.

A target is one module under ``pipeline/engines/`` named in ``pipeline/targets.py``. The stages call only
these module-level functions; no stage imports a vendor package:

``available(device: str) -> Availability``
    Whether this machine can *run* the engine (the artifact is always built), and if not, why: missing
    package, no CUDA, CUDA major version, no NPU. Cheap: package metadata, not vendor imports, where possible.
``build(ctx: BuildContext) -> dict``
    Writes the artifact into ``ctx.out`` (a temporary folder the runner renames into place): the folder the
    engine reads under ``ctx.out / ARTIFACT_MODEL`` (weights hard-linked from the quantized folder where the
    layout is already the engine's, converted where not; tokenizer, chat template and generation config
    beside them), the engine's own config files, all referenced relatively. Returns metrics (file names,
    settings) that go into ``engine.json``'s ``build`` and the manifest.
``serve_command(artifact: Path, host: str, port: int, api_key: str | None, model_name: str) -> ServeCommand | None``
    The argv of the engine's own OpenAI-compatible server, the environment it needs and where to poll for
    health. None for the embedded target (it is served in-process).
``check_run(artifact: Path, log) -> dict`` (optional)
    Loads the artifact in the real engine and generates a few tokens; called only when ``available`` says it
    runs here. What it returns is recorded; a failure is a failed stage.
``load(artifact: Path, device: str)`` (optional)
    ``(model, tokenizer)`` in process for evaluation: ``model(input_ids) -> logits`` ([batch, time, vocab]) as
    ``pipeline.eval.perplexity.model_logits`` calls it. Targets without one are evaluated through their server.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import link_or_copy
from pipeline.targets import FormatSettings

ARTIFACT_MODEL = "model"  # the folder the engine reads, inside a compile artifact
# What serving needs beside the weights (DESIGN.md §5, issue 7 point 9): no engine should guess a chat
# template from a folder name.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


@dataclass(frozen=True)
class Availability:
    runs: bool  # this machine can run the engine
    why: str  # what it runs on, or what is missing

    def status(self) -> str:
        return "runs here" if self.runs else f"inputs only here: {self.why}"


@dataclass
class BuildContext:
    src: Path  # the quantized (or reference) model folder
    fmt: FormatSettings  # what it declares (pipeline.formats.detect)
    cfg: Any  # the recipe's compile section (pipeline.recipe.CompileSection)
    out: Path  # the temporary artifact folder
    device: str  # compile.device with 'auto' resolved for this target
    model_name: str  # the id clients will type (served model name)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pipeline.compile"))

    @property
    def model_dir(self) -> Path:
        return self.out / ARTIFACT_MODEL


@dataclass(frozen=True)
class ServeCommand:
    argv: list[str]  # the engine's own server, e.g. ["lmdeploy", "serve", "api_server", ...]
    base_url: str  # http://host:port (OpenAI routes under /v1)
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)  # extra environment (secrets are passed here, not in argv)
    model_name: str = ""

    def shell(self) -> str:
        """The command as one line a person can paste (secrets in env are shown as $NAME, never their value)."""
        import shlex

        env = " ".join(f"{k}=${k}" for k in self.env)
        return (env + " " if env else "") + shlex.join(self.argv)


def link_model_folder(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Make ``dst`` a copy of the model folder ``src`` without copying bytes where possible: every file is
    hard-linked (same file system; artifacts are never modified in place), else copied. Returns the names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or rel.parts[0].startswith(".") or rel.name in skip:
            continue
        link_or_copy(p, dst / rel)
        names.append(rel.as_posix())
    return names


def serving_files(model_dir: Path) -> dict[str, Any]:
    """What a folder carries for serving: tokenizer files, chat template (file or tokenizer_config field),
    generation config and EOS ids. Engines read the template from here, never from a name."""
    model_dir = Path(model_dir)
    tok_cfg = _json(model_dir / "tokenizer_config.json")
    gen = _json(model_dir / "generation_config.json")
    cfg = _json(model_dir / "config.json")
    template_file = next((n for n in ("chat_template.jinja", "chat_template.json") if (model_dir / n).is_file()), None)
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    return {
        "tokenizer": [n for n in TOKENIZER_FILES if (model_dir / n).is_file()],
        "chat_template": template_file or ("tokenizer_config.json" if tok_cfg.get("chat_template") else None),
        "generation_config": (model_dir / "generation_config.json").is_file(),
        "eos_token_id": eos,
    }


def context_length(model_dir: Path) -> int | None:
    """The model's ``max_position_embeddings`` (top level, or ``text_config``/``llm_config`` of multimodal
    folders), or None when the config names none."""
    from pipeline.formats.checkpoint import read_config

    config = read_config(Path(model_dir))
    for c in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        if c.get("max_position_embeddings"):
            return int(c["max_position_embeddings"])
    return None


def chat_template_text(model_dir: Path) -> str | None:
    """The chat template a folder carries (``chat_template.jinja``, or ``tokenizer_config.json``'s field)."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = _json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(tpl, list):  # named templates: the default one
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    return tpl


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def package_present(name: str) -> str | None:
    """The installed version of a package (without importing it), or None."""
    import importlib.util
    from importlib import metadata

    if importlib.util.find_spec(name) is None:
        return None
    for dist in (name, name.replace("_", "-")):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "present"


def cuda_devices() -> list[str]:
    """Names of the visible CUDA devices (empty without CUDA)."""
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
