"""The static-cache decode step (pipeline/serve/graph_step.py) wired into the server's scheduler.

On the CPU the step runs GraphedDecoder's static KV cache without graph capture: greedy ids through the
scheduler must be IDENTICAL to the default eager step's, for staggered requests that join and leave mid-batch
(slot compaction), a cancelled sequence must free its slot, and a request past the cache's ``max_len`` is
refused with a 400 before it queues. The ``gpu`` tests repeat the equality with CUDA graph capture on (and with
per-layer torch.compile); they skip here.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from pipeline.errors import RecipeError
from pipeline.serve.app import create_app
from pipeline.serve.batching import SamplingParams
from pipeline.serve.generate import GenerationEngine
from pipeline.serve.graph_step import GraphedStep
from pipeline.serve.protocol import RequestError
from pipeline.serve.server import start_server
from tests.conftest import TINY_MODEL, load_tiny

PROMPTS = [
    "def add(a, b):",
    "The list type is a mutable sequence",
    "import os\nimport sys\n\n",
    "class Stack:\n    def push(self, item):",
    "A dictionary maps keys to values; its keys must be hashable, so",
]
LENGTHS = [12, 40, 8, 30, 20]  # max_tokens: the short ones leave while the long ones decode on (compaction)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load(device: str = "cpu"):
    return load_tiny(device)


@pytest.fixture(scope="module")
def parts():
    return load()


def wait_for(cond, timeout_s=20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def greedy(engine, i, logprobs=None):
    ids = engine.encode_text(PROMPTS[i])
    return engine.run(ids, SamplingParams(max_tokens=LENGTHS[i], temperature=0.0, logprobs=logprobs))


def alone(engine, logprobs=None):
    return [greedy(engine, i, logprobs) for i in range(len(PROMPTS))]


def staggered(engine):
    """Each request joins the running batch a few steps after the previous one."""
    results: dict[int, list[int]] = {}
    threads = []
    for i in range(len(PROMPTS)):
        threads.append(threading.Thread(target=lambda i=i: results.__setitem__(i, greedy(engine, i).token_ids)))
        start = engine.scheduler.steps
        threads[-1].start()
        wait_for(lambda: engine.scheduler.steps >= start + 3, 10)
    for t in threads:
        t.join(120)
    return [results.get(i) for i in range(len(PROMPTS))]


def agrees(ref, ids: list[int], tie: float) -> bool:
    """``ids`` equal the reference's greedy ids, or first differ where the reference's two best tokens were
    within ``tie`` in log-probability (another kernel may round such a near-tie the other way)."""
    k = next((k for k, (a, b) in enumerate(zip(ref.token_ids, ids)) if a != b), None)
    if k is None:
        return len(ids) == len(ref.token_ids)
    top = ref.logprobs[k].top
    return tie > 0 and len(top) > 1 and top[0][1] - top[1][1] < tie


class Spy:
    """Records the slot moves GraphedDecoder.compact is asked for."""

    def __init__(self, step: GraphedStep):
        self.moves: list[list[int]] = []
        compact = step.dec.compact

        def spy_compact(src):
            self.moves.append(list(src))
            compact(src)

        step.dec.compact = spy_compact


def check_equal_through_scheduler(model, tokenizer, tie: float = 0.0, **graphed):
    """Greedy ids through the scheduler with a GraphedStep (``GenerationEngine(**graphed)``) equal the default
    step's, alone and staggered (joins and leaves mid-batch); ``tie`` > 0 tolerates a flip at a near-tie.
    Returns the step and the graphed ids (alone, staggered)."""
    plain = GenerationEngine(model, tokenizer, decode="eager")
    try:
        ref = alone(plain, logprobs=2)
        ref_ids = [r.token_ids for r in ref]
        batched = staggered(plain)  # the default step itself is batch-invariant (up to near-ties on a GPU)
        assert batched == ref_ids if tie == 0 else all(agrees(r, ids, tie) for r, ids in zip(ref, batched))
    finally:
        plain.shutdown()
    eng = GenerationEngine(model, tokenizer, max_batch_size=8, **graphed)
    try:
        step = eng.scheduler.step
        assert isinstance(step, GraphedStep)
        spy = Spy(step)
        runs = [[r.token_ids for r in alone(eng)], staggered(eng)]
        for got in runs:
            if tie == 0:
                assert got == ref_ids
            else:
                assert all(agrees(r, ids, tie) for r, ids in zip(ref, got)), (got, ref_ids)
        assert step.took == 2 * len(PROMPTS)  # every sequence's prefill went into a slot once
        assert eng.scheduler.overlapped > 0  # steps launched before the host read the tokens of the one before
        assert any(src != list(range(len(src))) for src in spy.moves)  # a sequence left from below others
        assert wait_for(lambda: eng.scheduler.state is None) and step.slots == {}
        return step, runs
    finally:
        eng.shutdown()


# ------------------------------------------------------------------------------------- CPU: no capture


def test_graphed_step_decodes_exactly_the_default_steps_ids(parts):
    step, _ = check_equal_through_scheduler(*parts, decode="graphs", decode_max_len=256)
    assert not step.graphs_enabled and step.max_len == 256  # the CPU: static cache, no capture


def test_overlapped_steps_end_replies_exactly_where_reading_each_step_first_does(parts, monkeypatch):
    """The scheduler launches the next graphed step before it reads this one's tokens (batching.OVERLAP): a reply
    that ends on a stop string, on max_tokens, a seeded sampled one, or one in a batch that others join and leave
    mid-way must come out as with each step's tokens read before the next launch (its extra row computed, never
    shown; a sampled row drawn on the device with the request's generator, as the host path draws it)."""
    from pipeline.serve import batching

    ref_eng = GenerationEngine(*parts, decode="eager")  # the stop string: a piece of the unstopped reply
    try:
        full = ref_eng.run(ref_eng.encode_text(PROMPTS[0]), SamplingParams(max_tokens=24, temperature=0.0)).text
    finally:
        ref_eng.shutdown()
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cases = [(0, SamplingParams(max_tokens=24, temperature=0.0, stops=[stop])),
             (1, SamplingParams(max_tokens=9, temperature=0.0)), (3, SamplingParams(max_tokens=17, temperature=0.0)),
             (2, SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7)),  # drawn on the device
             (4, SamplingParams(max_tokens=15, temperature=1.3, seed=11))]

    def run_all(overlap: bool):
        monkeypatch.setattr(batching, "OVERLAP", overlap)
        eng = GenerationEngine(*parts, decode="graphs", decode_max_len=256, max_batch_size=8)
        try:
            out: dict[int, object] = {}
            threads = [threading.Thread(target=lambda i=i, p=p: out.__setitem__(i, eng.run(
                eng.encode_text(PROMPTS[i]), p))) for i, p in cases]  # fmt: skip
            for t in threads:
                t.start()
                time.sleep(0.05)  # staggered: each joins a batch already decoding
            for t in threads:
                t.join(120)
            return [(r.text, r.token_ids, r.finish_reason) for r in (out[i] for i, _ in cases)], eng.scheduler
        finally:
            eng.shutdown()

    plain, sched_plain = run_all(False)
    overlapped, sched = run_all(True)
    assert overlapped == plain and sched_plain.overlapped == 0 and sched.overlapped > 0
    assert plain[0][2] == "stop" and stop not in plain[0][0] and plain[1][2] == "length" and len(plain[1][1]) == 9


def test_cancel_frees_the_slot(parts):
    eng = GenerationEngine(*parts, decode="graphs", decode_max_len=2048, max_batch_size=4)
    try:
        step = eng.scheduler.step
        seen = threading.Event()
        seq = eng.submit(eng.encode_text(PROMPTS[2]), SamplingParams(max_tokens=1500, temperature=0.0),
                         lambda event, payload: seen.set())  # fmt: skip
        assert seen.wait(20) and wait_for(lambda: seq in step.slots)
        seq.cancel()
        assert wait_for(lambda: eng.scheduler.batch_size == 0) and step.slots == {}
        assert len(seq.ids) < 1500
        ref = GenerationEngine(*parts, decode="eager")
        try:
            assert greedy(eng, 1).token_ids == greedy(ref, 1).token_ids  # the freed slot serves the next one
        finally:
            ref.shutdown()
    finally:
        eng.shutdown()


def test_requests_past_the_static_cache_are_refused_and_the_cache_fills_exactly(parts):
    eng = GenerationEngine(*parts, decode="graphs", decode_max_len=48, max_batch_size=2)
    try:
        assert eng.max_context == 48 and eng.scheduler.step.max_len == 48
        prompt = eng.encode_text(PROMPTS[4])
        room = 48 - len(prompt)
        with pytest.raises(RequestError) as e:
            eng.check_budget(prompt, room + 1, "prompt")
        assert (e.value.status_code, e.value.code) == (400, "context_length_exceeded")
        # A reply that fills the cache to its last position decodes as the eager step does.
        ref = GenerationEngine(*parts, decode="eager", max_context=48)
        try:
            params = dict(max_tokens=eng.check_budget(prompt, None, "prompt"), temperature=0.0)
            expect = ref.run(prompt, SamplingParams(**params))
        finally:
            ref.shutdown()
        got = eng.run(prompt, SamplingParams(**params))
        assert got.token_ids == expect.token_ids and got.finish_reason == expect.finish_reason
        assert got.finish_reason == "stop" or len(prompt) + len(got.token_ids) == 48
        with start_server(create_app(eng, "tiny-graphs")) as server:  # the same refusal over HTTP
            r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                           json={"model": "tiny-graphs", "prompt": PROMPTS[4], "max_tokens": room + 1})  # fmt: skip
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                           json={"model": "tiny-graphs", "prompt": PROMPTS[4], "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        eng.shutdown()


def test_decode_settings_are_checked(parts):
    with pytest.raises(RecipeError, match="decode mode"):
        GenerationEngine(*parts, decode="fast")
    with pytest.raises(RecipeError, match="batching"):
        GenerationEngine(*parts, decode="graphs", batching=False)
    eng = GenerationEngine(*parts)  # auto on the CPU: the eager step
    try:
        assert eng.decode_mode == "eager" and not isinstance(eng.scheduler.step, GraphedStep)
    finally:
        eng.shutdown()


def test_auto_takes_the_graphed_step_on_cuda_and_falls_back_when_it_is_refused(parts, monkeypatch):
    import pipeline.serve.generate as generate
    import pipeline.serve.graph_step as graph_step
    from pipeline.errors import StageError

    monkeypatch.setattr(generate, "_on_cuda", lambda model: True)  # the choice alone; the step runs on the CPU
    eng = GenerationEngine(*parts, decode_max_len=64)
    try:
        assert eng.decode_mode == "graphs+compile" and isinstance(eng.scheduler.step, GraphedStep)
        assert eng.max_context == 64
    finally:
        eng.shutdown()

    def refuse(*args, **kwargs):
        raise StageError("a stand-in refusal (another model family)")

    plain = GenerationEngine(*parts, decode="eager")
    full = plain.max_context
    plain.shutdown()
    monkeypatch.setattr(graph_step, "make_step", refuse)
    eng = GenerationEngine(*parts, decode_max_len=64)
    try:
        assert eng.decode_mode == "eager" and not isinstance(eng.scheduler.step, GraphedStep)
        assert eng.max_context == full  # not left lowered by the refused attempt
    finally:
        eng.shutdown()


def test_compact_moves_slots_in_any_order(parts):
    from pipeline.serve.cuda_graphs import GraphedDecoder

    dec = GraphedDecoder(parts[0], max_batch=4, max_len=8)
    for i, k in enumerate(dec.k):
        k.copy_(torch.arange(k.numel(), dtype=k.dtype).reshape(k.shape) + i)
    dec.pos.copy_(torch.tensor([1, 2, 3, 4]))
    before = [k.clone() for k in dec.k]
    dec.compact([3, 1])  # out of order: one gather
    assert all(torch.equal(k[0], b[3]) and torch.equal(k[1], b[1]) for k, b in zip(dec.k, before))
    assert dec.pos[:2].tolist() == [4, 2]
    dec.compact([1])  # in order: a move
    assert all(torch.equal(k[0], b[1]) for k, b in zip(dec.k, before)) and dec.pos[0] == 2


def queued_together(engine) -> list[list[int]]:
    """Every prompt queued before the scheduler thread starts, so its first admission takes them all (one
    batched prefill for those of similar lengths); their greedy ids."""
    from pipeline.serve.batching import Sequence

    done: dict[int, object] = {}
    finished = threading.Event()

    def sink(i):
        def on(event, payload):
            if event in ("done", "error"):
                done[i] = payload
                if len(done) == len(PROMPTS):
                    finished.set()
        return on

    seqs = [Sequence(engine.encode_text(p), SamplingParams(max_tokens=LENGTHS[i], temperature=0.0), sink(i))
            for i, p in enumerate(PROMPTS)]  # fmt: skip
    for seq in seqs[:-1]:
        engine.scheduler.waiting.put(seq)
    engine.scheduler.submit(seqs[-1])
    assert finished.wait(120)
    assert not any(isinstance(d, Exception) for d in done.values()), done
    return [done[i].token_ids for i in range(len(PROMPTS))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])  # fmt: skip
def test_prompts_prefilled_together_join_the_static_cache_as_they_would_alone(device):
    """The scheduler's batched prefill hands each sequence its own columns of the padded prefill cache; the
    static-cache step copies them into its slots: the greedy ids are those of each prompt run alone through
    the eager step (on CUDA with graphs on, a flip allowed only at a near-tie)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = load(device)
    plain = GenerationEngine(model, tok, decode="eager")
    try:
        ref = alone(plain, logprobs=2)
    finally:
        plain.shutdown()
    eng = GenerationEngine(model, tok, max_batch_size=8, decode="graphs", decode_max_len=256)
    try:
        got = queued_together(eng)
        assert eng.scheduler.prefill_batches >= 1
    finally:
        eng.shutdown()
    tie = 0.0 if device == "cpu" else 1e-3
    assert all(agrees(r, ids, tie) for r, ids in zip(ref, got)), (got, [r.token_ids for r in ref])


# ------------------------------------------------------------------------------------- GPU: CUDA graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_through_the_scheduler_decode_the_default_steps_ids():
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = load("cuda")
    step, graphed = check_equal_through_scheduler(model, tok, tie=1e-3, decode="graphs", decode_max_len=256)
    assert step.graphs_enabled and set(step.dec._graphs) == set(step.dec.buckets)  # captured at start-up
    # The same static-cache step without capture, on the same GPU: the graphs replay it bit for bit.
    _, uncaptured = check_equal_through_scheduler(model, tok, tie=1e-3, step=GraphedStep(model, 8, 256, graphs=False),
                                                  max_context=256)  # fmt: skip
    assert graphed[0] == uncaptured[0]  # alone (a staggered run's batch sizes, so its GEMM kernels, vary by run)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_with_compiled_layers_through_the_scheduler():
    from pipeline.serve.cuda_graphs import _run_layer

    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = load("cuda")
    step = GraphedStep(model, 8, 256, compile_layers=True, buckets=[8])  # one bucket: one compile
    step.warmup()
    check_equal_through_scheduler(model, tok, tie=1e-3, step=step, max_context=256)
    assert step.graphs_enabled and step.dec._layer is not _run_layer and set(step.dec._graphs) == {8}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampled_requests_on_cuda_draw_from_a_cuda_generator_seeded_by_the_request():
    """torch.multinomial on CUDA logits takes a CUDA generator only: a sampled request on a GPU server drew
    with a CPU one and failed its batch. The same seed gives the same reply, alone or beside another request."""
    model, tok = load("cuda")
    eng = GenerationEngine(model, tok, max_batch_size=4, decode="graphs", decode_max_len=256)
    try:
        prompt = eng.encode_text("def add(a, b):")
        params = lambda seed: SamplingParams(max_tokens=24, temperature=1.5, seed=seed)  # noqa: E731
        first = eng.run(prompt, params(7))
        again = eng.run(prompt, params(7))
        other = eng.run(prompt, params(8))
        assert first.finish_reason in ("stop", "length") and first.token_ids == again.token_ids
        assert other.token_ids != first.token_ids  # a different seed draws differently (24 tokens at T=1.5)
    finally:
        eng.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_awq_folder_on_cuda_decodes_through_merged_int4_products_as_the_eager_step(tmp_path):
    """The whole GPU decode path as `pipeline serve` runs it on an INT4 folder: the loader's Int4Linear modules,
    q|k|v and gate|up merged into one GEMV each (at one token with the norms, SwiGLU and residual adds inside the
    GEMVs), the split-K decode attention, CUDA graphs over compiled layers;
    greedy ids as the eager step's on the same loaded model (bf16: a flip allowed only at a near-tie)."""
    from pipeline.engines.transformers_engine import load_model
    from pipeline.quant.rtn import quantize_checkpoint_rtn
    from tests.conftest import TINY_MODEL

    quantize_checkpoint_rtn(TINY_MODEL, tmp_path / "awq", group_size=128)
    model, tok = load_model(tmp_path / "awq", device="cuda", dtype=torch.bfloat16)
    step = GraphedStep(model, 8, 256, compile_layers=True, buckets=[1, 8])  # 1: the fused one-token chain
    assert {(f.qkv.kind, f.gate_up.kind) for f in step.dec.fused} == {("int4", "int4")}
    assert all(f.int4_chain for f in step.dec.fused)  # norms, SwiGLU and residual adds inside the GEMVs
    step.warmup()
    check_equal_through_scheduler(model, tok, tie=0.1, step=step, max_context=256)


def test_families_the_static_loop_would_decode_wrong_are_refused(parts):
    from pipeline.errors import StageError

    model = parts[0]
    saved = model.config.model_type
    try:
        model.config.model_type = "gemma"  # scales its embeddings outside the layer loop
        with pytest.raises(StageError, match="gemma"):
            GraphedStep(model, 2, 64)
    finally:
        model.config.model_type = saved
    model.config.sliding_window = 32
    try:
        with pytest.raises(StageError, match="sliding window"):
            GraphedStep(model, 2, 64)
        assert GraphedStep(model, 2, 32).max_len == 32  # within the window
    finally:
        del model.config.sliding_window


# ------------------------------------------------------------------------------------- settings: recipe, CLI


def test_serve_decode_setting_reaches_the_engine(monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.recipe import ServeSection
    from pipeline.serve import server
    from pipeline.stages.serve import build_app, stop_engine

    assert ServeSection().decode == "auto" and ServeSection(decode="graphs").engine_limits()["decode"] == "graphs"
    with pytest.raises(ValueError):
        ServeSection(decode="fast")
    app = build_app(TINY_MODEL, None, "tiny", decode="graphs", max_batch_size=2)
    try:
        assert app.state.engine.decode_mode == "graphs" and isinstance(app.state.engine.scheduler.step, GraphedStep)
    finally:
        stop_engine(app)
    seen = {}
    monkeypatch.setattr(server, "serve_forever", lambda app, *a, **kw: seen.update(mode=app.state.engine.decode_mode))
    res = CliRunner().invoke(main, ["serve", str(TINY_MODEL), "--port", "0", "--decode", "graphs"],
                             catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0 and seen == {"mode": "graphs"}, res.output
    res = CliRunner().invoke(main, ["serve", str(TINY_MODEL), "--port", "0"], catch_exceptions=False)
    assert seen == {"mode": "eager"}  # auto


def test_greedy_ids_are_argmax_with_ties_nan_and_any_vocab():
    """The step's in-graph greedy tokens (cuda_graphs.greedy_ids, two stages) are ``argmax(-1)`` exactly: the first
    of tied maxima (within a stretch and across stretches), NaN as the maximum, rows of -inf, and vocabularies with
    a divisor near their square root (128256) or none (a prime: the padded path)."""
    from pipeline.serve.cuda_graphs import _stretch, greedy_ids

    gen = torch.Generator().manual_seed(3)
    assert _stretch(128256) is not None and _stretch(32003) is None
    for vocab in (128256, 32003, 50, 151936):
        x = torch.randn(6, vocab, generator=gen).to(torch.bfloat16)
        x[1, [7, vocab - 3]] = 50.0  # a tie across stretches: the first wins
        x[2, [vocab // 2, vocab // 2 + 1]] = 60.0  # a tie inside one stretch
        x[3, vocab - 1] = float("nan")
        x[4] = float("-inf")
        x[5, 0] = 70.0
        assert torch.equal(greedy_ids(x), x.argmax(dim=-1)), vocab
