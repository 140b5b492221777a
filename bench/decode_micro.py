"""Per-linear kernel times for ``decode_speed.py --micro`` / ``--micro-prefill`` and ``int4_gemv.py``: each kernel
called in rotation over enough weights to defeat L2 inside one CUDA graph (:func:`graph_time`), so launch gaps
are out as the decode graphs see them; and what the GPU benches share (:func:`random_int4`, :func:`int4_layer`).
CUDA only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_speed import _random_qweight, quantized_linear  # noqa: E402


def micro(out: dict, formats=("int4-tinygemm", "int4-triton", "int8", "fp8")) -> None:
    """Per-linear kernel times on the 8B shapes (median of event-timed loops over rotating weights)."""
    shapes = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
    rows = []
    for label, (n, k) in shapes.items():
        reps = max(2, int(4e8 // (n * k * 2)))  # > 400 MB of bf16 weights in rotation: no L2 reuse
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        mods = {"bf16": [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(reps)]}
        for fmt in formats:
            mods[fmt] = [quantized_linear(fmt, lin, "cuda", torch.bfloat16) for _ in range(reps)]
        try:
            mods["int4-gemlite"] = [_gemlite(n, k) for _ in range(reps)]
        except Exception as e:  # noqa: BLE001 - optional comparison
            out.setdefault("gemlite_error", repr(e)[:300])
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for fmt, ms in mods.items():
                try:
                    t = _bench_mods(ms, x)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(shape=label, n=n, k=k, m=m, fmt=fmt, error=repr(e)[:200]))
                    continue
                nbytes = sum(b.numel() * b.element_size() for b in list(ms[0].parameters()) + list(ms[0].buffers()))
                if fmt == "int4-gemlite":
                    nbytes = n * k // 2 + 2 * (n * k // 128) * 2
                rows.append(dict(shape=label, n=n, k=k, m=m, fmt=fmt, us=t * 1e6, gb_s=nbytes / t / 1e9))
        del mods
        torch.cuda.empty_cache()
    from pipeline.engines import int4_triton

    out["micro"] = rows
    out["int4_triton_configs"] = int4_triton.tuned_configs()
    print("\nper-linear kernels, us (GB/s of weight bytes)")
    for r in rows:
        print(f"  {r['shape']:8s} M={r['m']} {r['fmt']:14s} " + (f"{r['us']:8.1f} us {r['gb_s']:7.0f} GB/s" if "us"
                                                                   in r else r["error"]))


def micro_prefill(out: dict, m: int = 2048) -> None:
    """Prefill-sized products (M = 2048 tokens): bf16 cuBLAS, tinygemm, and Int4Linear's CUDA path (dequantize
    into a bf16 scratch + cuBLAS)."""
    rows = []
    for label, (n, k) in {"q/o": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        q4 = quantized_linear("int4", lin, "cuda", torch.bfloat16)
        tiny = quantized_linear("int4-tinygemm", lin, "cuda", torch.bfloat16)  # auto keeps no tinygemm copy
        fns = {"bf16": lin, "int4 dequant+cuBLAS": q4, "int4 tinygemm": lambda x, t=tiny: t._run_packed(x)}
        for name, fn in fns.items():
            t = _bench_mods([fn], x, iters=20)
            rows.append(dict(shape=label, m=m, path=name, ms=t * 1e3, tflops=2 * m * n * k / t / 1e12))
    out["micro_prefill"] = rows
    print(f"\nprefill products, M={m}")
    for r in rows:
        print(f"  {r['shape']:8s} {r['path']:22s} {r['ms']:7.3f} ms {r['tflops']:6.0f} TFLOP/s")


def _gemlite(n: int, k: int):
    import gemlite
    from gemlite.helper import A16Wn

    cfg = Path(gemlite.__file__).parent / "configs" / "h100.json"
    gemlite.core.GemLiteLinearTriton.load_config(str(cfg))
    qw = _random_qweight(n, k, "cuda")
    return A16Wn(device="cuda:0", dtype=torch.bfloat16).from_weights(
        qw.w_int.to(torch.uint8), qw.scales.to(torch.bfloat16), qw.zeros.to(torch.bfloat16), 4, 128)


def _bench_mods(mods, x, iters: int = 200) -> float:
    return graph_time([lambda m=m: m(x) for m in mods], iters)


def gpu_results() -> dict | None:
    """The start of a GPU bench's JSON (the GPU, torch, Python), or None after saying there is no CUDA device."""
    import platform

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (this bench needs an NVIDIA GPU)")
        return None
    return dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, python=platform.python_version())


def save_json(path: str | None, res: dict) -> None:
    """Write a GPU bench's results so far to ``path`` (if given): benches save after each part, so a call that
    runs out of time keeps what it measured."""
    if path:
        Path(path).write_text(json.dumps(res, indent=1))


def graph_time(fns, iters: int = 200) -> float:
    """Seconds per call of ``fns`` (called in rotation) inside one CUDA graph of ``iters`` calls: launch gaps out,
    as the decode graphs see them; the median of 5 replays."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fns[i % len(fns)]()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / iters)
    return sorted(times)[2]


def random_int4(n: int, k: int, gen: torch.Generator, group: int = 128, zero: int | None = 8):
    """A random [N, K] INT4 weight for timing, as ``int4_cuda.gemv`` takes it: (codes int32 [N, K / 8], scale
    words (scales in [1e-3, 3e-3), zero point ``zero``, or drawn per group from 0..15 where None), group), drawn
    from ``gen`` (CUDA)."""
    from pipeline.engines import int4_cuda

    q = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32, generator=gen)
    s = torch.rand(n, k // group, device="cuda", generator=gen) * 2e-3 + 1e-3
    z = (torch.full_like(s, zero, dtype=torch.int32) if zero is not None
         else torch.randint(0, 16, s.shape, device="cuda", dtype=torch.int32, generator=gen))  # fmt: skip
    return q, int4_cuda.pack_scale_zero(s, z), group


def int4_layer(h: torch.Tensor, ws, norm_weight: torch.Tensor, rows=(None, None, None, None), down=None):
    """One Llama layer's four one-token INT4 products as the decode chain fuses them (norm + q|k|v, o + residual,
    norm + gate|up + SwiGLU, down + residual), each reading the one before: ``ws`` their :func:`random_int4`
    weights, ``rows`` rows a chunk of each (None: the default), ``down(m, weight, residual)`` a stand-in for the
    last product. Returns the layer's output."""
    from pipeline.engines import int4_cuda

    d = h.shape[-1]
    a = int4_cuda.gemv(h, *ws[0], rows[0], norm_weight=norm_weight, eps=1e-5)[:, :d]
    h = int4_cuda.gemv(a, *ws[1], rows[1], residual=h)
    m = int4_cuda.gemv(h, *ws[2], rows[2], norm_weight=norm_weight, eps=1e-5, swiglu=True)
    return down(m, ws[3], h) if down is not None else int4_cuda.gemv(m, *ws[3], rows[3], residual=h)
