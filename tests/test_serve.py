"""The embedded OpenAI-compatible server, end to end through the official ``openai`` client and httpx.

A tiny random Llama and a real byte-level BPE tokenizer with a ChatML template (the shipped tiny model's
tokenizer when ``models/tiny-llama-pydocs`` exists, else one trained here in milliseconds) are served by the
real uvicorn server on 127.0.0.1, port 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from pipeline.errors import ModelFolderError, StageError
from pipeline.serve.app import create_app
from pipeline.serve.generate import GenerationEngine, first_stop, sample_next_token, top_p_mask
from pipeline.serve.protocol import RequestError
from pipeline.serve.server import serve_forever, smoke_test, start_server, wait_healthy  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = ROOT / "models" / "tiny-llama-pydocs"
MODEL_NAME = "tiny-chat"
API_KEY = "sk-test-8d1f0c"
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
SENTENCES = [
    "Python is a programming language that lets you work quickly.",
    "The quick brown fox jumps over the lazy dog.",
    "A list is a mutable sequence; a tuple is an immutable one.",
    "Functions are defined with def and return values with return.",
]
HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the list type."}]


# ------------------------------------------------------------------------------------- factories


def make_chat_tokenizer():
    """The shipped tiny model's tokenizer if it is there with a chat template, else a tiny BPE trained here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (SHIPPED_TOKENIZER / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
        if tok.chat_template:
            return tok
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(SENTENCES * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=SPECIALS[0],
        eos_token="<|im_end|>",
        pad_token=SPECIALS[1],
        chat_template=CHATML,
    )


def make_random_chat_llama(tokenizer, seed: int = 0, max_position_embeddings: int = 128):
    """A random 2-layer Llama over ``tokenizer``'s vocabulary whose EOS logit is 0, so greedy never ends early.

    (Random logits are spread around 0 with hundreds of them positive, so a zero EOS row is never the argmax;
    the EOS path is tested by choosing another token as EOS.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    return model


def prompt_ids_by_hand(tokenizer, messages) -> list[int]:
    """The prompt rendered to text by the template, then encoded without extra special tokens."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_chat_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    return GenerationEngine(make_random_chat_llama(tokenizer), tokenizer)


@pytest.fixture(scope="module")
def server(engine):
    with start_server(create_app(engine, MODEL_NAME)) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(engine):
    with start_server(create_app(engine, MODEL_NAME, api_key=API_KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30) as c:
        yield c


def post_chat(url: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=30,
    )


# ------------------------------------------------------------------------------------- pure functions


def test_top_p_mask_keeps_the_smallest_nucleus_reaching_p():
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()  # probabilities 0.2, 0.5, 0.3
    kept = lambda p: top_p_mask(logits, p).isfinite()[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False]
    assert kept(0.5) == [False, True, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [False, True, True]
    assert kept(0.81) == [True, True, True]
    assert kept(1.0) == [True, True, True]
    assert torch.equal(top_p_mask(logits, 0.6)[0, 1:], logits[0, 1:])  # kept logits are unchanged


def test_sample_next_token_is_seeded_and_respects_the_nucleus():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    draw = lambda seed, p: sample_next_token(logits, 0.7, p, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3, 1.0), draw(3, 1.0))
    assert torch.equal(draw(3, 1e-6), logits.argmax(-1))  # a nucleus of one token is greedy
    draws = torch.stack([draw(s, 1.0) for s in range(20)])
    assert draws.unique().numel() > 4  # really sampling


def test_first_stop_finds_the_earliest_stop():
    assert first_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert first_stop("abc", ["x"]) is None


# ------------------------------------------------------------------------------------- engine


def test_engine_refuses_a_tokenizer_without_chat_template(tokenizer):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ModelFolderError, match="has no chat template"):
        GenerationEngine(make_random_chat_llama(tokenizer), bare)


def test_engine_turns_a_template_refusal_into_a_400(tokenizer):
    from transformers import PreTrainedTokenizerFast

    picky = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        eos_token="<|im_end|>",
        chat_template="{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    eng = GenerationEngine(make_random_chat_llama(tokenizer), picky)
    with pytest.raises(RequestError) as e:
        eng.chat(HELLO, max_tokens=1)
    assert (e.value.status_code, e.value.param) == (400, "messages")
    assert e.value.message == "The model's chat template rejected the messages: System role not supported"
    assert eng.chat(HELLO[1:], max_tokens=1).completion_tokens == 1


def test_engine_greedy_equals_plain_generate(engine, tokenizer):
    prompt = prompt_ids_by_hand(tokenizer, HELLO)
    out = engine.model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False)
    expected = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    result = engine.chat(HELLO, max_tokens=9, temperature=0.0)
    assert (result.text, result.prompt_tokens, result.completion_tokens) == (expected, len(prompt), 9)
    assert result.finish_reason == "length"


def test_engine_stops_at_eos_and_excludes_it(tokenizer):
    ref = GenerationEngine(make_random_chat_llama(tokenizer), tokenizer)
    prompt_len = len(ref.encode_chat(HELLO))
    ids = ref.model.generate(torch.tensor([ref.encode_chat(HELLO)]), max_new_tokens=12, do_sample=False)[0, prompt_len:]
    ids = ids.tolist()
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # first token not seen before: call it EOS
    model = make_random_chat_llama(tokenizer)
    model.generation_config.eos_token_id = ids[k]
    result = GenerationEngine(model, tokenizer).chat(HELLO, max_tokens=12, temperature=0.0)
    assert result.finish_reason == "stop"
    assert result.completion_tokens == k + 1
    assert result.text == tokenizer.decode(ids[:k], skip_special_tokens=True)


def test_engine_context_limits(tokenizer):
    n = len(prompt_ids_by_hand(tokenizer, HELLO))
    ctx = n + 6
    eng = GenerationEngine(make_random_chat_llama(tokenizer), tokenizer, max_context=ctx)
    with pytest.raises(RequestError) as e:
        eng.chat(HELLO, max_tokens=7, temperature=0.0)
    assert (e.value.status_code, e.value.param, e.value.code) == (400, "max_tokens", "context_length_exceeded")
    assert "Lower max_tokens to at most 6 " in e.value.message
    long = HELLO + [{"role": "user", "content": "list"}]
    with pytest.raises(RequestError) as e:
        eng.chat(long, max_tokens=1, temperature=0.0)
    assert (e.value.param, e.value.code) == ("messages", "context_length_exceeded")
    assert eng.chat(HELLO, max_tokens=None, temperature=0.0).completion_tokens == 6  # the rest of the context


# ------------------------------------------------------------------------------------- server: happy paths


def test_health_and_models(server, client):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"


def test_chat_completion_through_openai_client(client, engine, tokenizer):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=7, temperature=0)
    assert reply.object == "chat.completion" and reply.model == MODEL_NAME and reply.id.startswith("chatcmpl-")
    assert abs(reply.created - time.time()) < 60
    assert len(reply.choices) == 1 and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(prompt_ids_by_hand(tokenizer, HELLO))
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7
    assert reply.choices[0].message.content == engine.chat(HELLO, max_tokens=7, temperature=0.0).text


def test_greedy_is_deterministic_and_seeded_sampling_repeats(client):
    def ask(**kw):
        return client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=12, **kw)

    assert ask(temperature=0).choices[0].message.content == ask(temperature=0).choices[0].message.content
    a, b = ask(temperature=1.0, seed=5), ask(temperature=1.0, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content
    others = {ask(temperature=1.0, seed=s).choices[0].message.content for s in (6, 7, 8)}
    assert len(others | {a.choices[0].message.content}) > 1


def test_concurrent_requests_are_served_one_by_one_and_agree(server):
    body = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: post_chat(server.url, body), range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1
    assert len({r.json()["id"] for r in replies}) == 4


def test_stop_string_ends_the_reply_before_it(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    # Random weights write odd bytes; a replacement character may still change as tokens arrive, so avoid it.
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    cut = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 16


def test_max_completion_tokens_text_parts_and_unknown_fields(server):
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}],
        "max_tokens": 9,
        "max_completion_tokens": 3,  # the newer name wins
        "temperature": 0,
        "frequency_penalty": 0,  # not implemented: ignored, as by other OpenAI-compatible servers
        "x_vendor_flag": True,
    }
    r = post_chat(server.url, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    joined = dict(body, messages=[{"role": "user", "content": "Say hi"}])
    assert post_chat(server.url, joined).json()["choices"][0]["message"] == r.json()["choices"][0]["message"]


# ------------------------------------------------------------------------------------- server: errors


@pytest.mark.parametrize(
    ("patch", "param", "code"),
    [
        ({"temperature": -0.5}, "temperature", "invalid_value"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_completion_tokens": -3}, "max_completion_tokens", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"stop": [""]}, "stop", "invalid_value"),
        ({"model": None}, "model", "invalid_value"),
        ({"n": 17}, "n", "invalid_value"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "invalid_value"),  # stream + logprobs: 200 now
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, patch, param, code):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}
    r = post_chat(server.url, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    if code == "invalid_value" and param != "top_logprobs":
        assert err["message"].startswith(f"Invalid '{param}': ")


def test_missing_field_and_malformed_json(server):
    r = post_chat(server.url, {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Missing required parameter: 'model'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "missing_required_parameter",
    }
    r = post_chat(server.url, '{"model": "tiny-chat", "messages": [')
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (400, "invalid_json", None)
    assert "not valid JSON (Expecting value at character 36)" in r.json()["error"]["message"]
    r = post_chat(server.url, "[1, 2]")
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (400, "invalid_json", None)


def test_stream_true_streams_the_same_reply(client):
    # Streaming was refused before continuous batching; tests/test_serve_api.py covers it in depth.
    full = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=6, temperature=0,
                                                 stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_unknown_model_unknown_path_and_long_prompt(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert "'gpt-4o' does not exist" in e.value.message and MODEL_NAME in e.value.message
    r = httpx.get(f"{server.url}/v1/nothing", timeout=10)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "unknown_url")
    r = post_chat(server.url, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "list " * 200}]})
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (
        400,
        "context_length_exceeded",
        "messages",
    )


def test_api_key_is_required_and_accepted(keyed_server, caplog):
    caplog.set_level(logging.DEBUG)
    assert httpx.get(f"{keyed_server.url}/health", timeout=10).status_code == 200  # health stays open
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        r = post_chat(keyed_server.url, body, headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{keyed_server.url}/v1/models", timeout=10).status_code == 401
    bad = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="sk-wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0) as good:
        assert good.chat.completions.create(**body).usage.completion_tokens == 2
    assert API_KEY not in caplog.text and "sk-wrong" not in caplog.text


# ------------------------------------------------------------------------------------- server machinery


class BlockingEngine:
    """Stand-in for a slow generation: the real engine, whose sequences are submitted only after the test
    releases them (the app submits to the batch; a held submission keeps the request waiting)."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine, self.entered, self.release = engine, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def submit(self, prompt, params, sink):
        self.entered.set()
        holder = threading.Thread(target=lambda: self.release.wait(20) and self.engine.submit(prompt, params, sink))
        holder.start()
        return _Noop()


class _Noop:
    def cancel(self):
        pass


def test_event_loop_answers_health_while_generating(engine):
    blocking = BlockingEngine(engine)
    with start_server(create_app(blocking, MODEL_NAME)) as running:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answers: list[httpx.Response] = []
        t = threading.Thread(target=lambda: answers.append(post_chat(running.url, body)))
        t.start()
        try:
            assert blocking.entered.wait(10)
            t0 = time.monotonic()
            assert httpx.get(f"{running.url}/health", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 2.0 and not answers  # answered while the generation is still held
        finally:
            blocking.release.set()
            t.join(20)
        assert answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] == 2


def test_stop_frees_the_port_and_busy_port_is_a_clear_error(engine):
    running = start_server(create_app(engine, MODEL_NAME))
    port = running.port
    assert port > 0 and running.url == f"http://127.0.0.1:{port}"
    with pytest.raises(StageError, match=f"Cannot listen on 127.0.0.1:{port}"):
        start_server(create_app(engine, MODEL_NAME), port=port)
    running.stop()
    assert not running.is_running()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    again = start_server(create_app(engine, MODEL_NAME), port=port)  # the same port is free again
    try:
        assert again.port == port and httpx.get(f"{again.url}/health", timeout=5).status_code == 200
    finally:
        again.stop()


def test_wait_healthy_and_smoke_test(keyed_server, engine):
    assert wait_healthy(keyed_server.url, timeout_s=5) < 5
    out = smoke_test(keyed_server.url, MODEL_NAME, API_KEY, prompt="Say hello.", max_tokens=5)
    assert out["reply"] == engine.chat([{"role": "user", "content": "Say hello."}], max_tokens=5, temperature=0.0).text
    assert out["usage"]["completion_tokens"] == 5 and out["finish_reason"] == "length"
    assert out["request"]["messages"] == [{"role": "user", "content": "Say hello."}] and out["latency_s"] > 0
    json.dumps(out)  # goes into smoke.json as is
    with pytest.raises(StageError, match="HTTP 401"):
        smoke_test(keyed_server.url, MODEL_NAME, "sk-wrong", max_tokens=2)
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(StageError, match="did not become healthy within 0 s"):
        wait_healthy(dead, timeout_s=0.3, interval_s=0.1)


def test_serve_forever_stops_cleanly_on_ctrl_c(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from fastapi import FastAPI
        from pipeline.serve.server import serve_forever
        app = FastAPI()
        app.get("/health")(lambda: {{"status": "ok"}})
        serve_forever(app, "127.0.0.1", {port})
        print("returned", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s=15, interval_s=0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "returned"
    assert b"Traceback" not in err and b"server stopped" in err
