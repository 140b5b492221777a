"""The FastAPI app of the embedded OpenAI-compatible server.

Routes: ``GET /health`` (open), ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /metrics`` (Prometheus). Every error a client can cause comes back as the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (FastAPI's own 422 validation body is
replaced by a 400 naming the field; a body over the size cap is a 413), so the official ``openai`` client raises
its usual ``BadRequestError`` / ``AuthenticationError`` / ``NotFoundError``.

Generation: each choice is a sequence submitted to the engine's continuous batch
(:mod:`pipeline.serve.batching`); its tokens come back to the event loop through an ``asyncio.Queue``
(``loop.call_soon_threadsafe``), so the loop never waits on the model. ``stream: true`` answers with server-sent
events in OpenAI's chunk format ending with ``data: [DONE]`` (``stream_options.include_usage``: a last chunk
with the usage and no choices); with ``logprobs`` each chunk carries its tokens' log-probs (chat:
``choices[].logprobs.content``; completions: ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset``), together the same as the non-streamed reply's. Past the queue caps (``max_queued``,
``max_queued_tokens`` of the engine) a request is refused whole with a 429 and ``Retry-After``. A client that
disconnects, streaming or not, has its sequences cancelled: they leave the batch at the next step.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations at runtime,
# and those functions are closures inside create_app.

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from pipeline.serve.batching import FinishedSequence, SamplingParams, TokenLogprob
from pipeline.serve.metrics import RequestGuard, ServerMetrics
from pipeline.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    RequestError,
    Usage,
    validation_error,
)

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed"}
DEFAULT_MAX_BODY_BYTES = 1 << 20


def _server_error(what: str) -> RequestError:
    return RequestError(f"The server failed while {what}; see the server log.", status_code=500, type="server_error")


def _params(body: Any, max_tokens: int, index: int, logprobs: int | None, echo: bool) -> SamplingParams:
    seed = None if body.seed is None else body.seed + index  # n choices: different draws, still reproducible
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stops=list(body.stop or []),
        seed=seed,
        logprobs=logprobs,
        prompt_logprobs=echo,
    )


def create_app(
    engine: Any,
    model_name: str,
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_prompts: bool = False,
) -> Any:
    """The app serving ``engine`` (a :class:`~pipeline.serve.generate.GenerationEngine`) as ``model_name``.

    With ``api_key``, every route but ``/health`` needs ``Authorization: Bearer <api_key>`` (401 otherwise).
    ``max_body_bytes`` caps request bodies (413 beyond); ``log_prompts`` adds prompt text to the log.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    created = int(time.time())
    app = FastAPI(title="quantship OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.model_name = model_name
    sched = lambda: getattr(engine, "scheduler", None)  # noqa: E731
    metrics = ServerMetrics(
        queue_depth=lambda: getattr(sched(), "queue_depth", 0),
        batch_size=lambda: getattr(sched(), "batch_size", 0),
        queued_tokens=lambda: getattr(sched(), "queued_tokens", 0),
    )
    app.state.metrics = metrics
    app.add_middleware(RequestGuard, metrics=metrics, max_body_bytes=max_body_bytes)
    vocab_size = getattr(getattr(getattr(engine, "model", None), "config", None), "vocab_size", None)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {}
        return JSONResponse(exc.body(), status_code=exc.status_code, headers={**headers, **(exc.headers or {})})

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

    def check_request(body: Any) -> None:
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

    # -- generation plumbing

    def submit(jobs: list[tuple[list[int], SamplingParams]], stream: bool) -> tuple[asyncio.Queue, list[Any]]:
        """Queue every choice on the batch, or none: past the queue caps the request is a 429. The check and the
        submissions run on the event loop with no await between them, so no other request slips in. Without
        ``stream`` only the end of each choice (``done``/``error``) wakes the event loop: every token of every
        sequence of the batch was a wake-up of the loop, taking the interpreter lock from the scheduler (shipped
        tiny model, 2-core CPU, 8 clients, five interleaved pairs: 759-887 against 627-752 tok/s).
        Coalescing the streamed events to one wake-up a step measured no different (546-568 against 507-609)."""
        check = getattr(engine, "check_capacity", None)
        if check is not None:
            try:
                check(len(jobs), sum(len(prompt) + params.max_tokens for prompt, params in jobs))
            except RequestError as e:
                metrics.rejected.labels(e.code or str(e.status_code)).inc()
                raise
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        seqs = []
        for i, (prompt, params) in enumerate(jobs):
            def sink(ev: str, payload: Any, i: int = i) -> None:
                if stream or ev in ("done", "error"):
                    loop.call_soon_threadsafe(q.put_nowait, (i, ev, payload))

            seqs.append(engine.submit(prompt, params, sink))
        return q, seqs

    def record(route: str, done: FinishedSequence | None, prompt_tokens: int, t0: float) -> None:
        if done is not None:
            metrics.generation_tokens.inc(len(done.token_ids))
            if done.first_token_s is not None:
                metrics.ttft.observe(done.first_token_s)
        else:
            metrics.prompt_tokens.inc(prompt_tokens)
            metrics.latency.labels(route).observe(time.perf_counter() - t0)

    async def collect(request: Request, q: asyncio.Queue, seqs: list[Any], route: str) -> list[FinishedSequence]:
        out: dict[int, FinishedSequence] = {}
        checked = time.monotonic()
        try:
            while len(out) < len(seqs):
                if time.monotonic() - checked > 0.5:  # token events keep coming: look at the clock, not a timeout
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise RequestError("The client disconnected.", status_code=499)
                try:
                    i, ev, payload = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if ev == "done":
                    out[i] = payload
                    record(route, payload, 0, 0.0)
                elif ev == "error":
                    log.error("generation failed: %r", payload)
                    raise _server_error(f"generating ({type(payload).__name__})")
        finally:
            for s in seqs:
                s.cancel()
        return [out[i] for i in range(len(seqs))]

    async def sse(
        q: asyncio.Queue,
        seqs: list[Any],
        chunk: Any,
        first: list[dict[str, Any]],
        usage: Any,
        route: str,
        t0: float,
        echo_chunk: Any = None,
    ) -> AsyncIterator[str]:
        """Server-sent events: ``first`` chunks, a chunk per delta and per finish, the usage chunk, ``[DONE]``.

        ``chunk(i, text, finish_reason, logprobs)``: a delta carries the log-probs of the tokens chosen since the
        previous delta (they arrive as a ``logprobs`` event just before it); those of tokens that showed no text
        (EOS, a stop string) ride on the finish chunk, so the chunks' log-probs together are the non-streamed
        ones. ``echo_chunk(i, prompt_logprobs)``: the echoed prompt with its log-probs, once the prefill made them.
        """
        completion_tokens, finished = 0, 0
        pending: dict[int, list[TokenLogprob]] = {}
        try:
            for c in first:
                yield f"data: {json.dumps(c)}\n\n"
            while finished < len(seqs):
                i, ev, payload = await q.get()
                if ev == "logprobs":
                    pending.setdefault(i, []).extend(payload)
                elif ev == "prompt_logprobs":
                    if echo_chunk is not None:
                        yield f"data: {json.dumps(echo_chunk(i, payload))}\n\n"
                elif ev == "token":
                    yield f"data: {json.dumps(chunk(i, payload, None, pending.pop(i, None)))}\n\n"
                elif ev == "done":
                    finished += 1
                    completion_tokens += len(payload.token_ids)
                    record(route, payload, 0, 0.0)
                    yield f"data: {json.dumps(chunk(i, None, payload.finish_reason, pending.pop(i, None)))}\n\n"
                elif ev == "error":
                    log.error("generation failed: %r", payload)
                    yield f"data: {json.dumps(_server_error('generating').body())}\n\n"
                    break
            if usage is not None:
                yield f"data: {json.dumps(usage(completion_tokens))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also on a client disconnect (the response task is cancelled): free the batch slots
            for s in seqs:
                s.cancel()
            record(route, None, 0, t0)

    def usage_of(prompt_tokens: int, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)  # fmt: skip

    def streaming(events: AsyncIterator[str]) -> Any:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- routes

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def prometheus() -> Any:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=model_name, created=created)]).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_request(body)
        t0, route = time.perf_counter(), "/v1/chat/completions"
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        if log_prompts:
            log.info("chat messages: %r", messages)
        prompt = await run_in_threadpool(engine.encode_chat, messages)
        max_tokens = engine.check_budget(prompt, body.completion_budget(), "messages")
        k = (body.top_logprobs or 0) if body.logprobs else None
        n = body.n or 1
        q, seqs = submit([(prompt, _params(body, max_tokens, i, k, False)) for i in range(n)], bool(body.stream))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        metrics.prompt_tokens.inc(len(prompt))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}

            def chunk(i: int, delta: str | None, reason: str | None, lps: Any = None) -> dict[str, Any]:
                d = {} if delta is None else {"content": delta}
                lp = None if k is None or not lps else {"content": [chat_logprob(t, k) for t in lps]}
                return {**base, "choices": [{"index": i, "delta": d, "logprobs": lp, "finish_reason": reason}]}

            first = [{**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]} for i in range(n)]  # fmt: skip
            usage = None
            if include_usage:
                usage = lambda c: {**base, "choices": [], "usage": usage_of(len(prompt), c).model_dump()}  # noqa: E731
            return streaming(sse(q, seqs, chunk, first, usage, route, t0))
        results = await collect(request, q, seqs, route)
        record(route, None, 0, t0)
        log.info("chat completion: %d prompt + %s completion tokens, %.3f s", len(prompt),
                 [len(r.token_ids) for r in results], time.perf_counter() - t0)  # fmt: skip
        choices = [
            ChatCompletionChoice(
                index=i,
                message=ChatCompletionMessage(content=r.text),
                finish_reason=r.finish_reason,
                logprobs=None if k is None else {"content": [chat_logprob(t, k) for t in r.logprobs or []]},
            )
            for i, r in enumerate(results)
        ]
        usage = usage_of(len(prompt), sum(len(r.token_ids) for r in results))
        return ChatCompletionResponse(id=rid, created=now, model=model_name, choices=choices, usage=usage).model_dump()

    def chat_logprob(t: TokenLogprob, k: int) -> dict[str, Any]:
        def entry(token_id: int, lp: float) -> dict[str, Any]:
            text = engine.token_text(token_id)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top[:k]]}

    def encode_prompt(p: str | list[int]) -> list[int]:
        if isinstance(p, str):
            return engine.encode_text(p)
        if vocab_size is not None and any(not 0 <= i < vocab_size for i in p):
            raise RequestError(f"Token ids in the prompt must be in [0, {vocab_size}) for this model.",
                               param="prompt", code="invalid_value")  # fmt: skip
        return p

    def completion_logprobs(tokens: list[TokenLogprob], base: int) -> tuple[dict[str, Any], int]:
        """OpenAI's legacy logprobs object for ``tokens``, offsets counted from ``base``; and the offset after."""
        texts = [engine.token_text(t.token_id) for t in tokens]
        offsets, at = [], base
        for text in texts:
            offsets.append(at)
            at += len(text)
        top = [None if t.logprob is None else {engine.token_text(i): lp for i, lp in t.top} for t in tokens]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": top,
                "text_offset": offsets}, at  # fmt: skip

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_request(body)
        t0, route = time.perf_counter(), "/v1/completions"
        if log_prompts:
            log.info("completion prompt: %r", body.prompt)
        prompts = [await run_in_threadpool(encode_prompt, p) for p in body.prompts()]
        budgets = [engine.check_budget(p, body.max_tokens, "prompt") for p in prompts]
        n, echo, k = body.n or 1, bool(body.echo), body.logprobs
        jobs = [(p, _params(body, m, j, k, echo and k is not None)) for p, m in zip(prompts, budgets) for j in range(n)]
        texts = [engine.decode(p) if echo or k is not None else "" for p in prompts]  # echoed / for text_offset
        q, seqs = submit(jobs, bool(body.stream))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        metrics.prompt_tokens.inc(prompt_tokens)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            base = {"id": rid, "object": "text_completion", "created": now, "model": model_name}

            at = [0 if echo else len(texts[i // n]) for i in range(len(jobs))]  # text_offset of the next token

            def chunk(i: int, delta: str | None, reason: str | None, lps: Any = None) -> dict[str, Any]:
                lp = None
                if k is not None and lps:
                    lp, at[i] = completion_logprobs(lps, at[i])
                choice = {"index": i, "text": delta or "", "logprobs": lp, "finish_reason": reason}
                return {**base, "choices": [choice]}

            # echo: the prompt first; with logprobs, once the prefill has scored it (echo_chunk)
            scored = echo and k is not None
            first = [chunk(i, texts[i // n], None) for i in range(len(jobs)) if echo and not scored and texts[i // n]]
            echo_chunk = (lambda i, lps: chunk(i, texts[i // n], None, lps)) if scored else None
            usage = None
            if include_usage:
                usage = lambda c: {**base, "choices": [], "usage": usage_of(prompt_tokens, c).model_dump()}  # noqa
            return streaming(sse(q, seqs, chunk, first, usage, route, t0, echo_chunk))
        results = await collect(request, q, seqs, route)
        record(route, None, 0, t0)
        choices = []
        for i, r in enumerate(results):
            lps = None
            if k is not None:
                tokens = (r.prompt_logprobs or []) + (r.logprobs or []) if echo else (r.logprobs or [])
                lps = completion_logprobs(tokens, 0 if echo else len(texts[i // n]))[0]
            text = (texts[i // n] if echo else "") + r.text
            choices.append(CompletionChoice(index=i, text=text, finish_reason=r.finish_reason, logprobs=lps))
        usage = usage_of(prompt_tokens, sum(len(r.token_ids) for r in results))
        return CompletionResponse(id=rid, created=now, model=model_name, choices=choices, usage=usage).model_dump()

    return app
