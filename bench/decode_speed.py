"""Decode speed (tokens/s) of the embedded runtime for the reference and each quantized format, eager vs CUDA graphs.

A Llama model of a named shape with random weights is built directly on the device (no checkpoint), its seven
decoder linears per layer replaced by our runtime modules built from random codes in each format:

- ``ref``: the float model (bfloat16 on CUDA, float32 on the CPU);
- ``int4-awq`` / ``int4-gptq``: group-wise 4-bit g128, packed in that checkpoint layout and read back through
  its runtime builder (``qlinear.awq_linear`` / ``gptq_linear``) into ``Int4Linear`` (CPU rows); ``int4``: the
  same codes straight into ``Int4Linear`` (GPU rows: both layouts unpack to these codes at load, so the kernel
  and its speed are the same; kernel "auto" = our Triton kernels on CUDA); ``int4-tinygemm``: the same weights
  on PyTorch's ``_weight_int4pack_mm`` (CUDA only);
- ``int8``: W8A8 ``Int8Linear``; ``fp8``: per-channel e4m3 ``Fp8Linear``.

Modes: ``eager`` (our static cache, kernels launched from Python, as the server decodes today with its own
cache), ``graphs`` (``serve.cuda_graphs.GraphedDecoder``: the step captured per batch bucket),
``graphs+compile`` (also ``torch.compile`` per decoder layer before capture). Each row: prefill a P-token
prompt per slot, then time T decode steps; tokens/s = batch x T / seconds. On CUDA also the device-to-device
copy bandwidth (bytes read + written), the weight bytes read per token, and the bandwidth bound
(bytes / copy bandwidth) with the share of it reached; ``--micro`` adds a per-linear kernel table.

``--server`` times the same rows through the embedded server's continuous-batching scheduler instead
(``serve.batching.Scheduler``, the loop ``GenerationEngine`` runs, minus HTTP and the tokenizer: its text callback
returns "" and no EOS is set): ``eager`` = the server's default step (transformers' forward over its padded
``DynamicCache``), ``graphs`` / ``graphs+compile`` = ``serve.graph_step.GraphedStep`` with a static cache of
``batch`` slots x (P + T + 8) positions, captured at start-up. ``batch`` requests are submitted at once; tokens/s
counts the steps at which all ``batch`` decode together, start to start (sampling and bookkeeping included).

    python bench/decode_speed.py --shape tiny                          # CPU, runs anywhere
    python bench/decode_speed.py --shape llama3-8b --device cuda --server --formats ref,int4 --modes eager,graphs
    python bench/decode_speed.py --shape llama3-8b --device cuda --micro --out bench/results_decode_gpu_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (256, 768, 2, 4, 2, 1024),
    "small": (1024, 2816, 4, 16, 4, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 128  # the INT4 formats' group size (--group)
RESULTS: dict = {}


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    return model.eval()


def _random_qweight(n: int, k: int, device, group: int = 128):
    from pipeline.quant.primitives import QuantizedWeight

    g = torch.Generator(device=device).manual_seed(n * 7 + k)
    return QuantizedWeight(
        w_int=torch.randint(0, 16, (n, k), device=device, dtype=torch.int32, generator=g),
        scales=(torch.rand(n, k // group, device=device, generator=g) * 2e-3 + 1e-3).half().float(),
        zeros=torch.randint(4, 12, (n, k // group), device=device, dtype=torch.int32, generator=g),
        bits=4, group_size=group)


def quantized_linear(fmt: str, lin: torch.nn.Linear, device, dtype):
    """A runtime module of format ``fmt`` with random codes of ``lin``'s shape."""
    from pipeline.engines import qlinear
    from pipeline.engines.fp8_linear import Fp8Linear
    from pipeline.engines.int8_linear import Int8Linear

    n, k = lin.weight.shape
    if fmt.startswith("int4"):
        qw = _random_qweight(n, k, device, GROUP)
        if fmt in ("int4", "int4-tinygemm", "int4-triton"):  # codes straight in: packing 7B codes on the host is slow
            kernel = {"int4": "auto", "int4-tinygemm": qlinear.KERNEL_CUDA, "int4-triton": qlinear.KERNEL_TRITON}[fmt]
            return qlinear.Int4Linear(qw, device=device, dtype=dtype, kernel=kernel)
        if fmt == "int4-awq":
            from pipeline.formats import awq_gemm

            cpu = qlinear.QuantizedWeight(qw.w_int.cpu(), qw.scales.cpu(), qw.zeros.cpu(), 4, GROUP)
            return qlinear.awq_linear(awq_gemm.pack(cpu), {"bits": 4, "group_size": GROUP, "version": "gemm"},
                                      torch.device(device), dtype)
        from pipeline.formats import gptq

        cpu = qlinear.QuantizedWeight(qw.w_int.cpu(), qw.scales.cpu(), qw.zeros.cpu(), 4, GROUP)
        return qlinear.gptq_linear(gptq.pack(cpu), {"bits": 4, "group_size": GROUP}, torch.device(device), dtype)
    if fmt == "int4-gemlite":  # comparison only (pip gemlite, Apache-2.0): not a runtime path
        from bench.decode_micro import _gemlite

        return _gemlite(n, k)
    if fmt == "int8":
        w = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        return Int8Linear(w, torch.rand(n, device=device) * 1e-3 + 1e-4)
    if fmt == "fp8":
        w = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return Fp8Linear(w, torch.rand(n, 1, device=device) * 1e-4 + 1e-5, None, device=device, dtype=dtype)
    raise ValueError(fmt)


def convert(model, fmt: str, device, dtype):
    if fmt == "ref":
        return model
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                lin = getattr(parent, name, None)
                if isinstance(lin, torch.nn.Linear):
                    setattr(parent, name, quantized_linear(fmt, lin, device, dtype))
                    del lin
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


# Int4Linear keeps more than one 4-bit copy on CUDA (module docstring of pipeline.engines.qlinear); a decode step
# reads the one its kernel takes (Int4Linear.route)
_INT4_COPIES = ("weight_int4pack", "scales_and_zeros", "qweight", "scales_t", "zeros_t", "scale_zero", "qmma")
_INT4_READS = {"gemv": {"qweight", "scale_zero"}, "mma": {"qmma", "scale_zero"},
               "packed": {"weight_int4pack", "scales_and_zeros"}, "dequant-matmul": {"qweight", "scales_t", "zeros_t"}}


def weight_bytes_per_token(model, batch: int = 1) -> int:
    """Bytes of the parameters and buffers a decode step of ``batch`` tokens reads: all but the embedding table (of
    which one row), and of an INT4 linear only the copy that step's kernel reads (the JSON before 2026-12-01
    counted every copy, so its INT4 "% of bound" was about twice the real one)."""
    from pipeline.engines.qlinear import Int4Linear

    emb = model.model.embed_tokens.weight
    skip = {emb.data_ptr()}
    for m in model.modules():
        if isinstance(m, Int4Linear) and m.gemv_cuda:
            read = _INT4_READS[m.route(batch)]
            skip |= {t.data_ptr() for name, t in m.named_buffers(recurse=False)
                     if name in _INT4_COPIES and name not in read and t is not None}  # fmt: skip
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in skip and t.dtype != torch.int64:
            total += t.numel() * t.element_size()
    return total


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (median of 10)."""
    a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * 2**31 / sorted(times[2:])[len(times[2:]) // 2]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def decode_speed(model, device, batch, mode, prompt, steps, max_len=None) -> dict:
    from pipeline.serve.cuda_graphs import GraphedDecoder

    t0 = time.perf_counter()
    dec = GraphedDecoder(model, max_batch=batch, max_len=max_len or prompt + steps + 8, buckets=[batch],
                         graphs=mode != "eager" and device == "cuda", compile_layers=mode == "graphs+compile")
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prefill_s = []
    for slot in range(batch):
        ids = torch.randint(0, vocab, (prompt,), generator=g)
        _sync(device)
        t1 = time.perf_counter()
        dec.prefill(slot, ids)
        _sync(device)
        prefill_s.append(time.perf_counter() - t1)
    tokens = torch.randint(0, vocab, (batch,), generator=g).to(device)
    logits = dec.step(tokens)  # first step: capture / compile / tune
    _sync(device)
    setup = time.perf_counter() - t0
    start = time.perf_counter()
    for _ in range(steps - 1):
        tokens = logits.argmax(-1)
        logits = dec.step(tokens)
    _sync(device)
    sec = time.perf_counter() - start
    finite = bool(torch.isfinite(logits.float()).all())
    del dec
    return dict(tok_s=batch * (steps - 1) / sec, ms_per_step=1e3 * sec / (steps - 1), setup_s=setup, finite=finite,
                prefill_ms=1e3 * min(prefill_s))  # the best of the slots' prefills (the first one warms up)


def profile_step(model, fmt: str, out: dict, prompt: int = 32, steps: int = 8, graphs: bool = False,
                 max_len: int | None = None) -> None:
    """GPU time per decode step at batch 1 by kernel (torch.profiler over the compiled static-cache step). Without
    graphs every kernel is launched on its own (durations are the kernels', launch gaps excluded); with
    ``graphs`` the step is the server's CUDA graph and ``span_us_per_step`` (first kernel's start to the last one's
    end, over the steps) minus the busy time is the idle time between the graph's kernels."""
    from torch.profiler import ProfilerActivity, profile

    from pipeline.serve.cuda_graphs import GraphedDecoder

    dec = GraphedDecoder(model, max_batch=1, max_len=max_len or prompt + steps + 16, buckets=[1], graphs=graphs,
                         compile_layers=True)
    dec.prefill(0, torch.randint(0, model.config.vocab_size, (prompt,)))
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    for _ in range(3):
        tok = dec.step(tok).argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = dec.step(tok).argmax(-1)
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    starts, ends = [], []
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            t = totals.setdefault(ev.name[:90], [0.0, 0])
            t[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            t[1] += 1
            starts.append(ev.time_range.start)
            ends.append(ev.time_range.end)
    rows = sorted(({"kernel": k, "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps}
                   for k, v in totals.items()), key=lambda r: -r["us_per_step"])
    key = fmt + ("-graphs" if graphs else "")
    res = out.setdefault("profile", {})[key] = dict(
        gpu_us_per_step=sum(r["us_per_step"] for r in rows), kernels_per_step=sum(r["calls_per_step"] for r in rows),
        span_us_per_step=(max(ends) - min(starts)) / steps if starts else None, max_len=dec.max_len,
        kernels=rows[:30])
    span = f", span {res['span_us_per_step']:.0f} us/step" if starts else ""
    print(f"\nprofile {key}: GPU busy {res['gpu_us_per_step']:.0f} us/step (batch 1){span}, "
          f"{res['kernels_per_step']:.0f} kernels a step, top kernels:")
    for r in rows[:30]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel']}")
    del dec


class _TimedStep:
    """A scheduler decode step that records (start time, batch size) of each call; everything else is the step's."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        if hasattr(inner, "launch_next"):  # the scheduler's overlapped steps are launched there, not by __call__
            self.launch_next = self._launch_next

    def _launch_next(self, n, tokens):
        self.calls.append((time.perf_counter(), n))
        return self.inner.launch_next(n, tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, model, state):
        self.calls.append((time.perf_counter(), len(state.seqs)))
        return self.inner(model, state)


def server_speed(model, device, batch, mode, prompt, steps, max_len=None, fuse=True) -> dict:
    """Tokens/s of ``batch`` concurrent greedy requests through the server's scheduler (module docstring)."""
    import threading

    from pipeline.serve.batching import DynamicCacheStep, SamplingParams, Scheduler, Sequence
    from pipeline.serve.graph_step import make_step

    t0 = time.perf_counter()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    inner = make_step(mode, model, batch, max_len or prompt + steps + 8, fuse=fuse) or DynamicCacheStep(model)
    if hasattr(inner, "warmup"):
        inner.warmup()
    step = _TimedStep(inner)
    sched = Scheduler(model, lambda ids: "", [], max_batch_size=batch, max_batch_tokens=10**9, step=step)
    g = torch.Generator().manual_seed(1)
    try:
        for n_tokens in (4, steps):  # a short warm-up round (kernels, allocator), then the timed one
            done, lock, finished = threading.Event(), threading.Lock(), []

            def sink(event, payload):
                if event in ("done", "error"):
                    with lock:
                        finished.append(payload)
                        if len(finished) == batch:
                            done.set()

            step.calls.clear()
            for _ in range(batch):
                ids = torch.randint(0, model.config.vocab_size, (prompt,), generator=g).tolist()
                sched.submit(Sequence(ids, SamplingParams(max_tokens=n_tokens, temperature=0.0), sink))
            done.wait(600)
            if n_tokens == 4:
                setup = time.perf_counter() - t0
        errors = [f for f in finished if isinstance(f, Exception)]
        if errors:
            raise errors[0]
    finally:
        sched.shutdown()
    full = [t for t, n in step.calls if n == batch]
    if len(full) < 2:
        raise RuntimeError(f"only {len(full)} steps ran the whole batch of {batch}")
    sec = full[-1] - full[0]
    fused = getattr(getattr(inner, "dec", None), "fused", None)
    return dict(tok_s=batch * (len(full) - 1) / sec, ms_per_step=1e3 * sec / (len(full) - 1), setup_s=setup,
                finite=True, prefill_ms=float("nan"), full_steps=len(full),
                fused=sorted({(f.qkv.kind, f.gate_up.kind) for f in fused}) if fused else None,
                int4_chain=sum(f.int4_chain for f in fused) if fused else 0,
                compiled_graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--group", type=int, default=128, help="group size of the INT4 formats' random codes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--formats", default=None, help="comma list (default: all for the device)")
    ap.add_argument("--modes", default=None, help="comma list of eager,graphs,graphs+compile; with --server, a "
                    "graphs mode + \"-nofuse\" keeps q|k|v and gate|up as separate products, + \"-matmulattn\" decode "
                    "attention as two matrix products instead of the split-K kernel, + \"-nochain\" INT4's norms, "
                    "SwiGLU and residual adds outside its one-token GEMVs, + \"-nodefer\" each layer adds its own "
                    "last residual, + \"-norope\" the rotary embedding and cache write outside INT4's q|k|v GEMV, "
                    "+ \"-nopdl\" every kernel launched without programmatic dependent launch, + \"-rowsQOGD\" "
                    "the INT4 chain's rows a chunk for q|k|v, o, gate|up, down (e.g. \"-rows4442\"), + \"-attn64\" "
                    "decode attention in blocks of 64 positions, + \"-ahead1\" / \"-ahead2\" every INT4 GEMV "
                    "block one / two chunks of weights ahead (by default down's, K > 8192, two, the others one), "
                    "+ \"-noattn\" no decode attention at all (a diagnostic: wrong tokens, the time of the rest), + "
                    "\"-nooverlap\" the scheduler reads each step's tokens before it launches the next")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--micro-prefill", action="store_true")
    ap.add_argument("--micro-formats", default="int4-tinygemm,int4-triton,int8,fp8")
    ap.add_argument("--server", action="store_true", help="time through the server's scheduler (docstring)")
    ap.add_argument("--max-len", type=int, default=None, help="the static cache's positions per slot (default P + "
                    "T + 8; the server itself uses 4096)")
    ap.add_argument("--repeat", type=int, default=1, help="rows per (format, batch, mode), modes interleaved; "
                    "the last table gives their medians")
    ap.add_argument("--profile", action="store_true", help="also a per-kernel GPU time profile of each format")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    global GROUP
    GROUP = a.group
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    formats = (a.formats or ("ref,int4,int4-triton,int8,fp8" if cuda else
                             "ref,int4-gptq,int4-awq,int8,fp8")).split(",")
    modes = (a.modes or ("eager,graphs" if cuda else "eager")).split(",")
    batches = [int(b) for b in a.batches.split(",")]
    out = RESULTS
    out.update(shape=a.shape, dims=SHAPES[a.shape], device=a.device, torch=torch.__version__, python=platform.python_version(),
               prompt=a.prompt, steps=a.steps, server=a.server, max_len=a.max_len, group=a.group, rows=[])
    import transformers

    out["transformers"] = transformers.__version__
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
        out["copy_bw_GBs"] = copy_bandwidth() / 1e9
        print(f"{out['gpu']}: device-to-device copy {out['copy_bw_GBs']:.0f} GB/s (read + write)", flush=True)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.micro and cuda:
        from bench.decode_micro import micro

        micro(out, a.micro_formats.split(","))
        _save(a.out)
    if a.micro_prefill and cuda:
        from bench.decode_micro import micro_prefill

        micro_prefill(out)
        _save(a.out)
    from pipeline.engines import int4_cuda

    deep = int4_cuda.AHEAD2_ABOVE_K  # the default ("-ahead1", "-ahead2" change it for their rows)
    for fmt in formats:
        model = convert(build_model(a.shape, a.device, dtype), fmt, a.device, dtype)
        nbytes = {b: weight_bytes_per_token(model, b) for b in batches}
        if a.profile and cuda:
            from pipeline.serve import decode_attention, fused_proj

            fused_proj.INT4_CHAIN = fused_proj.DEFER_RESIDUAL = fused_proj.ROPE_IN_QKV = True  # the server's step
            decode_attention.KERNEL = "auto"
            try:
                profile_step(model, fmt, out, max_len=a.max_len)
                profile_step(model, fmt, out, graphs=True, max_len=a.max_len)
            except Exception as e:  # noqa: BLE001 - the timing rows matter more
                out.setdefault("profile", {})[fmt] = dict(error=repr(e)[:300])
        for rep, batch, mode in ((r, b, m) for r in range(a.repeat) for b in batches for m in modes):  # interleaved
            try:
                if a.server:
                    from pipeline.engines import cuda_launch
                    from pipeline.serve import decode_attention, fused_proj

                    base, *flags = mode.split("-")
                    decode_attention.KERNEL = ("matmul" if "matmulattn" in flags else "skip" if "noattn" in flags
                                               else "auto")
                    from pipeline.serve import decode_attention_triton as dat

                    dat.BLOCK_L, dat.PARTIAL_WARPS = (64, 4) if "attn64" in flags else (128, 8)
                    from pipeline.serve import batching

                    batching.OVERLAP = "nooverlap" not in flags
                    fused_proj.INT4_CHAIN = "nochain" not in flags
                    fused_proj.DEFER_RESIDUAL = "nodefer" not in flags
                    fused_proj.ROPE_IN_QKV = "norope" not in flags
                    cuda_launch.PDL = "nopdl" not in flags
                    depth = {"ahead1": int4_cuda.MAX_K, "ahead2": 0}
                    int4_cuda.AHEAD2_ABOVE_K = next((v for f, v in depth.items() if f in flags), deep)
                    shape = next((f[4:] for f in flags if f.startswith("rows") and len(f) == 8), "4444")
                    fused_proj.CHAIN_ROWS = dict(zip(("qkv", "o", "gate_up", "down"), map(int, shape)))
                    r = server_speed(model, a.device, batch, base, a.prompt, a.steps, a.max_len,
                                     fuse="nofuse" not in flags)
                else:
                    r = decode_speed(model, a.device, batch, mode, a.prompt, a.steps, a.max_len)
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
                r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            r.update(format=fmt, batch=batch, mode=mode, weight_bytes=nbytes[batch], repeat=rep)
            if cuda and "tok_s" in r:
                bound_ms = 1e3 * nbytes[batch] / (out["copy_bw_GBs"] * 1e9)
                r.update(bound_ms=bound_ms, bound_pct=100 * bound_ms / r["ms_per_step"])
            out["rows"].append(r)
            print(_row(r), flush=True)
            _save(a.out)
        del model
        if cuda:
            torch.cuda.empty_cache()
    _table(out)
    if a.repeat > 1:
        _medians(out)
    _save(a.out)
    return 0


def _row(r: dict) -> str:
    head = f"{r['format']:14s} b={r['batch']} {r['mode']:15s}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    bound = f"  {r['bound_pct']:5.1f}% of bw bound" if "bound_pct" in r else ""
    return (f"{head} {r['tok_s']:9.1f} tok/s  {r['ms_per_step']:8.2f} ms/step  weights {r['weight_bytes'] / 1e9:6.2f} GB"
            f"{bound}  (setup {r['setup_s']:.1f} s, prefill {r['prefill_ms']:.1f} ms)")


def _table(out: dict) -> None:
    ref = {(r["batch"], r["mode"]): r["tok_s"] for r in out["rows"] if r["format"] == "ref" and "tok_s" in r}
    print("\n| format | batch | mode | tok/s | ms/step | weight GB/token | vs ref (same mode) | % of bw bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        if "tok_s" not in r:
            print(f"| {r['format']} | {r['batch']} | {r['mode']} | error: {r['error'][:80]} | | | | |")
            continue
        base = ref.get((r["batch"], r["mode"]))
        vs = f"{r['tok_s'] / base:.2f}x" if base else ""
        pct = f"{r['bound_pct']:.0f}%" if "bound_pct" in r else ""
        print(f"| {r['format']} | {r['batch']} | {r['mode']} | {r['tok_s']:.1f} | {r['ms_per_step']:.2f} | "
              f"{r['weight_bytes'] / 1e9:.3f} | {vs} | {pct} |")


def _medians(out: dict) -> None:
    """Median tok/s per (format, batch, mode) over the repeats, and INT4-style ratios against the reference."""
    import statistics

    groups: dict[tuple, list[float]] = {}
    for r in out["rows"]:
        if "tok_s" in r:
            groups.setdefault((r["format"], r["batch"], r["mode"]), []).append(r["tok_s"])
    med = {key: statistics.median(v) for key, v in groups.items()}
    out["medians"] = [dict(format=f, batch=b, mode=m, tok_s=v, n=len(groups[(f, b, m)]), all=groups[(f, b, m)])
                      for (f, b, m), v in med.items()]  # fmt: skip
    best_ref = {b: max(v for (f, bb, _), v in med.items() if f == "ref" and bb == b)
                for (_, b, _) in med if any(f == "ref" and bb == b for (f, bb, _) in med)}  # fmt: skip
    print("\n| format | batch | mode | median tok/s (n) | all | vs ref same mode | vs ref's best mode |")
    print("|---|---|---|---|---|---|---|")
    for (f, b, m), v in med.items():
        same = med.get(("ref", b, m))
        print(f"| {f} | {b} | {m} | {v:.1f} ({len(groups[(f, b, m)])}) | "
              f"{' / '.join(f'{x:.1f}' for x in groups[(f, b, m)])} | {f'{v / same:.2f}x' if same else ''} | "
              f"{f'{v / best_ref[b]:.2f}x' if b in best_ref else ''} |")


def _save(path):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
