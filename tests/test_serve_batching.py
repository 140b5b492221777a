"""Continuous batching (pipeline/serve/batching.py) on the shipped tiny model, fp32 on the CPU.

The central check: a greedy request's tokens are IDENTICAL whether it runs alone or joins, mid-flight, a batch
of other requests of other lengths (left-padded cache, per-row positions), and equal to ``model.generate``.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.serve.batching import SamplingParams, left_pad_mask, pad_left, safe_text_end, top_logprobs
from pipeline.serve.generate import GenerationEngine
from tests.conftest import TINY_MODEL, load_tiny

PROMPTS = [
    "def add(a, b):",
    "The list type is a mutable sequence",
    "import os\nimport sys\n\n",
    "class Stack:\n    def push(self, item):",
    "A dictionary maps keys to values; its keys must be hashable, so",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine():
    eng = GenerationEngine(*load_tiny())
    yield eng
    eng.scheduler.shutdown()


# ------------------------------------------------------------------------------------- pure functions


def test_pad_left_and_mask():
    a, b = torch.ones(1, 2, 3, 4), torch.full((1, 2, 1, 4), 2.0)
    out = pad_left([a, b], 3)
    assert out.shape == (2, 2, 3, 4)
    assert torch.equal(out[0], a[0]) and torch.equal(out[1, :, 2:], b[0]) and not out[1, :, :2].any()
    assert left_pad_mask([3, 1], 3).tolist() == [[1, 1, 1], [0, 0, 1]]


def test_top_logprobs_and_safe_text_end():
    lp = torch.tensor([-3.0, -0.1, -2.0])
    assert top_logprobs(lp, 2) == [(1, pytest.approx(-0.1)), (2, -2.0)] and top_logprobs(lp, 0) == []
    assert safe_text_end("hello wor", ["world"]) == 6  # "wor" may begin the stop string: held back
    assert safe_text_end("hello", ["xy"]) == 5
    assert safe_text_end("ab\ufffd", []) == 2  # an incomplete character is held back
    assert safe_text_end("a b ", [], hold_space=True) == 3 and safe_text_end("a b ", []) == 4


# ------------------------------------------------------------------------------------- scheduler


def wait_idle(engine, timeout_s=10.0) -> bool:
    """The batch empties one scheduler step after the last reply (finished sequences leave at the next step)."""
    deadline = time.monotonic() + timeout_s
    while engine.scheduler.batch_size and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.scheduler.batch_size == 0


def greedy(engine, prompt, n=24, **kw):
    return engine.run(engine.encode_text(prompt), SamplingParams(max_tokens=n, temperature=0.0, **kw))


def test_alone_equals_generate(engine):
    ids = engine.encode_text(PROMPTS[0])
    ref = engine.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    done = engine.run(ids, SamplingParams(max_tokens=20, temperature=0.0, stops=[]))
    expect = ref[0, len(ids) :].tolist()
    k = next((i + 1 for i, t in enumerate(expect) if t in engine.eos_token_ids), len(expect))
    assert done.token_ids == expect[:k]


def test_greedy_is_identical_alone_and_joining_a_batch_mid_flight(engine):
    alone = [greedy(engine, p, 40).token_ids for p in PROMPTS]
    results: dict[int, list[int]] = {}
    first_step = engine.scheduler.steps

    def go(i):
        results[i] = greedy(engine, PROMPTS[i], 40).token_ids

    threads = []
    for i in range(len(PROMPTS)):
        threads.append(threading.Thread(target=go, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 10  # the next one joins after the batch has decoded a few steps
        while engine.scheduler.steps < first_step + 3 * (i + 1) and time.monotonic() < deadline and i < 4:
            time.sleep(0.001)
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(PROMPTS))] == alone
    assert wait_idle(engine)


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    params = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=11)
    ids = engine.encode_text(PROMPTS[1])
    alone = engine.run(ids, SamplingParams(**params)).token_ids
    out: list[list[int]] = []
    noise = threading.Thread(target=lambda: greedy(engine, PROMPTS[4], 30))
    noise.start()
    out.append(engine.run(ids, SamplingParams(**params)).token_ids)
    noise.join(60)
    assert out[0] == alone
    other = engine.run(ids, SamplingParams(**dict(params, seed=12))).token_ids
    assert other != alone


def test_stop_string_and_logprobs(engine):
    full = greedy(engine, PROMPTS[3], 24, logprobs=2)
    assert len(full.logprobs) == len(full.token_ids)
    assert all(lp.top[0][0] == lp.token_id for lp in full.logprobs)  # greedy picks the most probable
    stop = full.text[6:9]
    cut = greedy(engine, PROMPTS[3], 24, stops=[stop])
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"


def test_cancel_leaves_the_batch_and_frees_the_cache(engine):
    seen = threading.Event()
    events: list[str] = []

    def sink(event, payload):
        events.append(event)
        seen.set()

    seq = engine.submit(engine.encode_text(PROMPTS[2]), SamplingParams(max_tokens=1500, temperature=0.0), sink)
    assert seen.wait(20)
    seq.cancel()
    assert wait_idle(engine) and seq.cache == [] and "done" not in events
    assert len(seq.ids) < 1500


def test_a_failing_prompt_fails_alone(engine):
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("ok", greedy(engine, PROMPTS[0], 30)))
    t.start()
    with pytest.raises(IndexError):
        engine.run([10**6], SamplingParams(max_tokens=3, temperature=0.0))  # an id past the embedding table
    t.join(60)
    assert results["ok"].token_ids == greedy(engine, PROMPTS[0], 30).token_ids


def test_caps_on_batch_size_and_tokens(engine):
    from transformers import AutoTokenizer

    small = GenerationEngine(engine.model, AutoTokenizer.from_pretrained(TINY_MODEL), max_batch_size=2,
                             max_batch_tokens=10_000)  # fmt: skip
    seen = []
    orig = small.scheduler._decode_step

    def spy():
        seen.append(small.scheduler.batch_size)
        orig()

    small.scheduler._decode_step = spy
    threads = [threading.Thread(target=greedy, args=(small, p, 12)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert max(seen) == 2
    small.scheduler.shutdown()
    # A token cap that holds one sequence (prompt + 12 reserved) but not two: one at a time.
    one = GenerationEngine(engine.model, small.tokenizer, max_batch_size=8, max_batch_tokens=30)
    seen.clear()
    orig_one = one.scheduler._decode_step
    one.scheduler._decode_step = lambda: (seen.append(one.scheduler.batch_size), orig_one())
    threads = [threading.Thread(target=greedy, args=(one, p, 12)) for p in PROMPTS[:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert max(seen) == 1 and all(len(one.encode_text(p)) + 12 <= 30 < 2 * (len(one.encode_text(p)) + 12)
                                  for p in PROMPTS[:3])  # fmt: skip
    one.shutdown()


def test_shutdown_fails_waiting_and_running_requests(engine):
    from transformers import AutoTokenizer

    eng = GenerationEngine(engine.model, AutoTokenizer.from_pretrained(TINY_MODEL), max_batch_size=1)
    errors: list[Exception] = []
    started = threading.Event()

    def ask():
        try:
            greedy(eng, PROMPTS[0], 1500)
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(2)]  # one runs, one waits (batch of one)
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while not (eng.scheduler.batch_size and eng.scheduler.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    eng.shutdown()
    for t in threads:
        t.join(20)
    assert len(errors) == 2 and "shutting down" in str(errors[0])
    del started


# ------------------------------------------------------------------------------------- batched prefill


def _seq(n_prompt: int, prompt_logprobs: bool = False):
    from pipeline.serve.batching import Sequence

    return Sequence(list(range(1, n_prompt + 1)), SamplingParams(max_tokens=1, prompt_logprobs=prompt_logprobs),
                    lambda event, payload: None)  # fmt: skip


def test_prefill_groups_take_similar_lengths_together_and_the_rest_alone(monkeypatch):
    from pipeline.serve import prefill

    monkeypatch.setattr(prefill, "PREFILL_BATCH_TOKENS", 64)
    a, b, c, d, e, f = _seq(10), _seq(9), _seq(30), _seq(8), _seq(12, prompt_logprobs=True), _seq(11)
    groups = prefill.prefill_groups([a, b, c, d, e, f], lambda s: not s.params.prompt_logprobs)
    # 8, 9, 10, 11 together (44 padded tokens, 6 pads); 30 would make 150 with 120 pads: apart; log-probs: alone
    assert groups == [[a, b, d, f], [c], [e]]
    assert prefill.prefill_groups([a, b], lambda s: False) == [[a], [b]]
    many = [_seq(10) for _ in range(8)]  # 80 padded tokens over the cap of 64: two groups
    assert [len(g) for g in prefill.prefill_groups(many, lambda s: True)] == [6, 2]


def test_prompts_admitted_together_are_prefilled_in_one_forward_with_the_tokens_they_get_alone(engine):
    """Sequences waiting when the scheduler starts are admitted at once: one left-padded forward prefills the
    prompts of similar lengths, and every greedy reply is the one the prompt gets alone."""
    from pipeline.serve.batching import Scheduler, Sequence

    prompts = [engine.encode_text(p) for p in ("def add(a, b):", "import os\nimport sys", "class Stack:")]
    alone = [greedy(engine, p, 24).token_ids for p in ("def add(a, b):", "import os\nimport sys", "class Stack:")]
    sched = Scheduler(engine.model, engine.decode, engine.eos_token_ids)
    done: dict[int, list[int]] = {}
    finished = threading.Event()

    def sink(i):
        def on(event, payload):
            if event == "done":
                done[i] = payload.token_ids
                if len(done) == len(prompts):
                    finished.set()
            elif event == "error":
                raise AssertionError(payload)
        return on

    seqs = [Sequence(p, SamplingParams(max_tokens=24, temperature=0.0), sink(i)) for i, p in enumerate(prompts)]
    for s in seqs[:-1]:
        sched.waiting.put(s)  # queued before the thread starts: the first admission takes them all
    sched.submit(seqs[-1])
    try:
        assert finished.wait(60)
    finally:
        sched.shutdown()
    assert sched.prefill_batches == 1
    assert [done[i] for i in range(len(prompts))] == alone
