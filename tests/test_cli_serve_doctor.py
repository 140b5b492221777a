"""`pipeline serve` keeps a real server running until interrupted; `pipeline doctor` reports this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import TINY_MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pipeline_serve_a_model_folder_until_sigint(tmp_path):
    port = _free_port()
    env = {**os.environ, "QUANTSHIP_API_KEY": "test-key"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", str(TINY_MODEL), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("server never became healthy")
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401  # the key is required
        import openai

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="test-key")
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "What is a tuple?"}])
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "test-key" not in out


def test_pipeline_serve_rejects_a_folder_that_is_not_a_model(tmp_path):
    res = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert res.exit_code == 1
    assert "is neither a compile artifact (with engine.json) nor a model folder (with config.json)" in res.output


def test_doctor_reports_packages_and_targets():
    res = CliRunner().invoke(main, ["doctor", "--json"])
    assert res.exit_code == 0
    facts = json.loads(res.output)
    assert facts["packages"]["torch"] and "lmdeploy" in facts["packages"] and "tensorrt_llm" in facts["packages"]
    assert facts["targets"]["transformers"]["run"] is True
    assert facts["targets"]["transformers"]["devices"]["cpu"] == {"runs": True, "why": "CPU"}
    tm = facts["targets"]["turbomind"]
    assert tm["run"] is False and tm["status"] in ("inputs only here", "not built") and tm["why"]
    table = CliRunner().invoke(main, ["doctor"])
    assert table.exit_code == 0 and "targets" in table.output and "Ascend NPU" in table.output
