"""One-token INT4 GEMV on CUDA: our NVRTC kernel (``pipeline.engines.int4_cuda``) against PyTorch's tinygemm and
bf16 cuBLAS, per Llama-3-8B / 70B linear shape (and the fused q|k|v and gate|up shapes), with its rows-per-block
choices, plus an exactness check against the float64 product. Prints a table, writes JSON.

Timing as in ``decode_speed.py --micro``: calls captured in one CUDA graph rotating over > 400 MB of weights (no
L2 reuse), median of 5 replays; GB/s counts the weight bytes the call reads (codes + one 32-bit word per group
for ours; tinygemm's packed codes + its bf16 scale/zero pairs).

    python3 bench/int4_gemv.py --out bench/results_int4_gemv_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_micro import gpu_results, graph_time, int4_layer, random_int4, save_json  # noqa: E402

SHAPES = {  # label: (N, K)
    "8b q/o": (4096, 4096), "8b k/v": (1024, 4096), "8b qkv fused": (6144, 4096), "8b gate/up": (14336, 4096),
    "8b gate|up fused": (28672, 4096), "8b down": (4096, 14336), "70b q/o": (8192, 8192),
    "70b gate|up fused": (57344, 8192), "70b down": (8192, 28672), "odd 11008": (4096, 11008),
}


def exactness() -> list[dict]:
    from pipeline.engines import int4_cuda, int4_triton

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k, group, dtype in [(48, 256, 64, torch.bfloat16), (40, 512, 128, torch.float16), (37, 1024, 32, torch.bfloat16),
                               (300, 11008, 128, torch.bfloat16), (64, 28672, 128, torch.float16),
                               (16, 4096, 4096, torch.bfloat16)]:
        q = torch.randint(0, 16, (n, k), device="cuda", generator=g)
        s = (torch.rand(n, k // group, device="cuda", generator=g) * 0.02 + 0.01).to(dtype).float()
        z = torch.randint(0, 16, (n, k // group), device="cuda", generator=g)
        w = ((q.reshape(n, -1, group) - z[..., None]).double() * s[..., None].double()).reshape(n, k)
        t = int4_triton.repack(q, s, z, "cuda")
        sz = int4_cuda.pack_scale_zero(s, z)
        x = torch.randn(1, k, device="cuda", generator=g).to(dtype)
        ref = x.double() @ w.t()
        for r in int4_cuda.ROWS:
            y = int4_cuda.gemv(x, t["qweight"], sz, group, rows=r)
            rel = ((y.double() - ref).norm() / ref.norm()).item()
            rows.append(dict(n=n, k=k, group=group, dtype=str(dtype), rows=r, rel_err=rel, shape=list(y.shape)))
    return rows


def speed(shapes: dict) -> list[dict]:
    from pipeline.engines import int4_cuda, qlinear
    from pipeline.quant.primitives import QuantizedWeight

    out = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for label, (n, k) in shapes.items():
        reps = max(2, int(4e8 // (n * k * 2)))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        lins = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(min(reps, 8))]
        res = {"bf16": graph_time([lambda m=m: m(x) for m in lins])}
        del lins
        mods, tiny = [], []  # ours ("auto", which keeps no tinygemm copy) and tinygemm's
        for i in range(reps):
            gen = torch.Generator(device="cuda").manual_seed(i)
            qw = QuantizedWeight(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32, generator=gen),
                                 (torch.rand(n, k // 128, device="cuda", generator=gen) * 2e-3 + 1e-3).half().float(),
                                 torch.randint(4, 12, (n, k // 128), device="cuda", dtype=torch.int32, generator=gen),
                                 4, 128)
            mods.append(qlinear.Int4Linear(qw, device="cuda", dtype=torch.bfloat16, kernel="auto"))
            tiny.append(qlinear.Int4Linear(qw, device="cuda", dtype=torch.bfloat16, kernel=qlinear.KERNEL_CUDA))
        if not mods[0].gemv_cuda:
            out.append(dict(shape=label, n=n, k=k, error="int4_cuda unavailable: see the log"))
            continue
        res["tinygemm"] = graph_time([lambda m=m: m._run_packed(x) for m in tiny])
        del tiny
        default = int4_cuda.launch_shape(n, k, sms)
        res["ours default"] = graph_time([lambda m=m: int4_cuda.gemv(x, m.qweight, m.scale_zero, 128) for m in mods])
        for r in ((2, *int4_cuda.ROWS) if k <= int4_cuda.WIDE_K else (2,)):
            for bps in (1, 2, 4, 8):
                res[f"R{r}/b{bps}"] = graph_time([lambda m=m, r=r, b=bps: int4_cuda.gemv(
                    x, m.qweight, m.scale_zero, 128, rows=r, blocks_per_sm=b) for m in mods])
        h, nw = torch.randn(1, k, device="cuda").bfloat16(), torch.rand(k, device="cuda").bfloat16()
        res_n = torch.randn(1, n, device="cuda").bfloat16()
        fusions = {"+rmsnorm": dict(norm_weight=nw, eps=1e-5), "+residual": dict(residual=res_n),
                   "+rmsnorm+swiglu": dict(norm_weight=nw, eps=1e-5, swiglu=True)}  # fused_proj's one-token chain
        for fname, kw in fusions.items():
            for bps in (None, 1, 2, 4):
                res[f"ours{fname}" + (f"/b{bps}" if bps else "")] = graph_time([
                    lambda m=m, b=bps, kw=kw: int4_cuda.gemv(h, m.qweight, m.scale_zero, 128, blocks_per_sm=b, **kw)
                    for m in mods])  # fmt: skip
        q4_bytes = n * k // 2 + n * (k // 128) * 4
        row = dict(shape=label, n=n, k=k, default=default, bf16_bytes=n * k * 2, q4_bytes=q4_bytes)
        for name, t in res.items():
            nbytes = n * k * 2 if name == "bf16" else q4_bytes
            row[name] = dict(us=t * 1e6, gb_s=nbytes / t / 1e9)
        out.append(row)
        print(f"{label:18s} " + "  ".join(f"{nm} {v['us']:6.1f}us/{v['gb_s']:5.0f}" for nm, v in row.items()
                                          if isinstance(v, dict)) + f"  (default rows/blocks {default})", flush=True)
        del mods
        torch.cuda.empty_cache()
    return out


def layer_chain(layers: int = 8) -> dict:
    """A graph of Llama-3-8B layers' four one-token products as the decode chain runs them (norm + q|k|v, o +
    residual, norm + gate|up + SwiGLU, down + residual), each reading the one before, over ``layers`` layers'
    weights in rotation (no L2 reuse): plain launches, programmatic dependent launch (``cuda_launch.PDL``), and
    with PDL every block one or two chunks ahead (``int4_cuda.ahead``; by default down's two, the others' one);
    each product alone over the layers; and a graph of 200 dependent 64-row
    products (nearly nothing but launch latency). Microseconds a layer / a product."""
    from pipeline.engines import cuda_launch, int4_cuda

    gen = torch.Generator(device="cuda").manual_seed(0)

    def weight(n, k):
        return random_int4(n, k, gen, min(128, k))

    d, f = 4096, 14336
    ws = [(weight(6144, d), weight(d, d), weight(2 * f, d), weight(d, f)) for _ in range(layers)]
    nw = torch.rand(d, device="cuda").bfloat16() + 0.5
    x = torch.randn(1, d, device="cuda").bfloat16()
    cfg = {"rows": 4}

    def layer(i, h):
        return int4_layer(h, ws[i], nw, (cfg["rows"],) * 4)

    state = {"h": x}

    def step(i):
        state["h"] = layer(i, state["h"])

    inputs = {d: x, f: torch.randn(1, f, device="cuda").bfloat16()}

    def alone(j):  # product j of every layer, each on the same input
        return [lambda i=i: int4_cuda.gemv(inputs[ws[i][j][0].shape[1] * 8], *ws[i][j], cfg["rows"])
                for i in range(layers)]

    tiny = weight(64, 64)  # K = 64: one warp a block, nothing to read but 2 KB
    small = {"h": x[:, :64].clone()}

    def tiny_step():
        small["h"] = int4_cuda.gemv(small["h"], *tiny)

    deep = int4_cuda.AHEAD2_ABOVE_K
    configs = {"plain": (False, 4, deep), "pdl": (True, 4, deep), "pdl one ahead": (True, 4, int4_cuda.MAX_K),
               "pdl two ahead": (True, 4, 0)}
    out = {}
    for _ in range(2):
        for key, (pdl, rows, above) in configs.items():
            cuda_launch.PDL = pdl
            int4_cuda.AHEAD2_ABOVE_K = above
            cfg.update(rows=rows)
            out.setdefault(f"layer {key}", []).append(
                1e6 * graph_time([lambda i=i: step(i) for i in range(layers)], iters=64))
            for j, name in enumerate(("q|k|v", "o", "gate|up", "down")):
                out.setdefault(f"{name} alone {key}", []).append(1e6 * graph_time(alone(j), iters=64))
            if rows == 4:
                out.setdefault(f"64-row product {key}", []).append(1e6 * graph_time([tiny_step]))
    cuda_launch.PDL, int4_cuda.AHEAD2_ABOVE_K = True, deep
    res = {name: min(v) for name, v in out.items()}
    for k, v in res.items():
        print(f"layer chain: {k:32s} {v:6.1f} us  ({' / '.join(f'{t:.1f}' for t in out[k])})", flush=True)
    return dict(us=res, all=out)


def speed_int8(shapes: dict) -> list[dict]:
    """The W8A8 one-token GEMV (``int8_cuda``) against ``_int_mm`` padded to 17 rows, int8 weight bytes."""
    from pipeline.engines import int8_cuda
    from pipeline.engines.int8_linear import int8_matmul

    out = []
    for label, (n, k) in shapes.items():
        if int8_cuda.problem(n, k, torch.device("cuda")):
            continue
        reps = max(2, int(4e8 // (n * k)))
        ws = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(reps)]
        sc = torch.rand(n, device="cuda") * 1e-3
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        xq = torch.randint(-127, 128, (1, k), device="cuda", dtype=torch.int8)
        res = {"int8 ours (quantizes x too)": graph_time([lambda w=w: int8_cuda.gemv(x, w, sc) for w in ws]),
               "int8 _int_mm (x already int8)": graph_time([lambda w=w: int8_matmul(xq, w) for w in ws])}
        row = dict(shape=label, n=n, k=k, **{nm: dict(us=t * 1e6, gb_s=n * k / t / 1e9) for nm, t in res.items()})
        out.append(row)
        print(f"{label:18s} " + "  ".join(f"{nm} {v['us']:6.1f}us/{v['gb_s']:5.0f}" for nm, v in row.items()
                                          if isinstance(v, dict)), flush=True)
        del ws
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--chain-only", action="store_true", help="only the exactness check and the layer chain")
    a = ap.parse_args(argv)
    res = gpu_results()
    if res is None:
        return 0
    res["exactness"] = exactness()
    worst = max(r["rel_err"] for r in res["exactness"])
    print(f"exactness: worst relative error against float64 {worst:.2e} over {len(res['exactness'])} cases")
    res["layer_chain"] = layer_chain()
    save_json(a.out, res)
    if a.chain_only:
        return 0
    res["speed"] = speed({s: SHAPES[s] for s in a.shapes.split(",")})
    save_json(a.out, res)
    res["speed_int8"] = speed_int8({s: SHAPES[s] for s in a.shapes.split(",")})
    save_json(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
