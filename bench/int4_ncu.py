"""Run one Llama-3-8B layer's four one-token INT4 products (as the decode chain fuses them) a few times, for
Nsight Compute to read each kernel's counters: where the kernels of ``int4_gemv.py --chain-only`` lose bandwidth
(DRAM throughput, occupancy, what the warps wait on). The script itself only launches; ncu does the measuring:

    ncu --clock-control none --kernel-name regex:q4gemv --launch-skip 4 --launch-count 4 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 bench/int4_ncu.py [--rows 4444]

(``--rows``: rows a chunk for q|k|v, o, gate|up, down, as ``fused_proj.CHAIN_ROWS``.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from bench.decode_micro import int4_layer, random_int4

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="4444")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    rows = [int(c) for c in a.rows]
    gen = torch.Generator(device="cuda").manual_seed(0)
    d, f = 4096, 14336
    ws = [random_int4(n, k, gen) for n, k in ((6144, d), (d, d), (2 * f, d), (d, f))]
    nw = torch.rand(d, device="cuda").bfloat16() + 0.5
    h = torch.randn(1, d, device="cuda").bfloat16()
    for _ in range(a.repeat + 1):  # the first round compiles; ncu's --launch-skip 4 passes it
        h = int4_layer(h, ws, nw, rows)
    torch.cuda.synchronize()
    print("ran", a.repeat + 1, "layers, rows", a.rows, "finite:", bool(torch.isfinite(h).all()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
