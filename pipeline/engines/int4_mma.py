"""INT4 products of 2 to 16 tokens on NVIDIA tensor cores, in CUDA C compiled with NVRTC at first use (as
:mod:`pipeline.engines.int4_cuda`'s one-token GEMV is).

Why by hand: at 2-16 tokens a decode step is still bound by reading the weights, and PyTorch's int4 kernel
(tinygemm) ran the Llama-3-8B shapes at M = 8 slower than bf16 cuBLAS on the H200 (gate/up 40.6 against
30.3 us, bench/RESULTS.md), so INT4 decoded 8 sequences at 0.81x bf16; gemlite 0.6 was no faster. Marlin and
Machete, which do this well, ship inside vLLM's and TensorRT-LLM's own builds only.

Layout (:func:`pack`): ``qmma`` int32 [N / 8, K / 128, 32, 4]: for each tile of 8 output rows and each 128 codes
of K, the 16 bytes each of a warp's 32 lanes reads with one load, holding exactly the codes of ``mma.m16n8k16``'s
B fragment over 8 steps of 16 (lane ``4 g + c`` owns row ``g`` of the tile; in step ``t`` it needs codes
``16 t + 2 c + {0, 1}`` and ``16 t + 8 + 2 c + {0, 1}``). Word ``j`` holds steps ``2 j`` and ``2 j + 1``;
nibble ``i`` and nibble ``i + 4`` are a pair's two codes, so one mask gives both as the low bits of two bfloat16
halves: OR-ing 0x4300 makes each ``128 + q`` exactly. Scales and zeros are ``int4_cuda.pack_scale_zero``'s words,
the ones the one-token GEMV reads.

Arithmetic: ``(128 + q) - (128 + z)`` is exact in bfloat16, times the scale rounded to bfloat16 gives the weight
rounded to bfloat16 (two roundings: the scale's and the product's, as tinygemm's bfloat16 scales have), and the
tensor cores multiply by the bfloat16 activations with float32 sums; the output is rounded once to bfloat16.
:func:`reference` is the same in tensor ops (the CPU tests check the layout and the arithmetic against it; the GPU
tests check the kernel against it).

The kernel: blocks of 16 warps take 4 tiles of 8 rows at a time (persistent, as many blocks as fit; the A
fragment is loaded once a step for the 4 tiles' instructions); the warps split K (unit ``u``, 128 codes, goes to
warp ``u % 16``), each keeps the loads of its next two units in flight, codes and scale words together, and the
partial [M, 32] tiles are summed through shared memory. Rows of A past M are zero registers (M <= 8 uses half of
the 16-row instruction). Measured on the H200 (bench/RESULTS.md, "INT4 for 2-16 tokens"), at 8 tokens the
Llama-3-8B products took 0.53-0.63x tinygemm's time and 0.59-0.88x bf16 cuBLAS's. On the way: one tile a block of
4 warps read at 0.4-0.8 TB/s, its time doubling from 8 to 16 tokens (each warp reloaded the activations for one
instruction); a scale word loaded where it was used stalled every unit on a global load (gate|up 54 against 47 us).
Up to 8 tokens the unit's activations are loaded before its first instruction (3-9% less time). The kernel
still reads at only ~1.3-1.5 TB/s on gate|up: it wins by doing 8-16 tokens in the time of one.

Smaller groups: a unit has 8 / SEG scale words a row (SEG = G / 16, at most 8), and the 4 lanes of a row share
them out, each passing its word with a shuffle to the steps that need it. When every lane held all of its row's
words (three buffers of 4 tiles), groups of 32 spilled 216 bytes a thread and took 1.6-1.8x the group-128 time,
slower than bf16 at 2-16 tokens. Shared out, nothing spills at groups of 16-128 up to 8 tokens, at most 8 bytes
a thread at 16 (``bench/kernel_resources.py``), and the activations are hoisted at every group. H200,
``bench/int4_mma.py --groups 16,32,64,128``, gate|up at 8 tokens: 53.1 us with groups of 32 (76.8 before), 50.0
with 64 (53.2), 45.6 with 128, 68.3 with 16; bf16 cuBLAS 55.3.
"""

from __future__ import annotations

import functools

import torch

from pipeline.engines import int4_cuda
from pipeline.engines.cuda_launch import launch
from pipeline.engines.int4_cuda_kernel import CUDA_PRELUDE

MAX_M = 16  # tokens per call (one 16-row tensor-core tile)

_SOURCE = CUDA_PRELUDE + r"""
__device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
  u32 d; asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ void mma16816(float (&acc)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// bfloat16 of a float32 scale, in both halves
__device__ __forceinline__ u32 bf16x2_of(float f) { const u32 h = f32_to_act(f, true); return h | (h << 16); }

// One unit's loads for NT tiles: the lane's 16 bytes of codes and its share of its row's 8 / SEG scale words, in
// flight together (a scale word loaded where it is used kept every unit waiting on it). The 4 lanes of a row
// split the words (lane c holds words c, c + 4 of the unit, modulo their count) and pass them round with shuffles
// where a step needs one: each lane holding all of them (4 words a tile at groups of 32, in three buffers) made
// the group-32 kernel spill and take 1.6-1.8x its group-128 time.
template <int SEG>
struct Words {
  static constexpr int N = 8 / SEG;  // scale words in a unit
  static constexpr int LANE = N > 4 ? N / 4 : 1;  // held by each lane
};
template <int NT, int SEG>
struct Unit {
  uint4 w[NT];
  u32 s[NT][Words<SEG>::LANE];
};

template <int NT, int SEG>
__device__ __forceinline__ void load_unit(Unit<NT, SEG>& un, const uint4* __restrict__ qm, const u32* __restrict__ sz,
                                          int tile0, int tiles, int units, int u, int lane, int gpr, int G) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const bool ok = tile0 + j < tiles && u < units;
    un.w[j] = ok ? load_stream(qm + ((size_t)(tile0 + j) * units + u) * 32 + lane) : make_uint4(0u, 0u, 0u, 0u);
    const u32* row = sz + (size_t)((tile0 + j) * 8 + (lane >> 2)) * gpr;
#pragma unroll
    for (int e = 0; e < Words<SEG>::LANE; ++e) {
      const int q = ((lane & 3) + 4 * e) % Words<SEG>::N;
      un.s[j][e] = ok ? __ldg(row + ((u << 7) + q * SEG * 16) / G) : 0u;
    }
  }
}

// One unit (128 codes of K, 8 steps of 16) of NT tiles into acc: the A fragment loaded once a step, NT
// instructions. SEG: steps per scale word (G / 16, at most 8).
template <int SEG, bool HI, int NT>
__device__ __forceinline__ void unit(float (&acc)[NT][4], const Unit<NT, SEG>& un, const u32* __restrict__ x0,
                                     const u32* __restrict__ x1, bool r0, bool r1, int u, int lane) {
  const int c = lane & 3;
  // Up to 8 tokens the unit's A fragments are loaded before its first instruction (H200, 8 tokens: 3-8% less time;
  // at 16 tokens, twice the registers, mixed); every group size, since the scale words are shared out
  constexpr bool HOIST_A = !HI;
  u32 ss[NT], zz[NT];
  u32 A[8][4];
  if (HOIST_A) {
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int xi = (u << 6) + (t << 3) + c;
      A[t][0] = r0 ? x0[xi] : 0u;
      A[t][2] = r0 ? x0[xi + 4] : 0u;
      A[t][1] = HI && r1 ? x1[xi] : 0u;
      A[t][3] = HI && r1 ? x1[xi + 4] : 0u;
    }
  }
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const int k = (u << 7) + (t << 4);
    if (t % SEG == 0) {  // this segment's -(128 + z) and s, bfloat16 in both halves
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int q = t / SEG;  // the step's word: held by lane q % 4 of this row, as its element q / 4
        const u32 word = Words<SEG>::N == 1 ? un.s[j][0]
                                            : __shfl_sync(0xffffffffu, un.s[j][q / 4], (lane & ~3) | (q % 4));
        ss[j] = bf16x2_of(__uint_as_float(word & 0xFFFFFF00u));
        const u32 nz = f32_to_act(-(float)(128 + (int)(word & 0xFFu)), true);
        zz[j] = nz | (nz << 16);
      }
    }
    const int xi = (k >> 1) + c;
    const u32 a0 = HOIST_A ? A[t][0] : r0 ? x0[xi] : 0u, a2 = HOIST_A ? A[t][2] : r0 ? x0[xi + 4] : 0u;
    const u32 a1 = HOIST_A ? A[t][1] : HI && r1 ? x1[xi] : 0u, a3 = HOIST_A ? A[t][3] : HI && r1 ? x1[xi + 4] : 0u;
    const int i0 = (t & 1) * 2;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const u32 wj = t < 2 ? un.w[j].x : t < 4 ? un.w[j].y : t < 6 ? un.w[j].z : un.w[j].w;
      const u32 one = 0x3F803F80u;  // 1.0, 1.0
      const u32 q0 = ((wj >> (4 * i0)) & 0x000F000Fu) | 0x43004300u;
      const u32 q1 = ((wj >> (4 * i0 + 4)) & 0x000F000Fu) | 0x43004300u;
      const u32 b0 = fma_bf16x2(fma_bf16x2(q0, one, zz[j]), ss[j], 0x80008000u);  // ((128 + q) - (128 + z)) * s
      const u32 b1 = fma_bf16x2(fma_bf16x2(q1, one, zz[j]), ss[j], 0x80008000u);
      mma16816(acc[j], a0, a1, a2, a3, b0, b1);
    }
  }
}

// Blocks of W warps take NT tiles of 8 rows at a time (persistent); the warps split K (unit u to warp u % W), each
// keeping the loads of its next two units in flight (across tiles too); the W partial [M, 8 NT] tiles are summed
// through shared memory.
template <int SEG, bool HI, int NT, int W>
__device__ __forceinline__ void q4mma(const u16* __restrict__ x, const uint4* __restrict__ qm,
                                      const u32* __restrict__ sz, u16* __restrict__ out, int M, int N, int K, int G) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int units = K >> 7, tiles = N >> 3, gpr = K / G, groups = (tiles + NT - 1) / NT;
  __shared__ float red[W][NT][32][4];
  const bool r0 = g < M, r1 = g + 8 < M;
  const u32* x0 = reinterpret_cast<const u32*>(x + (size_t)(r0 ? g : 0) * K);
  const u32* x1 = reinterpret_cast<const u32*>(x + (size_t)(r1 ? g + 8 : 0) * K);
  // this warp's units in each group: warp, warp + W, ...; its sequence s runs over them group after group
  const int per = warp < units ? (units - warp + W - 1) / W : 0;
  auto load = [&](Unit<NT, SEG>& un, int s) {
    const int tile0 = per ? ((int)blockIdx.x + s / per * (int)gridDim.x) * NT : tiles;
    load_unit<NT, SEG>(un, qm, sz, tile0, tiles, units, per ? warp + s % per * W : units, lane, gpr, G);
  };
  Unit<NT, SEG> cur, nxt;
  load(cur, 0);  // weights and scales only: before the wait for the kernel before (PDL)
  load(nxt, 1);
  grid_launch_next();
  grid_wait();
  int s = 0;
  for (int group = blockIdx.x; group < groups; group += gridDim.x) {
    const int tile0 = group * NT;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int i = 0; i < per; ++i, ++s) {
      Unit<NT, SEG> after;
      load(after, s + 2);
      unit<SEG, HI, NT>(acc, cur, x0, x1, r0, r1, warp + i * W, lane);
      cur = nxt;
      nxt = after;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][j][lane][i] = acc[j][i];
    __syncthreads();
    for (int j = warp; j < NT; j += W) {  // warp j writes tile j: c0, c1 row g; c2, c3 row g + 8
      if (tile0 + j >= tiles) break;
      float sum[4] = {0.f, 0.f, 0.f, 0.f};
      for (int v = 0; v < W; ++v)
#pragma unroll
        for (int i = 0; i < 4; ++i) sum[i] += red[v][j][lane][i];
      const int col = (tile0 + j) * 8 + 2 * c;
      if (g < M) {
        out[(size_t)g * N + col] = f32_to_act(sum[0], true);
        out[(size_t)g * N + col + 1] = f32_to_act(sum[1], true);
      }
      if (g + 8 < M) {
        out[(size_t)(g + 8) * N + col] = f32_to_act(sum[2], true);
        out[(size_t)(g + 8) * N + col + 1] = f32_to_act(sum[3], true);
      }
    }
    __syncthreads();
  }
}

#define ENTRY(NAME, SEG, HI, NT, W, MINB)                                                                 \
  extern "C" __global__ void __launch_bounds__(W * 32, MINB) NAME(const u16* x, const uint4* qm, const u32* sz,     \
                                                             u16* out, int M, int N, int K, int G) {      \
    q4mma<SEG, HI, NT, W>(x, qm, sz, out, M, N, K, G);                                                  \
  }
"""


def problem(n: int, k: int, group: int, device: torch.device, dtype: torch.dtype) -> str:
    """Why the kernel cannot run this [N, K] linear, or ""."""
    if device.type != "cuda":
        return f"device {device.type}"
    if dtype != torch.bfloat16:
        return f"activations in {dtype} (the kernel is bfloat16)"
    if n % 8 or k % 128:
        return f"[{n}, {k}] (needs N % 8 == 0 and K % 128 == 0)"
    if group % 16 or k % group or (group < 128 and 128 % group):
        return f"group {group} (needs 16, 32, 64 or a multiple of 128 dividing K)"
    if torch.cuda.get_device_capability(device.index or 0) < (8, 0):
        return "a GPU before sm_80 (bfloat16 tensor cores)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this torch has no torch.cuda._compile_kernel (NVRTC)"
    return ""


@functools.cache
def _variant(seg: int, hi: bool, tiles: int = 4, warps: int = 16, min_blocks: int = 1) -> tuple[str, str]:
    name = f"q4mma_bf16_s{seg}_t{tiles}_w{warps}_b{min_blocks}{'_m16' if hi else ''}"
    return _SOURCE + f"ENTRY({name}, {seg}, {'true' if hi else 'false'}, {tiles}, {warps}, {min_blocks})\n", name


def _seg(group: int) -> int:
    return min(group, 128) // 16


def shape(n: int, k: int) -> tuple[int, int]:
    """(tiles of 8 rows a block takes at a time, warps a block) for an [N, K] weight: 4 and 16, the best or within
    20% of it for the Llama-3-8B products at 2-16 tokens on the H200 (bench/RESULTS.md); the same for every shape,
    so merged products compute each row as their parts do."""
    return 4, 16


def compile_problem(group: int, n: int, k: int) -> str:
    """Compile (once) both variants for ``group`` and this shape; "" or the compiler's one-line reason."""
    tiles, warps = shape(n, k)
    return int4_cuda.compile_failure([_variant(_seg(group), hi, tiles, warps) for hi in (False, True)])


def pack(qweight: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """``int4_triton.repack``'s qweight (int32 [N, K / 8], code ``8 i + j`` in nibble ``j`` of word ``i``) ->
    int32 [N / 8, K / 128, 32, 4] (module docstring), on qweight's device, ``rows`` rows at a time (the
    rearrangement holds 64-bit codes)."""
    if qweight.shape[0] > rows:
        return torch.cat([pack(part, rows) for part in qweight.split(rows)])
    n, k = qweight.shape[0], qweight.shape[1] * 8
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    codes = (qweight[..., None] >> shifts) & 15  # [N, K / 8, 8]
    # k = 128 U + 16 (2 j + tt) + 8 h + 2 c + e; tile row r: n = 8 T + r
    v = codes.reshape(n // 8, 8, k // 128, 4, 2, 2, 4, 2)  # T, r, U, j, tt, h, c, e
    v = v.permute(0, 2, 1, 6, 3, 4, 5, 7).to(torch.int64)  # T, U, r, c, j, tt, h, e
    nib = torch.arange(2, device=qweight.device)
    shift = 4 * ((nib[:, None, None] * 2 + nib[None, :, None]) + 4 * nib[None, None, :])  # tt, h, e
    words = (v << shift).sum(dim=(-3, -2, -1))  # T, U, r, c, j
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(n // 8, k // 128, 32, 4).contiguous()


def unpack(qmma: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack`: codes [N, K] (int32 in [0, 16))."""
    tiles, units = qmma.shape[:2]
    w = qmma.reshape(tiles, units, 8, 4, 4).to(torch.int64) & 0xFFFFFFFF  # T, U, r, c, j
    nib = torch.arange(2, device=qmma.device)
    shift = 4 * ((nib[:, None, None] * 2 + nib[None, :, None]) + 4 * nib[None, None, :])  # tt, h, e
    codes = (w[..., None, None, None] >> shift) & 15  # T, U, r, c, j, tt, h, e
    codes = codes.permute(0, 2, 1, 4, 5, 6, 3, 7)  # T, r, U, j, tt, h, c, e
    return codes.reshape(tiles * 8, units * 128).to(torch.int32)


def reference(x: torch.Tensor, qmma: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernel computes, in tensor ops: the weight ``(q - z) * bf16(s)`` rounded to bfloat16, times x
    (bfloat16) with float32 sums -> [M, N] float32 (the kernel then rounds to bfloat16)."""
    codes = unpack(qmma).float()
    scale, zero = int4_cuda.unpack_scale_zero(sz)
    s = scale.to(torch.bfloat16).float().repeat_interleave(group, dim=1)
    w = ((codes - zero.float().repeat_interleave(group, dim=1)) * s).to(torch.bfloat16).float()
    return x.to(torch.bfloat16).float() @ w.t()


def matmul(x: torch.Tensor, qmma: torch.Tensor, sz: torch.Tensor, group: int, tiles: int | None = None,
           warps: int | None = None, min_blocks: int = 1) -> torch.Tensor:
    """x [M, K] bfloat16 (CUDA, 1 <= M <= 16) @ the dequantized weight's transpose -> [M, N] bfloat16 (``tiles``,
    ``warps``: the block's shape, default :func:`shape`'s)."""
    m, k = x.shape
    n = qmma.shape[0] * 8
    if not 1 <= m <= MAX_M or k != qmma.shape[1] * 128 or x.dtype != torch.bfloat16:
        raise ValueError(f"int4_mma.matmul takes 1..{MAX_M} bfloat16 rows of K = {qmma.shape[1] * 128}, "
                         f"got {tuple(x.shape)} {x.dtype}")
    x = x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    dt, dw = shape(n, k)
    tiles, warps = tiles or dt, warps or dw
    source, name = _variant(_seg(group), m > 8, tiles, warps, min_blocks)
    per_sm = int4_cuda.resident_blocks(source, name, 32 * warps)
    blocks = min(-(-n // (8 * tiles)), int4_cuda.sm_count(x.device.index or 0) * per_sm)
    launch(int4_cuda.compiled(source, name), (blocks, 1, 1), (32 * warps, 1, 1), [x, qmma, sz, out, m, n, k, group])
    return out


@functools.cache
def custom_op():
    """``torch.ops.quantship.int4_mma`` (:func:`matmul`) as an opaque op for ``torch.compile`` and graph capture."""

    @torch.library.custom_op("quantship::int4_mma", mutates_args=())
    def op(x: torch.Tensor, qmma: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
        return matmul(x, qmma, sz, group)

    @op.register_fake
    def _(x, qmma, sz, group):
        return x.new_empty(x.shape[0], qmma.shape[0] * 8)

    return op
