"""An engine's own server as a child process (pipeline/serve/external.py), exercised with a real server process:
quantship's own `python -m pipeline serve`, started exactly as an engine's server would be."""

from __future__ import annotations

import sys

import pytest

from pipeline.engines.base import ServeCommand
from pipeline.errors import StageError
from pipeline.serve.external import ExternalServer, free_port
from pipeline.serve.server import smoke_test
from tests.conftest import TINY_MODEL


def _command(port: int, key: str | None = "s3cret-key") -> ServeCommand:
    argv = [sys.executable, "-m", "pipeline", "serve", str(TINY_MODEL), "--port", str(port)]
    return ServeCommand(argv, f"http://127.0.0.1:{port}", "/health",
                        env={"QUANTSHIP_API_KEY": key} if key else {}, model_name=TINY_MODEL.name)


def test_shell_line_names_secrets_never_their_value():
    line = _command(8000).shell()
    assert line.startswith("QUANTSHIP_API_KEY=$QUANTSHIP_API_KEY ") and "s3cret-key" not in line


def test_external_server_starts_answers_the_openai_client_and_stops(tmp_path):
    port = free_port()
    server = ExternalServer(_command(port), tmp_path / "server.log")
    with server:
        waited = server.wait_healthy(timeout_s=120)
        assert waited >= 0 and server.alive()
        result = smoke_test(server.url, TINY_MODEL.name, "s3cret-key", "What is a list?", max_tokens=4)
        assert result["usage"]["completion_tokens"] >= 1
        with pytest.raises(StageError, match="HTTP 401"):  # the key travelled through the environment
            smoke_test(server.url, TINY_MODEL.name, "wrong", "Hi", max_tokens=2)
    assert not server.alive() and server.proc.returncode is not None
    assert (tmp_path / "server.log").stat().st_size > 0


def test_a_server_that_dies_before_health_fails_fast_with_its_log(tmp_path):
    cmd = ServeCommand([sys.executable, "-c", "import sys; print('engine: cannot load model'); sys.exit(3)"],
                       "http://127.0.0.1:9", "/health")
    server = ExternalServer(cmd, tmp_path / "server.log").start()
    with pytest.raises(StageError) as e:
        server.wait_healthy(timeout_s=60)
    assert "exited with code 3 before it was healthy" in str(e.value)
    assert "engine: cannot load model" in str(e.value)


def test_a_missing_engine_binary_is_a_clear_error(tmp_path):
    cmd = ServeCommand(["quantship-no-such-engine-server"], "http://127.0.0.1:9")
    with pytest.raises(StageError, match="Could not start 'quantship-no-such-engine-server'.*installed and on PATH"):
        ExternalServer(cmd, tmp_path / "server.log").start()


def test_a_server_that_never_becomes_healthy_times_out_with_its_current_log(tmp_path):
    port = free_port()
    code = "import sys, time; print('engine: still loading', flush=True); time.sleep(30)"
    server = ExternalServer(ServeCommand([sys.executable, "-c", code], f"http://127.0.0.1:{port}", "/health"),
                            tmp_path / "server.log").start()
    try:
        with pytest.raises(StageError) as e:
            server.wait_healthy(timeout_s=3, interval_s=0.2)
    finally:
        server.stop()
    assert "did not become healthy within 3 s" in str(e.value) and "serve.health_timeout_s" in str(e.value)
    assert "engine: still loading" in str(e.value)  # the log tail read at the timeout, not at the start
