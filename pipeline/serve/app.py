"""The FastAPI app of the embedded OpenAI-compatible server: /health, /v1/models, /v1/chat/completions.

Every error a client can cause comes back as the OpenAI error body ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status (FastAPI's own 422 validation body is replaced by a 400 naming the field), so the
official ``openai`` client raises its usual ``BadRequestError`` / ``AuthenticationError`` / ``NotFoundError``.
Generation runs in a worker thread, so the event loop keeps answering /health while a reply is generated.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations at runtime,
# and those functions are closures inside create_app.

import hmac
import logging
import time
import uuid
from typing import Any

from pipeline.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    RequestError,
    Usage,
    validation_error,
)

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed"}


def create_app(engine: Any, model_name: str, api_key: str | None = None) -> Any:
    """The app serving ``engine`` (a :class:`~pipeline.serve.generate.GenerationEngine`) as ``model_name``.

    With ``api_key``, every ``/v1`` route needs ``Authorization: Bearer <api_key>`` (401 otherwise); ``/health``
    stays open for load balancers and ``wait_healthy``.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    created = int(time.time())
    app = FastAPI(title="quantship OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.model_name = model_name

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        err = RequestError(message, status_code=exc.status_code, code=_HTTP_CODES.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise RequestError(
                "Missing or incorrect API key. Send it as 'Authorization: Bearer <key>' (the openai client's "
                "api_key); the key is the one the server was started with.",
                status_code=401,
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=model_name, created=created)]).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest) -> dict[str, Any]:
        refused = body.unsupported()
        if refused is not None:
            raise refused
        if body.model != model_name:
            raise RequestError(
                f"The model '{body.model}' does not exist on this server; it serves '{model_name}' "
                "(see GET /v1/models).",
                status_code=404,
                param="model",
                code="model_not_found",
            )
        if ignored := body.ignored_fields():
            log.debug("ignoring request fields this server does not implement: %s", ", ".join(ignored))
        t0 = time.perf_counter()
        try:
            result = await run_in_threadpool(
                engine.chat,
                [{"role": m.role, "content": m.content} for m in body.messages],
                max_tokens=body.completion_budget(),
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                stop=body.stop,
                seed=body.seed,
            )
        except RequestError:
            raise
        except Exception as e:  # a bug or a device failure: the client gets a 500 body, the log the traceback
            log.exception("generation failed")
            raise RequestError(
                f"The server failed while generating ({type(e).__name__}); see the server log.",
                status_code=500,
                type="server_error",
            ) from e
        log.info(
            "chat completion: %d prompt + %d completion tokens, finish_reason=%s, %.3f s",
            result.prompt_tokens, result.completion_tokens, result.finish_reason, time.perf_counter() - t0,
        )  # fmt: skip
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model_name,
            choices=[
                ChatCompletionChoice(
                    message=ChatCompletionMessage(content=result.text), finish_reason=result.finish_reason
                )
            ],
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
        ).model_dump()

    return app
