"""The health poll sends the server's API key (issue 9/10 follow-up): a server whose health route is an API route
that wants the key (llama-cpp-python's server is polled on ``/v1/models``) becomes healthy when started with
``serve.api_key``, instead of answering 401 until the timeout. The key is never in an error or a log."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.engines.base import ServeCommand
from pipeline.errors import StageError
from pipeline.serve.external import ExternalServer, free_port
from pipeline.serve.server import wait_healthy

KEY = "health-key-not-secret-0123"

# A stand-in for an engine's server: /v1/models answers 200 only with "Authorization: Bearer $API_KEY" (as
# llama_cpp.server does), 401 otherwise; every request's verdict goes to its log (stdout).
STAND_IN = r"""
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

KEY = os.environ.get("API_KEY")

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/v1/models" and (not KEY or self.headers.get("Authorization") == "Bearer " + KEY)
        body = b'{"object": "list", "data": []}' if ok else b'{"error": "invalid api key"}'
        print("GET", self.path, "authorized" if ok else "refused", flush=True)
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _stand_in(api_key: str | None) -> ServeCommand:
    port = free_port()
    return ServeCommand([sys.executable, "-c", STAND_IN, str(port)], f"http://127.0.0.1:{port}", "/v1/models",
                        {"API_KEY": api_key} if api_key else {}, "stand-in")


def test_external_server_health_poll_sends_the_key(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    command = _stand_in(KEY)
    log = tmp_path / "server.log"
    with ExternalServer(command, log, KEY) as server:
        assert server.wait_healthy(20, interval_s=0.1) < 20
        # the same server polled without the key: 401 until the timeout, and the error says why
        with pytest.raises(StageError) as err:
            wait_healthy(command.base_url, 0.3, 0.1, health_path="/v1/models")
    assert "(last: HTTP 401 (the health route wants an API key" in str(err.value)
    lines = log.read_text().splitlines()
    assert lines[0] == "GET /v1/models authorized" and lines[-1] == "GET /v1/models refused"
    assert KEY not in caplog.text and KEY not in str(err.value) and KEY not in " ".join(command.argv)


def test_running_server_with_a_key_is_healthy(tmp_path):
    """The serve stage's path (``running_server`` with an engine command and ``serve.api_key``)."""
    from pipeline.stages.serve import running_server

    command = _stand_in(KEY)
    with running_server(tmp_path, command, "127.0.0.1", 0, KEY, tmp_path / "server.log", 20,
                        model_name="stand-in") as ep:
        assert ep.url == command.base_url and ep.waited_s < 20


def test_a_wrong_key_times_out_naming_http_401_only(tmp_path):
    command = _stand_in(KEY)
    with ExternalServer(command, tmp_path / "server.log", "wrong-key-xyz") as server:
        with pytest.raises(StageError) as err:
            server.wait_healthy(0.5, interval_s=0.1)
    assert "(last: HTTP 401)" in str(err.value) and "wrong-key-xyz" not in str(err.value)


def _llama_cpp_server() -> str | None:
    import importlib.util

    missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    return f"llama-cpp-python's server is not installed ({', '.join(missing)})" if missing else None


@pytest.mark.skipif(_llama_cpp_server() is not None, reason=str(_llama_cpp_server()))
def test_gguf_llama_cpp_python_server_with_a_key(tmp_path, monkeypatch):
    """The real gguf target through llama-cpp-python's server with an API key: healthy (its /v1/models answers
    the poll's key), and the smoke test's chat request, with the key, is answered."""
    from types import SimpleNamespace

    from pipeline.engines import gguf_engine
    from pipeline.engines.base import BuildContext
    from pipeline.formats.detect import detect_format
    from pipeline.quant.rtn import quantize_checkpoint_rtn
    from pipeline.serve.server import smoke_test
    from pipeline.stages.serve import running_server
    from tests.conftest import TINY_MODEL

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # llama-cpp-python's server, not llama-server
    src, art = tmp_path / "q", tmp_path / "art"
    quantize_checkpoint_rtn(TINY_MODEL, src, bits=4, group_size=128, sym=False)
    art.mkdir()
    cfg = SimpleNamespace(session_len=None, max_batch_size=8)
    gguf_engine.build(BuildContext(src=src, fmt=detect_format(src), cfg=cfg, out=art, device="cpu", model_name="tiny"))
    command = gguf_engine.serve_command(art, "127.0.0.1", free_port(), KEY, "tiny")
    assert command.health_path == "/v1/models" and KEY not in command.argv
    with running_server(art, command, "127.0.0.1", 0, KEY, tmp_path / "server.log", 60, model_name="tiny") as ep:
        reply = smoke_test(ep.url, "tiny", KEY, "Hello", 4)
    assert reply["usage"]["completion_tokens"] >= 1
    assert KEY not in Path(tmp_path / "server.log").read_text()
