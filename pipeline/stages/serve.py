"""serve: start the compiled target's OpenAI-compatible server, wait for health, send one chat request through
the official ``openai`` client, record the reply (smoke.json), stop it.

Which server: the engine's own (``serve_command`` of the target's module: lmdeploy api_server, trtllm-serve,
vllm, llama-server) when this machine runs that engine; the embedded FastAPI server for the ``transformers``
target (and for a plain model folder). A target this machine cannot run is not served: smoke.json and the
manifest say 'not run here' and why, and the run goes on (``compile.require_run`` already failed it if asked).

``running_server`` starts either one for the length of a ``with`` block (the serve stage's smoke test, the
evaluate stage's ``eval.through: endpoint``); ``serve_artifact`` is what ``pipeline serve`` (and
``serve.keep_running``) use to keep one running;
``recipe_artifact`` finds a finished run's compile artifact for ``pipeline serve RECIPE``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import ENGINE, SMOKE, write_json
from pipeline.errors import ModelFolderError, TargetUnavailable
from pipeline.stages import StageContext
from pipeline.resources import releases_models

SERVER_LOG = "server.log"


def _model_name(engine_dir: Path) -> str:
    if (engine_dir / ENGINE).is_file():
        from pipeline.stages.compile import read_engine

        name = read_engine(engine_dir).get("model_name")
        if name:
            return name
        return engine_dir.parent.name + "/" + engine_dir.name
    return engine_dir.name


def build_app(artifact: Path, api_key: str | None, model_name: str | None = None, **limits: int | None):
    """A FastAPI app serving a compile artifact (engine.json) or a plain model folder (config.json) as
    ``model_name`` (default: the artifact's own, see ``_model_name``). ``limits``: the engine's caps
    (``max_batch_size``, ``max_batch_tokens``, ``max_queued``, ``max_queued_tokens``, as in the recipe's ``serve:``
    section); those not given keep ``GenerationEngine``'s defaults."""
    from pipeline.recipe import ENGINE_LIMITS

    from pipeline.serve.app import create_app
    from pipeline.serve.generate import GenerationEngine

    unknown = set(limits) - set(ENGINE_LIMITS)
    if unknown:
        raise TypeError(f"build_app: unknown limit(s) {', '.join(sorted(unknown))}; known: {', '.join(ENGINE_LIMITS)}")
    if (artifact / ENGINE).is_file():
        from pipeline.stages.compile import load_engine

        model, tokenizer = on_passing_thread(load_engine, artifact)
    elif (artifact / "config.json").is_file():
        from pipeline.engines.transformers_engine import load_model

        model, tokenizer = on_passing_thread(load_model, artifact)
    else:
        raise ModelFolderError(
            f"{artifact} is neither a compile artifact (with {ENGINE}) nor a model folder (with config.json); "
            "pass outputs/<recipe>/compile-<key>/ or a model folder."
        )
    name = model_name or _model_name(artifact)
    return create_app(GenerationEngine(model, tokenizer, **limits), model_name=name, api_key=api_key)


def on_passing_thread(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on a thread that ends when it returns (its exception re-raised here).

    Why the serving model is loaded this way: ATen's CPU parallelism is OpenMP, and libgomp gives every thread that
    runs a parallel region a team of its own, kept for the thread's life. Once the threads it manages outnumber the
    CPUs, libgomp cuts its spin-wait from 300,000 iterations to 1,000, so every parallel region of every team then
    sleeps and wakes through futexes. Loading on the caller's (main) thread gave that thread a team; the
    scheduler thread's team came on top of it, and on the 2-core CI machine 8 HTTP clients got 320-400 tokens/s
    where the same model loaded on a passing thread gets 570 (``bench/RESULTS.md``, the CPU regression of
    05b4b47). A passing thread's team goes with it, so the scheduler's is the only one left."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="quantship-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def stop_engine(app) -> None:
    """Stop the embedded engine's scheduler thread (after its server stopped) and let go of its model: nothing
    keeps running, and nothing keeps the weights alive. FastAPI keeps the app's route functions in module-level
    caches (``fastapi.dependencies.models``, an ``lru_cache`` of 4096 callables per process), and those functions
    close over the engine; so the stopped engine drops its model, tokenizer and scheduler here, or every server a
    long-lived process (``pipeline run``'s evaluate and serve stages) ever started would keep its weights."""
    state = getattr(app, "state", None)
    engine = getattr(state, "engine", None)
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    for name in ("model", "scheduler", "tokenizer"):
        if getattr(engine, name, None) is not None:
            setattr(engine, name, None)
    if engine is not None:
        state.engine = None


def engine_server(artifact: Path, host: str, port: int, api_key: str | None, model_name: str | None = None):
    """``(ServeCommand, None)`` for a target whose own server runs here; ``(None, None)`` for the embedded
    server; ``(None, why)`` when the target cannot be served on this machine."""
    from pipeline.serve.external import free_port
    from pipeline.stages.compile import read_engine
    from pipeline.targets import engine_module

    if not (artifact / ENGINE).is_file():
        return None, None
    engine = read_engine(artifact)
    module = engine_module(engine["target"])
    if not hasattr(module, "serve_command"):
        return None, None  # served in process by the embedded server
    availability = module.available(engine["device"])
    if not availability.runs:
        return None, f"not run here: {availability.why}"
    command = module.serve_command(artifact, host, port or free_port(host), api_key, model_name or _model_name(artifact))
    if command is None:
        return None, f"not served: {engine['engine']} has no OpenAI-compatible server"
    return command, None


@dataclass(frozen=True)
class RunningEndpoint:
    """A healthy server of a compile artifact: where it answers, who serves it, how long it took to come up."""

    url: str  # http://host:port (OpenAI routes under /v1)
    model_name: str  # the model id it serves
    served_by: str  # "embedded", or the engine server's program (argv[0])
    waited_s: float


@contextlib.contextmanager
def running_server(artifact: Path, command, host: str, port: int, api_key: str | None, log_path: Path,
                   health_timeout_s: float = 600.0, model_name: str | None = None,
                   limits: dict | None = None) -> Iterator[RunningEndpoint]:
    """The artifact's OpenAI-compatible server, healthy, for the duration of the block: the engine's own
    (``command`` from ``engine_server``, its output in ``log_path``) or, with ``command`` None, the embedded one
    in a background thread, with the engine's caps ``limits`` (``build_app``). Stopped on exit (the embedded
    engine's scheduler thread too). Used by the serve stage (smoke test) and the evaluate stage
    (``eval.through: endpoint``)."""
    from pipeline.serve.external import ExternalServer
    from pipeline.serve.server import start_server, wait_healthy

    name = model_name or _model_name(artifact)
    app = None
    if command is not None:
        server = ExternalServer(command, log_path, api_key).start()
    else:
        app = build_app(artifact, api_key, name, **(limits or {}))
        try:
            server = start_server(app, host=host, port=port)
        except BaseException:
            stop_engine(app)
            raise
    try:
        if command is not None:
            waited = server.wait_healthy(health_timeout_s)
        else:
            waited = wait_healthy(server.url, timeout_s=60, api_key=api_key)
        yield RunningEndpoint(server.url, name, command.argv[0] if command is not None else "embedded", waited)
    finally:
        server.stop()
        if app is not None:
            stop_engine(app)


@releases_models
def run(ctx: StageContext) -> dict:
    """The serve stage: the compiled artifact served on loopback and smoke-tested with the ``openai`` client."""
    from pipeline.serve.server import smoke_test

    cfg = ctx.config
    api_key = cfg.api_key.get_secret_value() if cfg.api_key else None
    artifact = ctx.inputs["compile"]
    command, why_not = engine_server(artifact, cfg.host, cfg.port, api_key)
    if why_not:
        write_json(ctx.out / SMOKE, {"status": why_not})
        ctx.log.warning("%s: %s", ctx.run_id, why_not)
        ctx.progress(2, 2, why_not)
        return {"status": why_not, "served_by": None}
    limits = cfg.engine_limits()
    if limits.get("decode") == "auto":  # a few smoke tokens never repay CUDA graphs + compile (10-20 s on an 8B)
        limits["decode"] = "eager"
    with running_server(artifact, command, cfg.host, cfg.port, api_key, ctx.out / SERVER_LOG,
                        cfg.health_timeout_s, limits=limits) as server:
        ctx.progress(1, 2, f"healthy at {server.url} after {server.waited_s:.1f} s")
        result = smoke_test(server.url, server.model_name, api_key, cfg.smoke_prompt, cfg.max_tokens)
    served_by = server.served_by
    result["status"] = "passed"
    result["served_by"] = served_by
    write_json(ctx.out / SMOKE, result)
    ctx.progress(2, 2, "smoke test passed")
    usage = result.get("usage") or {}
    return {
        "status": "passed",
        "served_by": served_by,
        "smoke_latency_s": round(result.get("latency_s", 0.0), 3),
        "completion_tokens": usage.get("completion_tokens"),
        "reply": result.get("reply", "")[:200],
    }


def recipe_artifact(loaded, output_dir: Path, variant: str | None) -> tuple[Path, str]:
    """The compile artifact of a finished run of ``loaded`` (a LoadedRecipe) and the model id to serve it as,
    ``<recipe>-<variant>``. ``variant`` None: the first quantized variant (quantize.method not none), else the
    first. Raises RecipeError for an unknown variant, StageError when that run's compile has not finished."""
    from pipeline.errors import RecipeError, StageError
    from pipeline.plan import make_plan

    names = list(loaded.variants)
    if variant is None:
        variant = next((v for v, r in loaded.variants.items() if r.quantize.method != "none"), names[0])
    elif variant not in loaded.variants:
        raise RecipeError(
            f"--variant {variant}: {loaded.path} has no such variant; its variants: {', '.join(names)}."
        )
    plan = make_plan(loaded, output_dir)
    compile_run = plan.run(plan.variant_runs[variant]["compile"])
    if not compile_run.done():
        raise StageError(
            f"Variant '{variant}' of {loaded.path} has no finished compile artifact under {plan.root} "
            f"(expected {compile_run.dir}); run `pipeline run {loaded.path}` first"
            f"{' with the same -o/--output-dir' if output_dir != Path('outputs') else ''}, then serve it."
        )
    return compile_run.dir, f"{loaded.name}-{variant}"


def serve_artifact(
    artifact: Path,
    host: str,
    port: int,
    api_key: str | None,
    model_name: str | None = None,
    on_ready: Callable[[str, str], None] | None = None,
    limits: dict | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (``pipeline serve``): the engine's own server where it runs here, else the
    embedded one with the caps ``limits`` (``build_app``). ``on_ready(url, model_name)`` is called once it
    answers."""
    import signal

    from pipeline.serve.external import ExternalServer
    from pipeline.serve.server import serve_forever

    name = model_name or _model_name(artifact)
    command, why_not = engine_server(artifact, host, port, api_key, name)
    if why_not:
        raise TargetUnavailable(f"{artifact}: {why_not}. Serve it on a machine that runs its engine.")
    if command is None:
        ready = (lambda url: on_ready(url, name)) if on_ready else None
        app = build_app(artifact, api_key, name, **(limits or {}))
        try:
            serve_forever(app, host=host, port=port, on_ready=ready)
        finally:
            stop_engine(app)
        return

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    server = ExternalServer(command, artifact.parent / f"{artifact.name}.{SERVER_LOG}", api_key).start()
    try:
        server.wait_healthy(3600)
        logging.getLogger("pipeline").info("serving %s at %s/v1 (%s)", name, server.url, command.shell())
        if on_ready:
            on_ready(server.url, name)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
