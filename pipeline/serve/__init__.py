"""The embedded OpenAI-compatible server (FastAPI + uvicorn).

- ``protocol``: the OpenAI request/response/error bodies (pydantic) and ``RequestError``.
- ``generate``: ``GenerationEngine`` (chat template -> ``model.generate`` -> reply, usage, finish reason).
- ``app``: ``create_app(engine, model_name, api_key)`` -> FastAPI app (/health, /v1/models, /v1/chat/completions).
- ``server``: ``start_server`` (background thread), ``serve_forever`` (``pipeline serve``), ``wait_healthy``,
  ``smoke_test`` (one request through the official ``openai`` client).

Importing this package imports nothing heavy; import the submodules where they are needed.
"""
