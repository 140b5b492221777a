"""One-token FP8 products on CUDA: ``Fp8Linear`` through our GEMV (``pipeline.engines.fp8_cuda``) against its
other paths (per channel: ``torch._scaled_mm``; 128x128 blocks: dequantize + matmul) and bf16 cuBLAS, on the
Llama-3-8B decode shapes. Calls captured in one CUDA graph rotating over > 400 MB of weights (no L2 reuse), median
of 5 replays (``decode_micro.graph_time``). Prints a table, writes JSON.

    python3 bench/fp8_gemv.py --out bench/results_fp8_gemv_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_micro import gpu_results, graph_time, save_json  # noqa: E402

SHAPES = {"q|k|v": (6144, 4096), "o": (4096, 4096), "gate|up": (28672, 4096), "down": (4096, 14336)}


def speed() -> list[dict]:
    from pipeline.engines.fp8_linear import Fp8Linear
    from pipeline.quant import fp8 as q

    rows = []
    for label, (n, k) in SHAPES.items():
        reps = max(2, int(4e8 // (n * k)))
        gen = torch.Generator(device="cuda").manual_seed(0)
        w = [torch.randn(n, k, generator=gen, device="cuda") for _ in range(min(reps, 2))]
        dense = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(reps // 2 + 1)]
        channel = [Fp8Linear(*q.quantize_fp8_per_channel(w[i % len(w)]), device="cuda", dtype=torch.bfloat16)
                   for i in range(reps)]  # fmt: skip
        blocks = [Fp8Linear(*q.quantize_fp8_block(w[i % len(w)], q.BLOCK), q.BLOCK, device="cuda",
                            dtype=torch.bfloat16) for i in range(reps)]  # fmt: skip
        x = torch.randn(1, k, device="cuda").bfloat16()
        row = dict(shape=label, n=n, k=k, bf16=1e6 * graph_time([lambda m=m: m(x) for m in dense]))
        for name, mods in (("per channel", channel), ("blocks", blocks)):
            row[f"{name}, ours"] = 1e6 * graph_time([lambda m=m: m(x) for m in mods])
            for m in mods:
                m.gemv_cuda = False  # the module's other path: _scaled_mm, or dequantize + matmul
            row[f"{name}, {mods[0].kernel}"] = 1e6 * graph_time([lambda m=m: m(x) for m in mods], iters=20)
        rows.append(row)
        print(f"{label:8s} " + "  ".join(f"{key} {v:7.1f}us" for key, v in row.items() if isinstance(v, float)),
              flush=True)
        del dense, channel, blocks
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = gpu_results()
    if res is None:
        return 0
    res["speed_us"] = speed()
    save_json(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
