"""Load on the embedded OpenAI-compatible server: throughput, time to first token and latency under concurrent
clients, against the same model served one request at a time.

Starts the embedded server (``pipeline.stages.serve.build_app`` + ``start_server``, uvicorn on 127.0.0.1, a free
port) on a model folder or compile artifact (default: the shipped tiny model) and drives it through the official
``openai`` client, one client object per thread:

- ``sequential``: 1 client, the requests one after another (the server never has two at once);
- ``concurrent``: ``--clients`` clients (default 8) sharing the same requests, non-streaming;
- ``streaming``: the same with ``stream=True`` (time to first token = first content chunk);
- ``sequential stream``: 1 streaming client, for the first-token time without queueing;
- ``one sequence, no HTTP``: the scheduler's single-sequence decode against ``model.generate`` (alternated);
- ``no-batching engine``: where ``GenerationEngine`` takes ``batching=False`` (one ``model.generate`` at a time
  under a lock), a second server with that engine under the same ``--clients`` load.

Each run sends ``--requests`` requests (default 32; bounded), greedy, ``max_tokens`` ``--max-tokens`` (default
32), prompts from a fixed list; ``--rounds`` repeats the whole plan and reports a ratio per round and their
median. Tokens are the ``usage.completion_tokens`` the server reports (a streamed request asks for them with
``stream_options.include_usage``). Throughput = completion tokens / wall time of the
run. The machine may be shared: each run also records the process's CPU seconds (server and client threads
together; tokens per CPU-second does not depend on how much of the CPU others took) and the 1-minute load
average before and after. Prints a table and, with ``--json OUT``, writes the figures.

    .venv/bin/python bench/serve_load.py --json bench/results_serve_load_cpu.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "How do I sort a list in Python?",
    "What is a tuple?",
    "Explain list comprehensions.",
    "What does the with statement do?",
    "How do I read a file line by line?",
    "What is a generator?",
    "Explain dict.get with a default.",
    "What is the difference between is and ==?",
]
MODEL_ID = "bench"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _one(client, i: int, max_tokens: int, stream: bool) -> dict:
    messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    t0 = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0)
        return {"latency": time.perf_counter() - t0, "tokens": r.usage.completion_tokens, "ttft": None}
    first, tokens = None, 0
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - t0, "tokens": tokens, "ttft": first}


def drive(base_url: str, clients: int, requests: int, max_tokens: int, stream: bool) -> dict:
    """``requests`` requests from ``clients`` threads (each takes the next index until none is left)."""
    import openai

    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_i = iter(range(requests))

    def worker() -> None:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                break
            try:
                r = _one(client, i, max_tokens, stream)
            except Exception as e:  # noqa: BLE001  (a failed request is counted and shown, not hidden)
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                results.append(r)
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    load0 = os.getloadavg()[0]
    c0 = time.process_time()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    return {
        "clients": clients, "requests": requests, "ok": len(results), "errors": errors[:5], "n_errors": len(errors),
        "stream": stream, "completion_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "cpu_s": round(cpu, 2), "tokens_per_cpu_s": round(tokens / cpu, 2) if cpu else None,
        "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "latency_p50_s": _r(_pct(lat, 50)), "latency_p95_s": _r(_pct(lat, 95)),
        "ttft_p50_s": _r(_pct(ttft, 50)), "ttft_p95_s": _r(_pct(ttft, 95)),
        "mean_latency_s": _r(statistics.fmean(lat) if lat else None),
    }


def engine_decode(engine, max_tokens: int, repeats: int) -> dict:
    """One sequence at a time without HTTP: tokens/s of the batching scheduler (``engine.run``) against the
    plain ``model.generate`` path (``engine._generate``), alternated, medians (the scheduler's own overhead)."""
    from pipeline.serve.batching import SamplingParams

    ids = engine.encode_text("def add(a, b):")
    sched, gen = [], []

    def timed(f) -> float:
        t0 = time.perf_counter()
        n = f()
        return n / (time.perf_counter() - t0)

    for i in range(repeats + 1):
        a = timed(lambda: len(engine.run(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)).token_ids))
        b = timed(lambda: len(engine._generate(ids, max_tokens, 0.0, 1.0, [], None)))
        if i:  # the first pair warms up
            sched.append(a)
            gen.append(b)
    s, g = statistics.median(sched), statistics.median(gen)
    return {"max_tokens": max_tokens, "repeats": repeats, "scheduler_tokens_per_s": round(s, 1),
            "generate_tokens_per_s": round(g, 1), "scheduler_over_generate": round(s / g, 3)}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _serve(model: Path, batching: bool | None):
    """(app, RunningServer) for ``model``; ``batching`` False asks the engine for its one-at-a-time path."""
    from pipeline.serve.app import create_app
    from pipeline.serve.generate import GenerationEngine
    from pipeline.serve.server import start_server
    from pipeline.stages.serve import build_app

    if batching is None:
        app = build_app(model, api_key=None, model_name=MODEL_ID)
    else:
        engine = build_app(model, api_key=None, model_name=MODEL_ID).state.engine
        engine.shutdown()
        app = create_app(GenerationEngine(engine.model, engine.tokenizer, batching=batching), MODEL_ID, None)
    return app, start_server(app, host="127.0.0.1", port=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-llama-pydocs",
                    help="Model folder or compile artifact (default: the shipped tiny model).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="Requests per run (bounded: at most 512).")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-batching-engine", action="store_true",
                    help="Also run a batching=False engine (batched anyway through the API: see the comment).")
    ap.add_argument("--decode-repeats", type=int, default=5,
                    help="Alternated single-sequence decodes (scheduler vs model.generate, no HTTP; 0: skip).")
    ap.add_argument("--rounds", type=int, default=1, help="Run the whole plan this many times (1..10): a ratio "
                    "per round, each concurrent run beside its own sequential one, and their median.")
    ap.add_argument("--no-batch-prefill", action="store_true",
                    help="Prefill every prompt alone (what the scheduler did before batching prompts that arrive "
                         "together).")
    ap.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    args = ap.parse_args()
    if not 1 <= args.requests <= 512 or not 1 <= args.clients <= 64 or not 1 <= args.rounds <= 10:
        ap.error("--requests must be 1..512, --clients 1..64 and --rounds 1..10")
    import torch

    from pipeline.stages.serve import stop_engine
    from pipeline.serve.generate import GenerationEngine

    from pipeline.serve import prefill

    prefill.BATCH_PREFILL = not args.no_batch_prefill
    runs: dict[str, dict] = {}
    rounds: list[dict[str, dict]] = []
    app, server = _serve(args.model, None)
    engine = app.state.engine
    batching = bool(getattr(engine, "batching", False))
    try:
        drive(server.url, 2, 4, 4, stream=False)  # warm-up (first forward passes, thread pools)
        plan = [("sequential", 1, False), (f"concurrent x{args.clients}", args.clients, False),
                (f"streaming x{args.clients}", args.clients, True), ("sequential stream", 1, True)]
        sched = getattr(engine, "scheduler", None)
        for _ in range(args.rounds):  # the whole plan again: a sequential run sits next to each concurrent one
            this: dict[str, dict] = {}
            for name, clients, stream in plan:
                counts = (getattr(sched, "steps", 0), getattr(sched, "prefill_batches", 0))
                this[name] = drive(server.url, clients, args.requests, args.max_tokens, stream)
                if sched is not None:  # decode steps, and forwards that prefilled several prompts, during the run
                    this[name].update(decode_steps=sched.steps - counts[0],
                                      batched_prefills=getattr(sched, "prefill_batches", 0) - counts[1])
                print(f"{name}: {this[name]['tokens_per_s']} tok/s", file=sys.stderr)
            rounds.append(this)
        runs.update(rounds[0])
    finally:
        server.stop()
    try:
        decode = None
        if args.decode_repeats > 0 and hasattr(engine, "_generate"):
            decode = engine_decode(engine, 128, args.decode_repeats)
    finally:
        stop_engine(app)
    # Off by default: the app submits every request to the scheduler, so a GenerationEngine(batching=False)
    # server is batched all the same through the API (only engine.chat() honours the flag). The baseline the
    # issue asks for is the sequential run: the same server, strictly one request at a time.
    if args.no_batching_engine and "batching" in inspect.signature(GenerationEngine).parameters:
        app, server = _serve(args.model, False)
        try:
            drive(server.url, 2, 4, 4, stream=False)
            name = f"no-batching engine x{args.clients}"
            runs[name] = drive(server.url, args.clients, args.requests, args.max_tokens, False)
            print(f"{name}: {runs[name]['tokens_per_s']} tok/s", file=sys.stderr)
        finally:
            server.stop()
            stop_engine(app)

    seq = runs["sequential"]["tokens_per_s"] or 0
    conc = runs[f"concurrent x{args.clients}"]["tokens_per_s"] or 0
    key = f"concurrent x{args.clients}"
    per_round = [round((r[key]["tokens_per_s"] or 0) / r["sequential"]["tokens_per_s"], 2)
                 for r in rounds if r["sequential"]["tokens_per_s"]]  # fmt: skip
    result = {
        "bench": "serve_load", "model": str(args.model), "max_tokens": args.max_tokens,
        "engine_batching": batching, "batch_prefill": prefill.BATCH_PREFILL,
        "machine": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "git": _git_state(), "runs": runs,
        "speedup_concurrent_vs_sequential": round(conc / seq, 2) if seq else None,
        "speedup_per_round": per_round,
        "speedup_median": round(statistics.median(per_round), 2) if per_round else None,
        "rounds": rounds[1:],  # the first round is "runs"
        "engine_single_sequence": decode,
    }
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _git_state() -> str:
    """The commit measured, and whether the serve code differed from it (a shared working tree)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline/serve"], cwd=ROOT,
                               capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return head.strip() + (" (pipeline/serve modified)" if dirty.strip() else "")


def table(result: dict) -> str:
    def f(x, digits=3):
        return "—" if x is None else f"{x:.{digits}f}"

    lines = ["| run | clients | ok/requests | completion tokens | wall s | tokens/s | tokens/CPU-s | TTFT p50 / p95 s | "
             "latency p50 / p95 s | load avg start→end |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['clients']} | {r['ok']}/{r['requests']} | {r['completion_tokens']} | "
                     f"{f(r['wall_s'], 1)} | **{f(r['tokens_per_s'], 1)}** | {f(r['tokens_per_cpu_s'], 1)} | "
                     f"{f(r['ttft_p50_s'])} / {f(r['ttft_p95_s'])} | {f(r['latency_p50_s'])} / "
                     f"{f(r['latency_p95_s'])} | {r['loadavg_1min'][0]:.1f}→{r['loadavg_1min'][1]:.1f} |")
    lines.append(f"\nconcurrent / sequential throughput: **{result['speedup_concurrent_vs_sequential']}×** "
                 f"(engine batching: {result['engine_batching']})")
    if len(result.get("speedup_per_round") or []) > 1:
        lines.append(f"per round: {' / '.join(f'{x}×' for x in result['speedup_per_round'])}, median "
                     f"**{result['speedup_median']}×**")
    d = result.get("engine_single_sequence")
    if d:
        lines.append(f"one sequence, no HTTP, {d['max_tokens']} tokens, median of {d['repeats']}: scheduler "
                     f"{d['scheduler_tokens_per_s']} tok/s, model.generate {d['generate_tokens_per_s']} tok/s "
                     f"(**{d['scheduler_over_generate']}×**)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
