"""Run an app with uvicorn (in a background thread, or blocking for ``pipeline serve``), wait for health, smoke-test.

``wait_healthy`` and ``smoke_test`` speak only HTTP, so the serve stage uses them unchanged on an engine's own
OpenAI server (``lmdeploy serve api_server``, ``trtllm-serve`` and vLLM all answer ``GET /health``).
The API key is never logged.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from pipeline.errors import StageError

log = logging.getLogger(__name__)

DEFAULT_SMOKE_PROMPT = "Write one sentence about Python."
GRACEFUL_TIMEOUT_S = 5.0  # after SIGINT/SIGTERM: how long in-flight requests may still finish before cancellation


@dataclass
class RunningServer:
    """A uvicorn server running in a daemon thread; ``stop()`` shuts it down and joins the thread."""

    host: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout_s``), close the socket, join the thread."""
        if not self._thread.is_alive():
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # a request still running: stop waiting for it
            self._server.force_exit = True
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise StageError(
                f"The server at {self.url} did not shut down within {2 * timeout_s:.0f} s; a generation is probably "
                "still running in its worker thread. It is a daemon thread and ends with the process."
            )
        log.info("server at %s stopped", self.url)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    """A bound socket for (host, port); port 0 lets the OS pick a free one."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise StageError(f"Cannot serve on host {host!r}: {e}. Use an address of this machine, e.g. 127.0.0.1.") from e
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn does: rebinding after a restart works
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise StageError(
            f"Cannot listen on {host}:{port}: {e.strerror or e}. Another process probably uses the port; choose "
            "another port, or port 0 to let the system pick a free one."
        ) from e
    return sock


def _warn_if_exposed(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: other machines can reach this server; start it with an API key unless that is meant",
            host,
        )


_SHUTDOWN_ERROR = {
    "message": "The server is shutting down and cancelled this request before it finished (it waited for in-flight "
    "requests, then stopped waiting). Retry it once the server is back.",
    "type": "server_error",
    "param": None,
    "code": "server_shutting_down",
}


class CancelOnShutdown:
    """ASGI wrapper: a request that uvicorn cancels after the graceful-shutdown timeout ends cleanly for its
    client. Before the response has started it gets a 503 with an OpenAI error body (uvicorn would send a bare
    500); a server-sent-event stream already under way gets a final ``data: {"error": ...}`` event and
    ``data: [DONE]`` (what vLLM sends when a stream fails) instead of a cut connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:  # app.state, app.openapi() ... of the wrapped app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        import asyncio
        import json

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "sse": False, "ended": False}

        async def tracked_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = dict(message.get("headers") or [])
                state["sse"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            body = json.dumps({"error": _SHUTDOWN_ERROR}).encode()
            try:
                if not state["started"]:
                    await send({"type": "http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
                elif state["sse"] and not state["ended"]:
                    await send({"type": "http.response.body", "body": b"data: " + body + b"\n\ndata: [DONE]\n\n"})
                else:
                    raise
            except (OSError, RuntimeError):  # the client is gone or the response cannot be continued
                raise asyncio.CancelledError from None
            log.info("request %s %s cancelled by shutdown", scope.get("method"), scope.get("path"))


def _uvicorn_config(app: Any, **kwargs: Any) -> Any:
    import uvicorn

    # log_config=None: keep the logging the CLI configured; access_log off: request lines carry no secrets but
    # are noise at one line per request.
    kwargs.setdefault("timeout_graceful_shutdown", GRACEFUL_TIMEOUT_S)
    return uvicorn.Config(CancelOnShutdown(app), log_config=None, access_log=False, **kwargs)


def start_server(app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 30.0) -> RunningServer:
    """Start ``app`` with uvicorn in a background thread and return once it accepts connections."""
    import uvicorn

    sock = _bind(host, port)
    _warn_if_exposed(host)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(_uvicorn_config(app))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{bound_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            sock.close()
            raise StageError(
                f"The server on {host}:{bound_port} did not start within {startup_timeout_s:.0f} s "
                f"({'its thread exited' if not thread.is_alive() else 'still starting'}); see the log above."
            )
        time.sleep(0.01)
    running = RunningServer(host=host, port=bound_port, _server=server, _thread=thread)
    log.info("serving on %s", running.url)
    return running


def serve_forever(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_ready: Callable[[str], None] | None = None,
    graceful_timeout_s: float = GRACEFUL_TIMEOUT_S,
) -> None:
    """Serve ``app`` in the foreground until SIGINT (Ctrl-C) or SIGTERM, then shut down cleanly and return.

    ``on_ready(url)`` is called once the socket accepts connections. On a signal uvicorn stops accepting, lets
    in-flight requests finish for up to ``graceful_timeout_s``, then cancels what is left (a stream ends, a
    waiting client's connection closes) and the call returns normally, so ``pipeline serve`` exits 0.
    """
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit and on_ready is not None:
                on_ready(url)

    sock = _bind(host, port)
    _warn_if_exposed(host)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    server = _Server(_uvicorn_config(app, timeout_graceful_shutdown=graceful_timeout_s))
    log.info("serving on %s (Ctrl-C to stop)", url)

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # uvicorn captures SIGINT/SIGTERM while it runs, shuts down gracefully, then re-raises the signal through
    # the handler that was there before: for SIGTERM the default one would kill the process (exit -15) after an
    # otherwise clean shutdown, so both signals end here as KeyboardInterrupt.
    previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    log.info("server stopped")


def wait_healthy(
    base_url: str,
    timeout_s: float = 60.0,
    interval_s: float = 0.2,
    *,
    health_path: str = "/health",
    check: Callable[[], None] | None = None,
    hint: Callable[[], str] = lambda: "Check the server's log; a large model may need a longer timeout.",
    api_key: str | None = None,
) -> float:
    """Poll ``GET {base_url}{health_path}`` until it answers 200; return the seconds waited. ``check`` runs before
    every poll and may raise to stop waiting (a server process that died). Raises StageError on timeout, with
    ``hint()`` (read then, so a log tail is current) at its end.

    ``api_key``: sent as ``Authorization: Bearer <key>`` with every poll, for servers whose health route is an API
    route that wants the key (llama-cpp-python's server is polled on ``/v1/models``); a server with an open
    ``/health`` ignores it. The key is never logged nor put in an error (a 401 reads "HTTP 401")."""
    import httpx

    t0 = time.monotonic()
    last = "no answer yet"
    url = f"{base_url.rstrip('/')}{health_path}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    with httpx.Client(timeout=max(interval_s, 2.0), headers=headers) as client:
        while True:
            if check is not None:
                check()
            try:
                r = client.get(url)
                if r.status_code == 200:
                    return time.monotonic() - t0
                last = f"HTTP {r.status_code}" + (
                    " (the health route wants an API key: start the server with one, the poll sends it)"
                    if r.status_code == 401 and not api_key else "")
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() - t0 > timeout_s:
                raise StageError(
                    f"The server at {base_url} did not become healthy within {timeout_s:.0f} s (last: {last}). {hint()}"
                )
            time.sleep(interval_s)


def smoke_test(
    base_url: str,
    model_name: str,
    api_key: str | None = None,
    prompt: str = DEFAULT_SMOKE_PROMPT,
    max_tokens: int = 16,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Send one chat request through the official ``openai`` client; return the request, reply, usage and latency."""
    import openai

    client = openai.OpenAI(
        base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key or "none", max_retries=0, timeout=timeout_s
    )
    request = {
        "model": model_name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    t0 = time.perf_counter()
    try:
        reply = client.chat.completions.create(**request)
    except openai.APIStatusError as e:
        raise StageError(
            f"The smoke test's chat request to {base_url} failed with HTTP {e.status_code}: {e.message}"
        ) from e
    except openai.APIError as e:  # connection refused, timeout
        raise StageError(f"The smoke test could not reach {base_url}: {e}") from e
    finally:
        client.close()
    latency_s = time.perf_counter() - t0
    choice = reply.choices[0]
    usage = reply.usage.model_dump() if reply.usage is not None else None
    if usage is None or choice.message.content is None:
        raise StageError(f"The smoke test's reply from {base_url} is malformed: {reply.model_dump_json()[:500]}")
    return {
        "base_url": base_url,
        "request": request,
        "reply": choice.message.content,
        "finish_reason": choice.finish_reason,
        "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "latency_s": round(latency_s, 4),
    }
