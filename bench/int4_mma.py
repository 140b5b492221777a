"""INT4 products of 2-16 tokens (``pipeline.engines.int4_mma``): exactness against its reference and float64, and
microseconds per product against bf16 cuBLAS and PyTorch's int4 kernel (tinygemm) on the Llama-3-8B shapes,
inside CUDA graphs rotating over enough weights to defeat L2 (``decode_micro.graph_time``). Needs a CUDA GPU.

    python3 bench/int4_mma.py --out bench/results_int4_mma_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_micro import gpu_results, graph_time, save_json  # noqa: E402

SHAPES = {"q|k|v": (6144, 4096), "o": (4096, 4096), "gate|up": (28672, 4096), "down": (4096, 14336)}
CONFIGS = ((2, 16, 1), (2, 16, 2), (4, 8, 1), (4, 16, 1))  # (tiles of 8 rows, warps, min blocks an SM)


def _weight(n: int, k: int, group: int, gen: torch.Generator):
    from pipeline.engines import int4_cuda, int4_mma, int4_triton

    q = torch.randint(0, 16, (n, k), device="cuda", generator=gen)
    s = (torch.rand(n, k // group, device="cuda", generator=gen) * 2e-3 + 1e-3).half().float()
    z = torch.randint(0, 16, (n, k // group), device="cuda", generator=gen)
    qweight = int4_triton.repack(q, s, z, "cuda")["qweight"]
    return q, s, z, int4_mma.pack(qweight), int4_cuda.pack_scale_zero(s, z)


def exactness() -> list[dict]:
    from pipeline.engines import int4_mma

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n, k, group in [(64, 256, 128), (40, 512, 32), (24, 1024, 64), (4096, 4096, 128), (1024, 14336, 128)]:
        q, s, z, qm, sz = _weight(n, k, group, gen)
        w = ((q.reshape(n, -1, group) - z[..., None]).double() * s[..., None].double()).reshape(n, k)
        for m in (1, 2, 5, 8, 9, 16):
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            y = int4_mma.matmul(x, qm, sz, group).double()
            ref = int4_mma.reference(x, qm, sz, group).double()
            exact = x.double() @ w.t()
            rows.append(dict(n=n, k=k, group=group, m=m, vs_reference=((y - ref).norm() / ref.norm()).item(),
                             vs_float64=((y - exact).norm() / exact.norm()).item()))
    return rows


def speed(ms=(1, 2, 4, 8, 16), group: int = 128) -> list[dict]:
    from pipeline.engines import int4_mma
    from pipeline.engines.qlinear import KERNEL_CUDA, Int4Linear
    from pipeline.quant.primitives import QuantizedWeight

    out = []
    for label, (n, k) in SHAPES.items():
        reps = max(2, int(4e8 // (n * k * 2)))
        gen = torch.Generator(device="cuda").manual_seed(1)
        lins = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(min(reps, 8))]
        mods, packs = [], []
        for _ in range(reps):
            q, s, z, qm, sz = _weight(n, k, group, gen)
            mods.append(Int4Linear(QuantizedWeight(q.int(), s, z.int(), 4, group), device="cuda", dtype=torch.bfloat16,
                                   kernel=KERNEL_CUDA))  # tinygemm's
            packs.append((qm, sz))
        for m in ms:
            x = torch.randn(m, k, device="cuda").bfloat16()
            res = {"bf16": graph_time([lambda t=t: t(x) for t in lins])}
            if getattr(mods[0], "weight_int4pack", None) is not None:  # tinygemm takes groups of 32 and up
                res["tinygemm"] = graph_time([lambda t=t: t._run_packed(x) for t in mods])
            for tiles, warps, blocks in CONFIGS:
                res[f"mma t{tiles} w{warps} b{blocks}"] = graph_time([
                    lambda p=p, t=tiles, w=warps, b=blocks: int4_mma.matmul(x, p[0], p[1], group, t, w, b)
                    for p in packs])
            q4_bytes = n * k // 2 + n * (k // group) * 4
            row = dict(shape=label, n=n, k=k, m=m, group=group)
            for name, t in res.items():
                row[name] = dict(us=t * 1e6, gb_s=(n * k * 2 if name == "bf16" else q4_bytes) / t / 1e9)
            out.append(row)
            print(f"{label:8s} g{group} M={m:2d}  " + "  ".join(f"{nm} {v['us']:6.1f}"
                                                      for nm, v in row.items() if isinstance(v, dict)), flush=True)
        del lins, mods, packs
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--groups", default="128", help="comma list of group sizes to time (e.g. 32,64,128)")
    ap.add_argument("--tokens", default="1,2,4,8,16", help="comma list of token counts to time")
    a = ap.parse_args(argv)
    res = gpu_results()
    if res is None:
        return 0
    res["exactness"] = exactness()
    print("exactness: worst relative error against the reference "
          f"{max(r['vs_reference'] for r in res['exactness']):.2e}, against float64 "
          f"{max(r['vs_float64'] for r in res['exactness']):.2e}", flush=True)
    save_json(a.out, res)
    tokens = tuple(int(m) for m in a.tokens.split(","))
    res["speed"] = [row for g in a.groups.split(",") for row in speed(tokens, int(g))]
    save_json(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
