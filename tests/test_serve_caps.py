"""The embedded server's caps reach its engine: ``pipeline serve --max-batch-size/--max-queued/--max-queued-tokens``
(over the recipe's ``serve:`` values), and the recipe's ``serve:`` section in the serve stage; a cap of 0 waiting
sequences answers a request that finds the batch full with a 429."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_MODEL, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _caps(engine) -> dict:
    s = engine.scheduler
    return {"max_batch_size": s.max_batch_size, "max_batch_tokens": s.max_batch_tokens, "max_queued": s.max_queued,
            "max_queued_tokens": s.max_queued_tokens}


def test_cli_flags_reach_the_engine(monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.serve import server

    seen = {}

    def fake_serve_forever(app, host, port, on_ready=None, **kw):  # build_app ran; serve nothing
        seen.update(_caps(app.state.engine))

    monkeypatch.setattr(server, "serve_forever", fake_serve_forever)
    res = CliRunner().invoke(main, ["serve", str(TINY_MODEL), "--port", "0", "--max-batch-size", "3",
                                    "--max-queued", "0", "--max-queued-tokens", "50"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert seen == {"max_batch_size": 3, "max_batch_tokens": 65536, "max_queued": 0, "max_queued_tokens": 50}
    seen.clear()
    res = CliRunner().invoke(main, ["serve", str(TINY_MODEL), "--port", "0"], catch_exceptions=False)
    assert seen == {"max_batch_size": 16, "max_batch_tokens": 65536, "max_queued": 256, "max_queued_tokens": None}
    res = CliRunner().invoke(main, ["serve", str(TINY_MODEL), "--max-queued", "-1"])
    assert res.exit_code == 2 and "--max-queued" in res.output


def test_recipe_serve_section_reaches_the_serve_stage_engine(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.stages import serve as serve_stage

    seen = {}
    build_app = serve_stage.build_app

    def recording_build_app(*args, **kwargs):
        app = build_app(*args, **kwargs)
        seen.update(_caps(app.state.engine))
        return app

    monkeypatch.setattr(serve_stage, "build_app", recording_build_app)
    recipe = write_recipe(tmp_path, """\
name: caps
model: {{source: {model}}}
quantize: {{method: none}}
compile: {{target: transformers, device: cpu}}
serve: {{max_tokens: 2, max_batch_size: 2, max_batch_tokens: 4096, max_queued: 1, max_queued_tokens: 300}}
""")
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert seen == {"max_batch_size": 2, "max_batch_tokens": 4096, "max_queued": 1, "max_queued_tokens": 300}
    (smoke,) = (tmp_path / "out" / "caps").glob("serve-*/smoke.json")
    assert json.loads(smoke.read_text())["status"] == "passed"


def test_a_queue_cap_of_zero_answers_429_when_the_batch_is_full():
    """One sequence in a batch of one (a long greedy completion, streamed), no waiting room: a second request is
    refused with a 429 and an OpenAI error body while the first is still decoding."""
    import httpx

    from pipeline.serve.server import start_server
    from pipeline.stages.serve import build_app, stop_engine

    app = build_app(TINY_MODEL, None, "tiny", max_batch_size=1, max_queued=0)
    server = start_server(app)
    try:
        body = {"model": "tiny", "prompt": "def", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as first:
                lines = first.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # decoding has begun
                second = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
                rest = [line for line in lines if line.startswith("data: ")]
        assert second.status_code == 429, second.text
        assert second.json()["error"]["type"] and "waiting" in second.json()["error"]["message"]
        last = json.loads(rest[-2][6:]) if rest[-1] == "data: [DONE]" else None
        assert last is not None and last["choices"][0]["finish_reason"] == "length"  # it was still running
    finally:
        server.stop()
        stop_engine(app)
