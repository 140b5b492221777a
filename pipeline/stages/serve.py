"""serve: start the embedded OpenAI-compatible server for a compiled model, wait for health, send one chat
request through the official ``openai`` client, record the reply (smoke.json), stop it.

``serve_artifact`` is what ``pipeline serve`` (and ``serve.keep_running``) use to keep one running.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import ENGINE, SMOKE, write_json
from pipeline.errors import ModelFolderError
from pipeline.stages import StageContext


def _model_name(engine_dir: Path) -> str:
    return engine_dir.parent.name + "/" + engine_dir.name if (engine_dir / ENGINE).is_file() else engine_dir.name


def build_app(artifact: Path, api_key: str | None):
    """A FastAPI app serving a compile artifact (engine.json) or a plain model folder (config.json)."""
    from pipeline.serve.app import create_app
    from pipeline.serve.generate import GenerationEngine

    if (artifact / ENGINE).is_file():
        from pipeline.stages.compile import load_engine

        model, tokenizer = load_engine(artifact)
    elif (artifact / "config.json").is_file():
        from pipeline.engines.transformers_engine import load_model

        model, tokenizer = load_model(artifact)
    else:
        raise ModelFolderError(
            f"{artifact} is neither a compile artifact (with {ENGINE}) nor a model folder (with config.json); "
            "pass outputs/<recipe>/compile-<key>/ or a model folder."
        )
    return create_app(GenerationEngine(model, tokenizer), model_name=_model_name(artifact), api_key=api_key)


def run(ctx: StageContext) -> dict:
    from pipeline.serve.server import smoke_test, start_server, wait_healthy

    cfg = ctx.config
    api_key = cfg.api_key.get_secret_value() if cfg.api_key else None
    app = build_app(ctx.inputs["compile"], api_key)
    server = start_server(app, host=cfg.host, port=cfg.port)
    try:
        wait_healthy(server.url, timeout_s=60)
        ctx.progress(1, 2, f"healthy at {server.url}")
        result = smoke_test(server.url, _model_name(ctx.inputs["compile"]), api_key, cfg.smoke_prompt, cfg.max_tokens)
    finally:
        server.stop()
    write_json(ctx.out / SMOKE, result)
    ctx.progress(2, 2, "smoke test passed")
    usage = result.get("usage") or {}
    return {
        "smoke_latency_s": round(result.get("latency_s", 0.0), 3),
        "completion_tokens": usage.get("completion_tokens"),
        "reply": result.get("reply", "")[:200],
    }


def serve_artifact(artifact: Path, host: str, port: int, api_key: str | None) -> None:
    """Serve until interrupted (``pipeline serve``)."""
    from pipeline.serve.server import serve_forever

    serve_forever(build_app(artifact, api_key), host=host, port=port)
