"""The OpenAI API of the embedded server on the shipped tiny model (fp32), through the official ``openai`` client
and httpx against a real uvicorn server on 127.0.0.1: streaming, completions with echo + logprobs (as lm-eval's
``local-completions`` uses them), n, concurrency under continuous batching, limits, metrics, disconnects."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from pipeline.eval.perplexity import model_logits
from pipeline.serve.app import create_app
from pipeline.serve.generate import GenerationEngine
from pipeline.serve.server import start_server
from tests.conftest import load_tiny

NAME = "tiny-pydocs"
KEY = "sk-api-test-51c2"
CODE = "def fibonacci(n):\n    "
CHAT = [{"role": "user", "content": "How do I reverse a list in Python?"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The GPU run sets QUANTSHIP_TEST_DEVICE=cuda: the same API, through the CUDA-graph decode step on a CUDA model
# (a sampled request once failed there and nowhere else: CUDA sampling needs a CUDA generator).
DEVICE = os.environ.get("QUANTSHIP_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def engine():
    if DEVICE != "cpu" and not torch.cuda.is_available():
        pytest.skip(f"QUANTSHIP_TEST_DEVICE={DEVICE} but no CUDA device")
    eng = GenerationEngine(*load_tiny(DEVICE), **({} if DEVICE == "cpu" else {"decode": "graphs"}))
    yield eng
    eng.scheduler.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with start_server(create_app(engine, NAME, api_key=KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def post(server, path, body, headers=None, **kw):
    content = body if isinstance(body, (str, bytes)) or body is None or callable(body) else json.dumps(body)
    if callable(content):
        content = content()
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=hdrs, **{"timeout": 60, **kw})


def metric(server, name_and_labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    m = re.search(rf"^{re.escape(name_and_labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------------------------------- streaming


def test_streamed_chat_reassembles_to_the_reply_with_the_same_seed(client):
    kw = dict(model=NAME, messages=CHAT, max_tokens=30, temperature=0.8, seed=7)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and len(text) > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_streamed_completion_and_raw_sse_end_with_done(server, client):
    kw = dict(model=NAME, prompt=CODE, max_tokens=20, temperature=0.8, seed=3)
    full = client.completions.create(**kw)
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert text == full.choices[0].text
    r = post(server, "/v1/completions", dict(kw, stream=True))
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


# ------------------------------------------------------------------------------------- completions + logprobs


def test_echo_logprobs_equal_our_evaluation(engine, client):
    ids = engine.encode_text(CODE + "return n if n < 2 else fibonacci(n - 1)")
    reply = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = reply.choices[0].logprobs
    with torch.inference_mode():
        logits = model_logits(engine.model, torch.tensor([ids], device=engine.model.device))[0]
        ref = torch.log_softmax(logits.float(), dim=-1).cpu()
    expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4)
    assert len(lp.tokens) == len(ids) and lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:]) and reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == 0 and reply.choices[0].text == engine.decode(ids)


def test_lm_eval_style_request_scores_prompt_and_one_token(engine, server):
    """lm-eval local-completions (loglikelihood): a batch of token-id prompts, echo, logprobs=1, max_tokens=1."""
    prompts = [engine.encode_text(CODE), engine.encode_text("import os")]
    body = {"model": NAME, "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}  # fmt: skip
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c, p in zip(choices, prompts):
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(p) + 1  # prompt + the generated token
        greedy_token = max(lp["top_logprobs"][-1], key=lp["top_logprobs"][-1].get)
        assert greedy_token == lp["tokens"][-1]


def test_chat_logprobs_and_n(client):
    reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=2, n=2)  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy: same text
    content = reply.choices[0].logprobs.content
    assert len(content) == 8 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in content)
    assert reply.usage.completion_tokens == 16
    sampled = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=20, temperature=1.0, n=2, seed=4)
    assert sampled.choices[0].message.content != sampled.choices[1].message.content


def test_concurrent_clients_get_their_solo_replies(client):
    prompts = [CODE, "import os\n", "class Stack:\n", "# Sort a list\n", "x = [1, 2, 3]\n", "def main():\n"]

    def ask(p):
        return client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


# ------------------------------------------------------------------------------------- limits and bad input


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/completions", {"prompt": "x " * 3000}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
        ("/v1/completions", '{"model": "tiny-pydocs", "prompt": ', 400, None, "invalid_json"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_value"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid_value"),  # zero tokens (no BOS added)
        ("/v1/completions", {"prompt": ["x", ""]}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs", "invalid_value"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),  # stream+logprobs: 200
        ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-4o"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_value"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 2.0}, 400, "n", "invalid_value"),  # no float for an int
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
        ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "echo", "invalid_value"),
    ],
)
def test_bad_requests(server, path, body, status, param, code):
    if isinstance(body, dict):
        body = {"model": NAME, **body}
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)


def test_body_over_the_cap_is_413_declared_or_chunked(server):
    big = json.dumps({"model": NAME, "prompt": "x" * (1 << 20)})
    r = post(server, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: transfer-encoding chunked
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536].encode()

    r = post(server, "/v1/completions", chunks)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert post(server, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_key_guards_every_route_but_health_and_logs_hold_no_key_or_prompt(server, caplog):
    caplog.set_level(logging.DEBUG)
    for path in ("/metrics", "/v1/models"):
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    secret_prompt = "zebra-quartz-prompt"
    r = post(server, "/v1/completions", {"model": NAME, "prompt": secret_prompt, "max_tokens": 2})
    assert r.status_code == 200
    # uvicorn writes the access line from its own thread once the response is sent: it can come after the reply
    deadline = time.monotonic() + 5
    while "/v1/completions 200" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "/v1/completions 200" in caplog.text  # the request line is logged
    assert KEY not in caplog.text and secret_prompt not in caplog.text


# ------------------------------------------------------------------------------------- metrics and disconnects


def test_metrics_count_requests_and_tokens(server, client):
    before = metric(server, 'quantship_requests_total{route="/v1/completions",status="200"}')
    gen_before = metric(server, "quantship_generation_tokens_total")
    client.completions.create(model=NAME, prompt=CODE, max_tokens=5, temperature=0)
    post(server, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert metric(server, 'quantship_requests_total{route="/v1/completions",status="200"}') == before + 1
    assert metric(server, 'quantship_requests_total{route="/v1/completions",status="404"}') >= 1
    assert metric(server, "quantship_generation_tokens_total") == gen_before + 5
    assert metric(server, "quantship_prompt_tokens_total") > 0
    assert metric(server, "quantship_time_to_first_token_seconds_count") > 0
    assert metric(server, 'quantship_request_latency_seconds_count{route="/v1/completions"}') > 0
    assert metric(server, "quantship_batch_size") == 0 and metric(server, "quantship_queue_depth") == 0


def test_disconnect_mid_stream_frees_the_slot(server, engine):
    body = {"model": NAME, "prompt": CODE, "max_tokens": 1500, "temperature": 0, "stream": True}
    hdrs = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=hdrs, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        assert engine.scheduler.batch_size == 1
    deadline = time.monotonic() + 15
    while metric(server, "quantship_batch_size") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "quantship_batch_size") == 0 and engine.scheduler.batch_size == 0
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_disconnect_while_waiting_for_a_whole_reply_frees_the_slot(server, engine):
    body = {"model": NAME, "prompt": CODE, "max_tokens": 1500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=1.0)  # the client gives up and closes the connection
    deadline = time.monotonic() + 15
    while engine.scheduler.batch_size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.batch_size == 0
    assert metric(server, 'quantship_requests_total{route="/v1/completions",status="499"}') >= 1


def test_log_prompts_flag_logs_the_prompt(engine, caplog):
    caplog.set_level(logging.INFO)
    with start_server(create_app(engine, NAME, log_prompts=True)) as running:
        r = post(running, "/v1/completions", {"model": NAME, "prompt": "walrus-in-log", "max_tokens": 1})
    assert r.status_code == 200 and "walrus-in-log" in caplog.text
