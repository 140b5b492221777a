"""`pipeline serve RECIPE_OR_DIR`: which artifact a recipe resolves to, under which model id, the errors (exact
messages and exit codes) through click's CliRunner, and one real process stopped by SIGTERM mid-request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import TINY_MODEL, write_recipe

RECIPE = """\
name: tiny
model:
  source: {model}
quantize:
  method: rtn
  w_bits: 4
  w_group_size: 128
compile:
  target: transformers
  device: cpu
matrix:
  quantize.method: [none, rtn]
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A recipe with variants none and rtn, run to the end (download, quantize, compile) in a tmp outputs root."""
    tmp = tmp_path_factory.mktemp("serve-cli")
    recipe = write_recipe(tmp, RECIPE)
    out = tmp / "outputs"
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return recipe, out


@pytest.fixture
def captured(monkeypatch):
    """Replace the blocking uvicorn loop: record the app, call on_ready with a fixed URL, return at once."""
    seen = {}

    def fake_serve_forever(app, host="127.0.0.1", port=8000, on_ready=None, **kw):
        seen.update(app=app, host=host, port=port)
        on_ready(f"http://{host}:{port}")

    monkeypatch.setattr("pipeline.serve.server.serve_forever", fake_serve_forever)
    return seen


def _served_ids(app) -> list[str]:
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        r = client.get("/v1/models", headers={"Authorization": "Bearer k-123"})
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def test_recipe_not_run_yet_names_the_command_to_run(tmp_path):
    recipe = write_recipe(tmp_path, RECIPE)
    res = CliRunner().invoke(main, ["serve", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1
    compile_dirs = list((tmp_path / "out").glob("*"))
    assert compile_dirs == []  # serving never runs a stage
    assert res.output.startswith(f"error: Variant 'rtn' of {recipe} has no finished compile artifact under ")
    assert f"run `pipeline run {recipe}` first with the same -o/--output-dir, then serve it." in res.output


def test_unknown_variant_is_a_usage_error(tmp_path):
    recipe = write_recipe(tmp_path, RECIPE)
    res = CliRunner().invoke(main, ["serve", str(recipe), "--variant", "gptq"])
    assert res.exit_code == 2
    assert res.output == f"error: --variant gptq: {recipe} has no such variant; its variants: none, rtn.\n"


def test_variant_with_a_folder_is_a_usage_error():
    res = CliRunner().invoke(main, ["serve", str(TINY_MODEL), "--variant", "rtn"])
    assert res.exit_code == 2
    assert res.output == (f"error: --variant rtn: {TINY_MODEL} is a folder, not a recipe; --variant picks a variant "
                          "of a recipe file. Pass the recipe, or leave --variant out.\n")


def test_a_file_that_is_not_a_recipe_is_a_usage_error(tmp_path):
    bad = tmp_path / "notes.yaml"
    bad.write_text("hello: [1, 2\n")
    res = CliRunner().invoke(main, ["serve", str(bad)])
    assert res.exit_code == 2 and res.output.startswith("error: ")


def test_missing_path_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["serve", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_recipe_serves_its_first_quantized_variant_as_recipe_dash_variant(finished_run, captured):
    recipe, out = finished_run
    res = CliRunner().invoke(main, ["serve", str(recipe), "-o", str(out), "--port", "8123"],
                             env={"QUANTSHIP_API_KEY": "k-123"})
    assert res.exit_code == 0, res.output
    assert captured["host"] == "127.0.0.1" and captured["port"] == 8123  # loopback unless --host
    assert _served_ids(captured["app"]) == ["tiny-rtn"]
    lines = res.output.splitlines()
    assert "serving 'tiny-rtn' at http://127.0.0.1:8123/v1 (OpenAI API; Ctrl-C or SIGTERM stops it)" in lines
    assert ('  curl http://127.0.0.1:8123/v1/chat/completions -H "Content-Type: application/json" '
            '-H "Authorization: Bearer $QUANTSHIP_API_KEY" -d \'{"model": "tiny-rtn", "messages": [{"role": "user", '
            '"content": "Hello!"}], "max_tokens": 32}\'') in lines
    assert "k-123" not in res.output


def test_variant_and_model_name_options(finished_run, captured):
    recipe, out = finished_run
    res = CliRunner().invoke(main, ["serve", str(recipe), "-o", str(out), "--variant", "none", "--api-key", "k-123"])
    assert res.exit_code == 0, res.output
    assert _served_ids(captured["app"]) == ["tiny-none"]
    res = CliRunner().invoke(main, ["serve", str(recipe), "-o", str(out), "--model-name", "my-model", "--host",
                                    "0.0.0.0", "--api-key", "k-123"])
    assert res.exit_code == 0, res.output
    assert captured["host"] == "0.0.0.0" and _served_ids(captured["app"]) == ["my-model"]
    assert "k-123" not in res.output


def test_no_key_means_no_authorization_header_in_the_example(captured, monkeypatch):
    monkeypatch.delenv("QUANTSHIP_API_KEY", raising=False)
    res = CliRunner().invoke(main, ["serve", str(TINY_MODEL)])
    assert res.exit_code == 0, res.output
    assert "serving 'tiny-llama-pydocs' at http://127.0.0.1:8000/v1" in res.output
    assert "Authorization" not in res.output


def test_a_compile_artifact_folder_is_served_under_its_engine_json_name(finished_run, captured):
    recipe, out = finished_run
    from pipeline.plan import make_plan
    from pipeline.recipe_load import load_recipe

    plan = make_plan(load_recipe(recipe), out)
    artifact = plan.run(plan.variant_runs["rtn"]["compile"]).dir
    res = CliRunner().invoke(main, ["serve", str(artifact), "--api-key", "k-123"])
    assert res.exit_code == 0, res.output
    assert _served_ids(captured["app"]) == ["tiny-rtn"]  # compile wrote model_name into engine.json


def _start(args, env):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if line.startswith("serving '"):
            return proc, line.split(" at ", 1)[1].split("/v1", 1)[0], out
    proc.kill()
    raise AssertionError("server never announced itself:\n" + "".join(out))


@pytest.mark.slow
def test_sigterm_mid_request_shuts_down_cleanly(tmp_path):
    env = {**os.environ, "QUANTSHIP_API_KEY": "test-key", "PYTHONUNBUFFERED": "1"}
    proc, base, out = _start([str(TINY_MODEL), "--port", "0"], env)
    try:
        assert base.startswith("http://127.0.0.1:")
        headers = {"Authorization": "Bearer test-key"}
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        result = {}

        def long_request():  # in flight when SIGTERM arrives
            try:
                r = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=60, json={
                    "model": "tiny-llama-pydocs", "max_tokens": 400, "temperature": 0,
                    "messages": [{"role": "user", "content": "Explain Python's list type."}]})
                result["status"] = r.status_code
                result["body"] = r.json()
            except httpx.HTTPError as e:
                result["error"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out) + rest
    assert proc.returncode == 0, text
    assert not t.is_alive()
    # finished within the graceful timeout (200), or cancelled after it with an OpenAI error body (503)
    assert result.get("status") == 200 or (
        result.get("status") == 503 and result["body"]["error"]["code"] == "server_shutting_down"), result
    assert took < 30, f"shutdown took {took:.1f} s"
    with pytest.raises(httpx.ConnectError):  # the port is closed
        httpx.get(f"{base}/health", timeout=2)
    assert "test-key" not in text


def test_run_with_keep_running_serves_the_last_such_variant_under_its_id(tmp_path, captured, monkeypatch):
    monkeypatch.setenv("SERVE_KEY", "k-123")
    recipe = write_recipe(tmp_path, RECIPE + "serve:\n  max_tokens: 2\n  keep_running: true\n"
                          "  api_key: ${{SERVE_KEY}}\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert _served_ids(captured["app"]) == ["tiny-rtn"]
    assert captured["port"] == 8000  # serve.port 0 (a free port for the smoke test) keeps serving on 8000
    assert "serving 'tiny-rtn' at http://127.0.0.1:8000/v1" in res.output
    assert '-H "Authorization: Bearer $QUANTSHIP_API_KEY"' in res.output and "k-123" not in res.output
