"""Request accounting for the embedded server: Prometheus metrics, the body-size cap and the request log.

:class:`ServerMetrics` holds one ``prometheus_client`` registry per app (two apps in one process, as in the
tests, do not collide): requests by route and status, prompt and generated tokens, time to first token and
request latency histograms, requests refused at the queue caps, and the scheduler's queue depth, queued tokens
and batch size as gauges read at scrape time.

:class:`RequestGuard` is a plain ASGI middleware (no ``BaseHTTPMiddleware``, which would buffer streamed
responses and hide client disconnects): it refuses a body over ``max_body_bytes`` with a 413 before the app
parses it (from ``Content-Length``, or while reading a chunked body), counts every response's status, and logs
one line per request: method, path, status, seconds. Headers (so the API key) and bodies (so the prompt) never
reach this log; the app logs prompt text only when asked to (``create_app(..., log_prompts=True)``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

log = logging.getLogger("pipeline.serve.requests")

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(
        self,
        queue_depth: Callable[[], float],
        batch_size: Callable[[], float],
        queued_tokens: Callable[[], float] = lambda: 0,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("quantship_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter("quantship_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("quantship_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("quantship_time_to_first_token_seconds", "Seconds from submit to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("quantship_request_latency_seconds", "Seconds from request to last token.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        Gauge("quantship_queue_depth", "Sequences waiting to join the batch.", registry=r).set_function(queue_depth)
        Gauge("quantship_batch_size", "Sequences in the running batch.", registry=r).set_function(batch_size)
        Gauge("quantship_queued_tokens", "Tokens (prompt + max_tokens) reserved by waiting sequences.",
              registry=r).set_function(queued_tokens)  # fmt: skip
        self.rejected = Counter("quantship_rejected_requests", "Requests refused at the queue caps (429), by code.",
                                ["code"], registry=r)  # fmt: skip

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _error_body(message: str, code: str) -> bytes:
    err = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return json.dumps({"error": err}).encode()


class _TooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware: body cap (413), status counting, one log line per request (module docstring)."""

    def __init__(self, app: Any, metrics: ServerMetrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        state = {"status": 500, "started": False}

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise _TooLarge
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive)
                receive = self._replay(body, receive)
            await self.app(scope, receive, counted_send)
        except _TooLarge:
            if not state["started"]:
                await self._too_large(counted_send)
        finally:
            status = state["status"]
            self.metrics.requests.labels(route, str(status)).inc()
            log.info("%s %s %d %.3f s", scope.get("method"), route, status, time.perf_counter() - t0)

    async def _read_body(self, receive: Any) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the client's disconnect, as without buffering

        return replay

    async def _too_large(self, send: Any) -> None:
        body = _error_body(
            f"The request body is larger than this server's limit of {self.max_body_bytes} bytes. Send a smaller "
            "request, or start the server with a larger body limit.",
            "request_too_large",
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
