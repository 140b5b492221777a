"""Fuzz the embedded server against its own OpenAPI schema (schemathesis): no generated request, valid or not,
may get a 5xx.

The command: ``.venv/bin/python -m pytest -q -m slow tests/test_serve_fuzz.py`` (schemathesis from the test
extra). The schema is the one FastAPI builds from the app's routes and pydantic models (``app.openapi()``, what
``GET /openapi.json`` returns when the app publishes it); requests go over HTTP to uvicorn on 127.0.0.1 with the
shipped tiny model, so the whole stack (validation, error handlers, generation, streaming) is exercised.

Bounds, so one run stays well under a minute on 2 cores: at most 30 examples per operation, derandomized (the same
examples every run), no shrinking (the failure message carries the request as curl), and generation budgets
capped at 8 tokens (set when absent) and ``n`` at 2 before a request is sent. A string
``model`` is set to the served name so that requests reach generation instead of stopping at the 404 for an
unknown model (tests/test_serve_soak.py checks that 404).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")  # the test extra; skipped (not failed) where it is missing

from hypothesis import HealthCheck, Phase, settings  # noqa: E402  (schemathesis brings hypothesis)

from tests.conftest import TINY_MODEL  # noqa: E402

MODEL = "tiny-fuzz"
MAX_TOKENS = 8
BUDGET_FIELDS = ("max_tokens", "max_completion_tokens")


@pytest.fixture(scope="module")
def server():
    from pipeline.serve.server import start_server
    from pipeline.stages.serve import build_app, stop_engine

    app = build_app(TINY_MODEL, api_key=None, model_name=MODEL)
    try:
        with start_server(app, host="127.0.0.1", port=0) as running:
            yield app, running.url
    finally:
        stop_engine(app)


@pytest.fixture(scope="module")
def api_schema(server):
    app, url = server
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.config.update(base_url=url)
    return schema


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounded(body):
    if not isinstance(body, dict):
        return body
    if all(body.get(f) is None for f in BUDGET_FIELDS):  # no budget means "up to the context" (2048 tokens here)
        body["max_tokens"] = MAX_TOKENS
    for field in BUDGET_FIELDS:
        if _number(body.get(field)) and body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if _number(body.get("n")) and body["n"] > 2:
        body["n"] = 2
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    return body


# The operations of the schema (known without starting the server: the schema does not depend on the model).
def _operations() -> list[tuple[str, str]]:
    from pipeline.serve.app import create_app

    paths = create_app(None, MODEL, None).openapi()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops]


@pytest.mark.slow
@pytest.mark.parametrize("method,path", _operations())
def test_no_generated_request_gets_a_5xx(api_schema, method, path):
    # schemathesis's own pytest loader (schema.parametrize) does not run under this pytest; its strategies drive
    # hypothesis directly instead.
    from hypothesis import given

    strategy = api_schema[path][method].as_strategy()

    @given(case=strategy)
    @settings(max_examples=30, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.body = _bounded(case.body)
        response = case.call(timeout=60)
        assert response.status_code < 500, (
            f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}\n"
            f"reproduce: {case.as_curl_command()}"
        )

    check()
