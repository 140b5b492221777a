"""Caps and the batch's cache in the embedded server, on the shipped tiny model (fp32, one torch thread).

- Queue caps: past ``max_queued`` waiting sequences (beyond the batch's free slots) or ``max_queued_tokens``
  reserved by them, a request is refused whole with a 429 in OpenAI's error body and ``Retry-After``, counted in
  ``/metrics``; the requests already in flight are served and the server takes new ones once there is room.
- The batch's padded cache (``Scheduler.state``) is kept from step to step and rebuilt only when a sequence joins
  or leaves (``regroups``), never holds more padding than its longest row, and goes when the batch empties; the
  decode step is a swappable ``step(model, state) -> logits`` callable.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest
import torch

from pipeline.serve.app import create_app
from pipeline.serve.batching import DynamicCacheStep, SamplingParams, pad_left, regroup
from pipeline.serve.generate import GenerationEngine
from pipeline.serve.server import start_server
from tests.conftest import TINY_MODEL

NAME = "tiny-limits"
CODE = "def fibonacci(n):\n    "
PROMPTS = ["def add(a, b):", "The list type is a mutable sequence", "import os\nimport sys\n\n", "class Stack:"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32), TINY_MODEL


def make_engine(parts, **kw) -> GenerationEngine:
    from transformers import AutoTokenizer

    return GenerationEngine(parts[0], AutoTokenizer.from_pretrained(parts[1]), **kw)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(cond, timeout_s=20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def long_stream(url: str, stack, **extra):
    """An open streamed completion of up to 1500 tokens (closed by the ExitStack: a client disconnect)."""
    body = {"model": NAME, "prompt": CODE, "max_tokens": 1500, "temperature": 0, "stream": True, **extra}
    r = stack.enter_context(httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60))
    assert r.status_code == 200
    return r


# ------------------------------------------------------------------------------------- queue caps


def test_requests_past_max_queued_get_429_with_retry_after_and_are_counted(parts):
    from contextlib import ExitStack

    engine = make_engine(parts, max_batch_size=1, max_queued=1)
    try:
        with start_server(create_app(engine, NAME)) as server, ExitStack() as stack:
            long_stream(server.url, stack)  # runs (the batch holds one)
            assert wait_for(lambda: engine.scheduler.batch_size == 1)
            long_stream(server.url, stack)  # waits: the one queued place
            assert wait_for(lambda: engine.scheduler.queue_depth == 1)
            body = {"model": NAME, "prompt": "x", "max_tokens": 2}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert (err["type"], err["code"], err["param"]) == ("requests", "rate_limit_exceeded", None)
            assert "max_queued" in err["message"]
            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=NAME, prompt="x", max_tokens=2)
            assert metric(server.url, 'quantship_rejected_requests_total{code="rate_limit_exceeded"}') == 2
            assert metric(server.url, 'quantship_requests_total{route="/v1/completions",status="429"}') == 2
            assert metric(server.url, "quantship_queue_depth") == 1
            assert metric(server.url, "quantship_queued_tokens") == len(engine.encode_text(CODE)) + 1500
            stack.close()  # both clients go: their sequences leave, the server has room again
            assert wait_for(lambda: engine.scheduler.batch_size == 0 and engine.scheduler.queue_depth == 0)
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
            assert engine.scheduler.queued_tokens == 0
    finally:
        engine.shutdown()


def test_a_request_of_n_choices_is_refused_whole(parts):
    from contextlib import ExitStack

    engine = make_engine(parts, max_batch_size=1, max_queued=1)
    try:
        with start_server(create_app(engine, NAME)) as server, ExitStack() as stack:
            long_stream(server.url, stack)
            assert wait_for(lambda: engine.scheduler.batch_size == 1)
            body = {"model": NAME, "prompt": "x", "max_tokens": 2, "n": 2}  # 2 > 1 queued place: none queued
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 429 and engine.scheduler.queue_depth == 0
            assert engine.check_capacity(1, 3) is None  # one choice would fit in the queued place
            stack.close()
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)  # room now: both choices run
            assert r.status_code == 200 and len(r.json()["choices"]) == 2
    finally:
        engine.shutdown()


def test_queued_token_cap(parts):
    from contextlib import ExitStack

    engine = make_engine(parts, max_batch_size=1, max_queued=None, max_queued_tokens=1000)
    try:
        with start_server(create_app(engine, NAME)) as server, ExitStack() as stack:
            long_stream(server.url, stack)
            assert wait_for(lambda: engine.scheduler.batch_size == 1)
            long_stream(server.url, stack)  # reserves > 1000 tokens, accepted: the queue was empty
            assert wait_for(lambda: engine.scheduler.queue_depth == 1)
            body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 429 and "max_queued_tokens" in r.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_a_cancelled_waiting_sequence_frees_its_queue_place_at_once(parts):
    engine = make_engine(parts, max_batch_size=1, max_queued=1)
    sched = engine.scheduler
    try:
        running = engine.submit(engine.encode_text(CODE), SamplingParams(max_tokens=1500, temperature=0.0),
                                lambda ev, payload: None)  # fmt: skip
        assert wait_for(lambda: sched.batch_size == 1 and sched.queue_depth == 0)
        waiting = engine.submit([5, 6, 7], SamplingParams(max_tokens=10, temperature=0.0), lambda ev, payload: None)
        assert (sched.queue_depth, sched.queued_tokens) == (1, 13) and sched.capacity_error(1, 1) is not None
        waiting.cancel()
        waiting.cancel()  # twice: counted once
        assert (sched.queue_depth, sched.queued_tokens) == (0, 0) and sched.capacity_error(1, 1) is None
        running.cancel()
        assert wait_for(lambda: sched.batch_size == 0 and sched.state is None)
        assert (sched.queue_depth, sched.queued_tokens) == (0, 0)  # the cancelled one was skipped, not counted again
    finally:
        engine.shutdown()


def test_capacity_rule(parts):
    engine = make_engine(parts, max_batch_size=2, max_queued=1, max_queued_tokens=50)
    sched = engine.scheduler
    try:
        assert sched.capacity_error(3, 10) is None  # 2 free slots + 1 queued place
        assert sched.capacity_error(4, 10) is not None
        assert sched.capacity_error(1, 10**6) is None  # an empty queue never refuses for tokens alone
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------------------- the batch's cache


def test_regroup_slices_kept_rows_and_pads_newcomers():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(1, 2, n, 3, generator=g) for n in (5, 2, 4)]
    k = pad_left(rows, 5)
    layers = [(k, pad_left([r + 1 for r in rows], 5))]
    joining = [[(torch.randn(1, 2, 6, 3, generator=g),) * 2]]
    out, past = regroup(layers, 5, [2, 1], [4, 2], joining)  # row 0 (the longest) leaves, one of 6 joins
    assert past == 6 and out[0][0].shape == (3, 2, 6, 3)
    assert torch.equal(out[0][0], pad_left([rows[2], rows[1], joining[0][0][0]], 6))
    assert torch.equal(out[0][1][:2], pad_left([rows[2] + 1, rows[1] + 1], 6))
    out, past = regroup(layers, 5, [1, 2], [2, 4], [])  # shrinks to the longest row left
    assert past == 4 and torch.equal(out[0][0], pad_left([rows[1], rows[2]], 4))


class RecordingStep(DynamicCacheStep):
    """The default step, recording what each call saw (the seam a CUDA-graph step plugs into)."""

    def __init__(self, model):
        super().__init__(model)
        self.calls: list[tuple] = []

    def __call__(self, model, state):
        self.calls.append((id(state.cache), state.regroups, state.past, list(state.lengths),
                           tuple(map(id, state.seqs))))  # fmt: skip
        return super().__call__(model, state)


def greedy(engine, prompt, n):
    return engine.run(engine.encode_text(prompt), SamplingParams(max_tokens=n, temperature=0.0)).token_ids


def test_cache_is_kept_across_steps_and_rebuilt_only_on_membership_changes(parts):
    plain = make_engine(parts)
    try:
        alone = [greedy(plain, p, 24) for p in PROMPTS]
    finally:
        plain.shutdown()
    step = RecordingStep(parts[0])
    engine = make_engine(parts, step=step)
    try:
        assert greedy(engine, PROMPTS[0], 24) == alone[0]  # one sequence: one cache for all its steps
        assert len({c[0] for c in step.calls}) == 1 and len(step.calls) == 23
        assert wait_for(lambda: engine.scheduler.state is None)
        step.calls.clear()
        results: dict[int, list[int]] = {}
        threads = []
        for i, p in enumerate(PROMPTS):  # staggered: each joins a running batch
            threads.append(threading.Thread(target=lambda i=i, p=p: results.__setitem__(i, greedy(engine, p, 24))))
            threads[-1].start()
            start = engine.scheduler.steps
            wait_for(lambda: engine.scheduler.steps >= start + 3, 5)
        for t in threads:
            t.join(60)
        assert [results[i] for i in range(len(PROMPTS))] == alone
        pairs = list(zip(step.calls, step.calls[1:]))
        assert all((a[1] != b[1]) == (a[4] != b[4]) for a, b in pairs)  # rebuilt exactly when membership changed
        assert all(a[0] == b[0] for a, b in pairs if a[1] == b[1])  # else the same cache object, step after step
        assert 2 <= len({c[1] for c in step.calls}) < len(step.calls) // 4
        assert all(past == max(lengths) for _, _, past, lengths, _ in step.calls)  # no more padding than needed
        assert wait_for(lambda: engine.scheduler.state is None)  # the last one out frees the batch's cache
    finally:
        engine.shutdown()


def test_a_vanishing_temperature_decodes_greedily():
    from pipeline.serve.generate import sample_next_token

    logits = torch.tensor([[1.0, 3.0, 2.0], [30.0, -5.0, 29.0]])
    token = sample_next_token(logits, 8.7e-107, 1.0, torch.Generator().manual_seed(0))  # was a NaN softmax (fuzz)
    assert token.tolist() == [1, 0]


class PerSequenceStep:
    """A step that owns its cache (``owns_cache``): per-sequence caches, padded together at every step (the
    scheduler's design before the batch cache). Proves the seam: a step keeping its own storage gets each
    joiner's columns once and decodes exactly what the default step decodes."""

    owns_cache = True

    def __init__(self, model):
        self.inner, self.rows, self.seen, self.took = DynamicCacheStep(model), {}, None, 0

    def __call__(self, model, state):
        import dataclasses

        from transformers import DynamicCache

        if state.regroups != self.seen:
            self.seen = state.regroups
            self.rows = {id(s): self.rows[id(s)] for s in state.seqs if id(s) in self.rows}
            if state.joined:
                width = state.cache.layers[0].keys.shape[2]
                assert state.cache.layers[0].keys.shape[0] == len(state.joined)  # the joiners only
                for j, b in enumerate(state.joined):
                    n = state.lengths[b]
                    self.rows[id(state.seqs[b])] = [(layer.keys[j : j + 1, :, width - n :],
                                                     layer.values[j : j + 1, :, width - n :])
                                                    for layer in state.cache.layers]  # fmt: skip
                    self.took += 1
        per = [self.rows[id(s)] for s in state.seqs]
        layers = [(pad_left([p[i][0] for p in per], state.past), pad_left([p[i][1] for p in per], state.past))
                  for i in range(len(per[0]))]  # fmt: skip
        cache = DynamicCache(ddp_cache_data=layers, config=model.config)
        logits = self.inner(model, dataclasses.replace(state, cache=cache))
        for b, s in enumerate(state.seqs):
            self.rows[id(s)] = [(torch.cat([k, layer.keys[b : b + 1, :, -1:]], 2),
                                 torch.cat([v, layer.values[b : b + 1, :, -1:]], 2))
                                for (k, v), layer in zip(self.rows[id(s)], cache.layers)]  # fmt: skip
        return logits


def test_a_step_that_owns_its_cache_decodes_the_same(parts):
    plain = make_engine(parts)
    try:
        alone = [greedy(plain, p, 20) for p in PROMPTS]
    finally:
        plain.shutdown()
    step = PerSequenceStep(parts[0])
    engine = make_engine(parts, step=step)
    try:
        results: dict[int, list[int]] = {}
        threads = []
        for i, p in enumerate(PROMPTS):
            threads.append(threading.Thread(target=lambda i=i, p=p: results.__setitem__(i, greedy(engine, p, 20))))
            threads[-1].start()
            start = engine.scheduler.steps
            wait_for(lambda: engine.scheduler.steps >= start + 3, 5)
        for t in threads:
            t.join(60)
        assert [results[i] for i in range(len(PROMPTS))] == alone and step.took == len(PROMPTS)
    finally:
        engine.shutdown()
