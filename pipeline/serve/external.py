"""An engine's own OpenAI-compatible server (``lmdeploy serve api_server``, ``trtllm-serve``, ``vllm serve``,
``llama-server``) as a child process: started in its own process group with its output in a log file, polled
for health (failing fast when the process dies), stopped with SIGTERM and then SIGKILL.

Why by hand: ``subprocess`` does the work; what is ours is only the policy (a process group so the engine's
workers die with it, a log tail in every error, secrets only in the environment).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

from pipeline.errors import StageError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now (the engine binds it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ExternalServer:
    """A server process started from a ``ServeCommand`` (pipeline/engines/base.py)."""

    def __init__(self, command, log_path: Path, api_key: str | None = None) -> None:
        self.command = command
        self.log_path = Path(log_path)
        self._api_key = api_key  # the key the server was started with: the health poll sends it (never logged)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.command.base_url

    def start(self) -> ExternalServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        env = {**os.environ, **self.command.env}
        log.info("starting %s (log: %s)", self.command.shell(), self.log_path)
        try:
            self.proc = subprocess.Popen(self.command.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        except OSError as e:
            raise StageError(f"Could not start {self.command.argv[0]!r}: {e}. Is the engine installed and on PATH?") from e
        finally:
            out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_healthy(self, timeout_s: float, interval_s: float = 0.5) -> float:
        """Poll ``base_url + health_path`` until 200 (with ``Authorization: Bearer <key>`` when the server was
        given a key); fail fast if the process exits. Returns seconds waited."""
        from pipeline.serve.server import wait_healthy

        def still_running() -> None:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise StageError(f"{self.command.argv[0]} exited with code {code} before it was healthy. "
                                 f"Last lines of {self.log_path}:\n{self.log_tail()}")

        return wait_healthy(
            self.command.base_url, timeout_s, interval_s, health_path=self.command.health_path, check=still_running,
            hint=lambda: f"Raise serve.health_timeout_s for a large model. Last lines of {self.log_path}:\n"
                         f"{self.log_tail()}",
            api_key=self._api_key,
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout_s``."""
        if not self.alive():
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> ExternalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
