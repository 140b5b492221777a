"""The embedded OpenAI-compatible server (FastAPI + uvicorn), and engines' own servers as child processes.

- ``protocol``: the OpenAI request/response/error bodies (pydantic) and ``RequestError``.
- ``batching``: the continuous-batching scheduler (one thread owns the model; requests join the running batch at
  the next step, each with its own KV cache, seeded sampler, stop strings and cancellation).
- ``generate``: ``GenerationEngine`` (chat template, context checks, the scheduler's front end).
- ``app``: ``create_app(engine, model_name, api_key)`` -> FastAPI app (/health, /metrics, /v1/models,
  /v1/completions, /v1/chat/completions; streaming by server-sent events).
- ``metrics``: the Prometheus series.
- ``server``: ``start_server`` (background thread), ``serve_forever`` (``pipeline serve``), ``wait_healthy``,
  ``smoke_test`` (one request through the official ``openai`` client).
- ``external``: an engine's own server (lmdeploy api_server, trtllm-serve, vllm, llama.cpp) as a child process.

Importing this package imports nothing heavy; import the submodules where they are needed.
"""
