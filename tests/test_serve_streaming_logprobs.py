"""Streamed replies of the embedded server against the non-streamed ones, on the shipped tiny model (fp32), through
a real uvicorn server on 127.0.0.1: log-probs in OpenAI's chunk format (chat ``logprobs.content`` with
``top_logprobs``; completions ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``, with and
without ``echo``), a stop string that spans a token boundary, ``n`` choices, ``include_usage`` and finish reasons.

Every check is exact: the chunks' log-probs put together equal the non-streamed reply's (the same floats: JSON
writes a float so that it reads back the same), one request at a time so both runs decode alone."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from pipeline.serve.app import create_app
from pipeline.serve.batching import SamplingParams
from pipeline.serve.generate import GenerationEngine
from pipeline.serve.server import start_server
from tests.conftest import load_tiny

NAME = "tiny-pydocs"
CODE = "def fibonacci(n):\n    "
CHAT = [{"role": "user", "content": "How do I reverse a list in Python?"}]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine():
    eng = GenerationEngine(*load_tiny())
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with start_server(create_app(engine, NAME)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def post(server, path, body) -> dict:
    r = httpx.post(f"{server.url}{path}", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, path, body) -> list[dict]:
    """The streamed chunks as JSON (the ``data: [DONE]`` end checked and dropped)."""
    r = httpx.post(f"{server.url}{path}", json={"model": NAME, **body, "stream": True}, timeout=60)
    assert r.status_code == 200, r.text
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def choices(chunks: list[dict], i: int = 0) -> list[dict]:
    return [c for ch in chunks for c in ch["choices"] if c["index"] == i]


def chat_stream_logprobs(chunks: list[dict], i: int = 0) -> list[dict]:
    return [t for c in choices(chunks, i) if c["logprobs"] for t in c["logprobs"]["content"]]


def completion_stream_logprobs(chunks: list[dict], i: int = 0) -> dict[str, list]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in choices(chunks, i):
        if c["logprobs"]:
            for key in out:
                out[key] += c["logprobs"][key]
    return out


# ------------------------------------------------------------------------------------- chat


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 5, "top_p": 0.9}])
def test_chat_streamed_logprobs_equal_the_non_streamed(server, sampling):
    body = {"messages": CHAT, "max_tokens": 30, "logprobs": True, "top_logprobs": 3, **sampling}
    full = post(server, "/v1/chat/completions", body)
    chunks = stream(server, "/v1/chat/completions", body)
    want = full["choices"][0]["logprobs"]["content"]
    assert len(want) == full["usage"]["completion_tokens"] and all(len(t["top_logprobs"]) == 3 for t in want)
    assert chat_stream_logprobs(chunks) == want
    text = "".join(c["delta"].get("content") or "" for c in choices(chunks))
    assert text == full["choices"][0]["message"]["content"]
    assert [c["finish_reason"] for c in choices(chunks)][-1] == full["choices"][0]["finish_reason"]
    # a chunk with text carries the log-probs of the tokens that made it; the role chunk carries none
    assert choices(chunks)[0]["logprobs"] is None
    assert all(c["logprobs"] for c in choices(chunks) if c["delta"].get("content"))


def test_chat_streamed_logprobs_through_the_openai_client(client):
    kw = dict(model=NAME, messages=CHAT, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw)
    got = [t for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
           for t in c.choices[0].logprobs.content]  # fmt: skip
    assert [t.model_dump() for t in got] == [t.model_dump() for t in full.choices[0].logprobs.content]


# ------------------------------------------------------------------------------------- completions


@pytest.mark.parametrize("echo", [False, True])
def test_completion_streamed_logprobs_equal_the_non_streamed(server, echo):
    body = {"prompt": CODE, "max_tokens": 12, "temperature": 0, "logprobs": 2, "echo": echo}
    full = post(server, "/v1/completions", body)["choices"][0]
    chunks = stream(server, "/v1/completions", body)
    assert completion_stream_logprobs(chunks) == full["logprobs"]
    assert "".join(c["text"] for c in choices(chunks)) == full["text"]
    if echo:  # the first chunk is the prompt, with its scores (the first token's null)
        first = choices(chunks)[0]
        assert first["text"] == CODE and first["logprobs"]["token_logprobs"][0] is None
        assert full["logprobs"]["text_offset"][0] == 0


def test_lm_eval_style_scoring_request_streams_the_prompt_scores(server, engine):
    ids = engine.encode_text(CODE + "return n")
    body = {"prompt": ids, "max_tokens": 0, "temperature": 0, "logprobs": 1, "echo": True}
    full = post(server, "/v1/completions", body)["choices"][0]
    got = completion_stream_logprobs(stream(server, "/v1/completions", body))
    assert got == full["logprobs"] and len(got["tokens"]) == len(ids)


# ------------------------------------------------------------------------------------- stop, n, usage, finish


def test_stop_string_across_a_token_boundary_is_cut_in_the_stream(server, engine):
    body = {"prompt": CODE, "max_tokens": 40, "temperature": 0}
    text = post(server, "/v1/completions", body)["choices"][0]["text"]
    reply_ids = engine.run(engine.encode_text(CODE), SamplingParams(max_tokens=40, temperature=0.0)).token_ids
    assert engine.decode(reply_ids).startswith(text)
    # a two-character stop: the last character of token j's text and the first of token j+1's, seen first there
    stop = None
    for j in range(2, len(reply_ids)):
        at = len(engine.decode(reply_ids[:j]))
        cand = text[at - 1 : at + 1]
        if 0 < at < len(text) and len(cand) == 2 and text.find(cand) == at - 1 and cand.strip() == cand:
            stop = cand
            break
    assert stop is not None, text
    want = text[: text.find(stop)]
    cut = post(server, "/v1/completions", {**body, "stop": [stop]})["choices"][0]
    assert cut["text"] == want and cut["finish_reason"] == "stop"
    chunks = stream(server, "/v1/completions", {**body, "stop": [stop], "logprobs": 1})
    deltas = [c["text"] for c in choices(chunks)]
    assert "".join(deltas) == want and all(stop not in d for d in deltas)
    assert [c["finish_reason"] for c in choices(chunks)][-1] == "stop"
    non_streamed = post(server, "/v1/completions", {**body, "stop": [stop], "logprobs": 1})["choices"][0]
    assert completion_stream_logprobs(chunks) == non_streamed["logprobs"]  # the stop's tokens ride on the finish


def test_n_choices_stream_their_own_replies_with_usage(server):
    for path, body in [
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 16, "temperature": 0.9, "seed": 3}),
        ("/v1/completions", {"prompt": CODE, "max_tokens": 16, "temperature": 0.9, "seed": 3}),
    ]:
        body = {**body, "n": 2}
        full = post(server, path, body)
        chunks = stream(server, path, {**body, "stream_options": {"include_usage": True}})
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
        assert all("usage" not in c or c["usage"] is None for c in chunks[:-1])
        for i in range(2):
            mine = choices(chunks, i)
            if path == "/v1/completions":
                text = "".join(c["text"] for c in mine)
                assert text == full["choices"][i]["text"]
            else:
                text = "".join(c["delta"].get("content") or "" for c in mine)
                assert text == full["choices"][i]["message"]["content"]
            reasons = [c["finish_reason"] for c in mine]
            assert reasons[-1] == full["choices"][i]["finish_reason"] and reasons.count(None) == len(reasons) - 1
        assert full["choices"][0] != full["choices"][1]  # seed + i: two different draws


def test_length_finish_and_no_usage_chunk_without_include_usage(server):
    body = {"messages": CHAT, "max_completion_tokens": 3, "temperature": 0}
    full = post(server, "/v1/chat/completions", body)
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 3
    chunks = stream(server, "/v1/chat/completions", body)
    assert all(ch["choices"] for ch in chunks) and choices(chunks)[-1]["finish_reason"] == "length"
