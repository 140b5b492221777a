"""Experiment (issue 8 point 6): a one-token INT4 GEMV where each warp streams whole rows, against the kept one
(``pipeline.engines.int4_cuda``), whose block spans K (one 16-byte unit a thread) and meets at a block barrier
twice for every chunk of 4 rows.

Why: Nsight Compute and the layer chain put the 8B down product ([4096, 14336], one 448-thread block an SM) at
~2.35 TB/s alone where gate|up reaches ~3.4; with one block an SM every chunk's two barriers stall the whole SM,
and the block of the next kernel cannot start beside it. Here the block first stages the token in shared memory
as the same 16-bit fixed point, split in bytes (72 bytes a 32-column unit), then each warp takes ``R`` rows and
walks K itself (lane l: units l, l + 32, ...), ``AH`` units of weights in flight, and reduces its rows once at the
end with shuffles: no barrier after the staging. The arithmetic of a unit is the kept kernel's (the same dp4a
products and float expression), so outputs differ only in the order of the float sums.

Status: written in the eighth session, when the session's device time was already spent: **not yet run on a
GPU**, so nothing in bench/RESULTS.md comes from it. Checked here only so far: every variant compiles for sm_90
without spills (NVRTC + ptxas, 71-128 registers), and a Python transliteration of its loop visits every (row,
unit) once and writes every row once. It takes K a multiple of 1024 (whole 32-unit passes of a warp; 8B's widths
are): a product version needs a tail for widths like 11008.

Prints microseconds and GB/s per product (bf16 cuBLAS, the kept kernel, each variant), each variant's largest
difference from the kept kernel, and an 8B layer chain with down replaced; writes JSON.

    python3 bench/int4_warp_gemv.py --out bench/results_int4_warp_gemv_h200.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_micro import gpu_results, graph_time, int4_layer, random_int4, save_json  # noqa: E402

WARP_SOURCE = r"""
template <int R, int KT, int AH, int EPI, bool BF16>
__device__ __forceinline__ void q4warp(const u16* __restrict__ x, const u16* __restrict__ res,
                                       const uint4* __restrict__ qw, const u32* __restrict__ sz,
                                       u16* __restrict__ out, int N, int G) {
  constexpr int IT = KT / 32, NB = AH + 1;
  __shared__ uint4 sx[4][KT];  // per unit: high bytes words 0-3, 4-7, low bytes words 0-3, 4-7
  __shared__ float sxs[KT];
  __shared__ int sxsum[KT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int groups = (N + R - 1) / R, gpr = KT * 32 / G;
  const int grp = blockIdx.x * W + warp, stride = gridDim.x * W;
  const int total = grp < groups ? ((groups - 1 - grp) / stride + 1) * IT : 0;
  uint4 w[NB][R];
  u32 s[NB][R];
  auto load = [&](uint4 (&lw)[R], u32 (&ls)[R], int j) {
    const int g = grp + (j / IT) * stride, u = lane + 32 * (j % IT);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = g * R + r;
      const bool ok = n < N;
      lw[r] = ok ? load_stream(qw + (size_t)n * KT + u) : make_uint4(0u, 0u, 0u, 0u);
      ls[r] = ok ? __ldg(sz + (size_t)n * gpr + (u * 32) / G) : 0u;
    }
  };
#pragma unroll
  for (int b = 0; b < AH; ++b)
    if (b < total) load(w[b], s[b], b);
  grid_launch_next();
  grid_wait();
  for (int u = threadIdx.x; u < KT; u += blockDim.x) {  // the token as fixed point, as q4gemv does it
    float xv[32];
    load_act32(xv, x + u * 32, BF16);
    u32 xh[8], xl[8];
    float xscale = 0.f;
    int xsum = 0;
    const bool finite = to_fixed32(xv, xh, xl, xscale, xsum);
    sx[0][u] = make_uint4(xh[0], xh[1], xh[2], xh[3]);
    sx[1][u] = make_uint4(xh[4], xh[5], xh[6], xh[7]);
    sx[2][u] = make_uint4(xl[0], xl[1], xl[2], xl[3]);
    sx[3][u] = make_uint4(xl[4], xl[5], xl[6], xl[7]);
    sxs[u] = finite ? xscale : __int_as_float(0x7fc00000);
    sxsum[u] = xsum;
  }
  __syncthreads();
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  float side = 0.f;
  for (int j0 = 0; j0 < total; j0 += NB) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const int j = j0 + b;
      if (j >= total) break;
      if (j + AH < total) load(w[(b + AH) % NB], s[(b + AH) % NB], j + AH);
      const int i = j % IT, g = grp + (j / IT) * stride;
      if (EPI == 1 && i == 0) {
        const int n = g * R + lane / (32 / R);
        side = (lane & (32 / R - 1)) == 0 && n < N ? act_to_f32(res[n], BF16) : 0.f;
      }
      const int u = lane + 32 * i;
      const uint4 h0 = sx[0][u], h1 = sx[1][u], l0 = sx[2][u], l1 = sx[3][u];
      const u32 xh[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
      const u32 xl[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
      const float xscale = sxs[u];
      const int xsum = sxsum[u];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        acc[r] += unit_dot(w[b][r], s[b][r], xh, xl, xscale, xsum);
      }
      if (i == IT - 1) {
        const int row = g * R + warp_sum_rows<R>(acc, lane);
        if ((lane & (32 / R - 1)) == 0 && row < N)
          out[row] = EPI == 1 ? f32_to_act(side + round_act(acc[0], BF16), BF16) : f32_to_act(acc[0], BF16);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = 0.f;
      }
    }
  }
}
#define WARP_ENTRY(NAME, WARPS, BLOCKS, R, KT, AH, EPI, BF16)                                              \
  extern "C" __global__ void __launch_bounds__(WARPS * 32, BLOCKS)                                        \
  NAME(const u16* x, const u16* res, const uint4* qw, const u32* sz, u16* out, int N, int G) {            \
    q4warp<R, KT, AH, EPI, BF16>(x, res, qw, sz, out, N, G);                                               \
  }
"""


@functools.cache
def variant(k: int, rows: int, ahead: int, residual: bool, warps: int = 8, blocks: int = 2):
    from pipeline.engines import int4_cuda
    from pipeline.engines.int4_cuda_kernel import SOURCE

    name = f"q4warp_r{rows}_a{ahead}_k{k // 32}_e{int(residual)}_w{warps}_b{blocks}"
    src = SOURCE + WARP_SOURCE + f"WARP_ENTRY({name}, {warps}, {blocks}, {rows}, {k // 32}, {ahead}, " \
                                 f"{int(residual)}, true)\n"
    kernel = int4_cuda.compiled(src, name)
    resident = int4_cuda.resident_blocks(src, name, warps * 32)
    return kernel, resident


def warp_gemv(x, qweight, sz, group, rows, ahead, residual=None, warps=8, blocks=2):
    from pipeline.engines import int4_cuda
    from pipeline.engines.cuda_launch import launch

    n, k = qweight.shape[0], qweight.shape[1] * 8
    kernel, resident = variant(k, rows, ahead, residual is not None, warps, blocks)
    groups = -(-n // rows)
    grid = max(1, min(-(-groups // warps), resident * int4_cuda.sm_count(x.device.index or 0)))
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    launch(kernel, (grid, 1, 1), (warps * 32, 1, 1), [x, residual if residual is not None else x, qweight, sz, out,
                                                      n, group])
    return out


def weights(n: int, k: int, count: int, seed: int = 0):
    """``count`` random weights (zero points drawn per group, so the products' zero term is exercised)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [random_int4(n, k, gen, zero=None) for _ in range(count)]


VARIANTS = [(1, 3), (1, 6), (2, 3), (2, 5), (4, 2), (4, 3)]  # (rows a warp, units ahead)
SHAPES = {"8b down +residual": (4096, 14336, True), "8b down": (4096, 14336, False), "8b o": (4096, 4096, False),
          "8b gate|up": (28672, 4096, False), "8b q|k|v": (6144, 4096, False)}


def speed() -> list[dict]:
    from pipeline.engines import int4_cuda

    out = []
    for label, (n, k, resid) in SHAPES.items():
        count = max(2, int(4e8 // (n * k // 2)))
        ws = weights(n, k, count)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, n, device="cuda", dtype=torch.bfloat16) if resid else None
        kept = int4_cuda.gemv(x, *ws[0], residual=r)
        row = dict(shape=label, n=n, k=k, residual=resid)
        nbytes = n * k // 2 + n * (k // 128) * 4
        lins = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        t = graph_time([lambda m=m: m(x) for m in lins])
        row["bf16"] = dict(us=t * 1e6, gb_s=n * k * 2 / t / 1e9)
        del lins
        t = graph_time([lambda w=w: int4_cuda.gemv(x, *w, residual=r) for w in ws])
        row["kept"] = dict(us=t * 1e6, gb_s=nbytes / t / 1e9)
        for rows, ahead in VARIANTS:
            for warps, blocks in ((8, 2), (4, 4)):
                key = f"R{rows} AH{ahead} W{warps}"
                try:
                    y = warp_gemv(x, *ws[0], rows, ahead, r, warps, blocks)
                    t = graph_time([lambda w=w: warp_gemv(x, *w, rows, ahead, r, warps, blocks) for w in ws])
                except Exception as e:  # a variant that does not compile or launch: say so, go on
                    row[key] = dict(error=str(e).splitlines()[0][:200])
                    continue
                diff = ((y.float() - kept.float()).abs().max() / kept.float().abs().max()).item()
                row[key] = dict(us=t * 1e6, gb_s=nbytes / t / 1e9, max_rel_diff_vs_kept=diff)
        out.append(row)
        print(f"{label:18s} " + "  ".join(f"{nm} {v['us']:5.1f}us/{v['gb_s']:5.0f}" for nm, v in row.items()
                                          if isinstance(v, dict) and "us" in v), flush=True)
        del ws
        torch.cuda.empty_cache()
    return out


def chain(best: tuple[int, int, int], layers: int = 8) -> dict:
    """The layer chain of bench/int4_gemv.py (norm + q|k|v, o + residual, norm + gate|up + SwiGLU, down +
    residual, each reading the one before) with the kept down and with ``best`` (rows, ahead, warps)."""
    d, f = 4096, 14336
    shapes = ((6144, d), (d, d), (2 * f, d), (d, f))
    ws = [[weights(n, k, 1, seed=10 * i + j)[0] for j, (n, k) in enumerate(shapes)] for i in range(layers)]
    nw = torch.rand(d, device="cuda").bfloat16() + 0.5
    state = {"h": torch.randn(1, d, device="cuda").bfloat16()}
    rows, ahead, warps = best

    def warp_down(m, w, residual):
        return warp_gemv(m, *w, rows, ahead, residual, warps, 16 // warps)

    def layer(i, swap):
        state["h"] = int4_layer(state["h"], ws[i], nw, down=warp_down if swap else None)

    out = {}
    for _ in range(3):
        for key, flag in (("kept", False), ("warp down", True)):
            us = 1e6 * graph_time([lambda i=i, fl=flag: layer(i, fl) for i in range(layers)], iters=64)
            out.setdefault(key, []).append(us)
    for key, v in out.items():
        print(f"layer chain, {key:10s}: {min(v):6.1f} us a layer ({' / '.join(f'{t:.1f}' for t in v)})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = gpu_results()
    if res is None:
        return
    res["speed"] = speed()
    save_json(args.out, res)
    down = next(r for r in res["speed"] if r["shape"] == "8b down +residual")
    timed = [(v["us"], key) for key, v in down.items() if key.startswith("R") and "us" in v]
    if timed:
        key = min(timed)[1]
        rows, ahead, warps = (int(p[1:] if p[0] != "A" else p[2:]) for p in key.split())
        res["chain_best"] = key
        res["chain"] = chain((rows, ahead, warps))
    save_json(args.out, res)


if __name__ == "__main__":
    main()
