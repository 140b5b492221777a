"""A one-token INT4 GEMV in CUDA C for ``Int4Linear``'s decode on NVIDIA GPUs, compiled at first use with NVRTC
through PyTorch's own ``torch.cuda._compile_kernel`` (no build step, no CUDA toolkit beyond the headers path
PyTorch looks up; where that fails the caller keeps tinygemm and logs why).

Why by hand: at M = 1 the H200 measurements (bench/RESULTS.md, "Fast low-bit decode") put PyTorch's tinygemm at
~1.7 TB/s of weight reads, gemlite 0.6 at ~1.5 and our Triton GEMV at <= 0.74, against 3.8 TB/s for bf16
cuBLAS: no installable library here reads 4-bit weights near the bandwidth (Marlin/Machete live inside vLLM's
and TensorRT-LLM's own builds). The decode goal (INT4 >= 2.5x bf16) needs ~3 TB/s.

Layout: the weights are ``int4_triton.repack``'s ``qweight`` (int32 [N, K / 8], code ``k = 8 i + j`` in bits
``4 j .. 4 j + 3`` of word ``i``; the same tensor the Triton dequantize uses for prefill, so no extra copy) read
as 16-byte vectors (32 codes), plus one 32-bit word per group (:func:`pack_scale_zero`): the float32 scale with
its low 8 mantissa bits replaced by the integer zero point. Every float16 and bfloat16 scale survives that
exactly (15 mantissa bits remain), so ``(q - z) * s`` is the checkpoint's own arithmetic.

The kernel: thread ``t`` owns the 32 columns ``32 t .. 32 t + 31`` (so one block spans K, up to 32 768); blocks
are persistent (as many per SM as fit, by the driver's occupancy query) and walk chunks of ``R`` rows (4), the
next chunk's 16-byte weight loads issued before the current chunk is computed (register double-buffering). The
products are integer:

- the thread's 32 activations become 16-bit fixed point with one power-of-two scale (largest magnitude mapped
  below 2^14), split into a signed high byte and an unsigned low byte and packed four to a register in the
  codes' order, once per block;
- a word of 8 codes gives its even and odd codes as bytes with one shift and two masks, and four ``dp4a``
  (4-way byte dot products into int32) take them against the high and low bytes: 7 integer instructions per 8
  weights. A first version turned codes into floats by mantissa tricks (20 instructions per 8 weights) and
  read at 1.4-2.3 TB/s on the H200, no better than tinygemm: the integer pipe was the bottleneck;
- per row ``s * 2^-e * float(sum q x_fixed - z * sum x_fixed)``: exact integer sums (below 2^24), so the only
  rounding beyond float32 is the activations' to 16 bits, at most 2^-15 of the 32 values' largest magnitude
  (bfloat16's own step is 2^-8 of each value); then a warp shuffle reduction and a sum over the block's warps,
  written in the activation dtype (bfloat16 or float16).

Fused variants (``quantship::int4_gemv_fused``, the one-token decode layer of ``serve/fused_proj.py``): the
input may be RMSNorm(x) (its factor applied to the result, the sum of squares reduced beside the products), and
the output may have a residual added, or be silu(gate) * up over the rows' two halves (a chunk then holds rows
of both halves, so the epilogue has each gate with its up); :func:`fused_reference` says what they stand for.

The arithmetic is mirrored in tensor ops by :func:`reference_dot` so the CPU tests check the packing, the byte
order and the fixed point; the GPU tests (marked ``gpu``) compare the kernel with the float64 product.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

MAX_K = 32 * 1024  # one block of 1024 threads x 32 columns
WIDE_K = 16 * 1024  # above: the 1024-thread variant, 2 rows a chunk (64 registers a thread)
ROWS = (4, 8)  # rows per chunk up to WIDE_K that gemv(rows=...) takes (4 by default: chunk_rows)

# Device helpers both one-token kernels use (this module's and ``int8_cuda``'s): activation conversions, a
# streaming 16-byte load that bypasses L1, four bytes packed into a word.
CUDA_PRELUDE = r"""
typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float act_to_f32(u16 h, bool bf16) {
  if (bf16) return __uint_as_float(((u32)h) << 16);
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 f32_to_act(float f, bool bf16) {
  u16 h;
  if (bf16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ u32 pack4(int a, int b, int c, int d) {
  return (u32)(a & 0xFF) | ((u32)(b & 0xFF) << 8) | ((u32)(c & 0xFF) << 16) | ((u32)(d & 0xFF) << 24);
}
"""

_SOURCE = CUDA_PRELUDE + r"""
__device__ __forceinline__ int dp4a_us(u32 a, int b, int c) {  // unsigned bytes . signed bytes + c
  int d; asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 dp4a_uu(u32 a, u32 b, u32 c) {  // unsigned bytes . unsigned bytes + c
  u32 d; asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
// Row ``u`` of chunk ``chunk`` (-1 past the end). MAP 0: R consecutive rows. MAP 1 (the SwiGLU epilogue over
// gate|up): rows i .. i + R/2 - 1 of the first half (gate) and the same rows of the second half (up), i = chunk *
// R/2. MAP 2 (the rotary epilogue over q|k|v, R = 4, heads of HD rows): rows j, j + 1 of a head and their rotary
// partners j + HD/2, j + HD/2 + 1, j = 2 * (chunk % (HD / 4)).
template <int R, int MAP>
__device__ __forceinline__ int chunk_row(int chunk, int u, int N, int hd) {
  if (MAP == 2) {
    const int head = chunk / (hd >> 2), j = (chunk % (hd >> 2)) * 2;
    const int n = head * hd + (u < 2 ? j + u : (hd >> 1) + j + u - 2);
    return n < N ? n : -1;
  }
  const int i = chunk * (R / 2) + u % (R / 2);
  if (MAP == 1) return i < (N >> 1) ? (u < R / 2 ? i : (N >> 1) + i) : -1;
  return chunk * R + u < N ? chunk * R + u : -1;
}
template <int R, int MAP>
__device__ __forceinline__ void load_chunk(uint4 (&w)[R], u32 (&s)[R], const uint4* __restrict__ qw,
                                           const u32* __restrict__ sz, int chunk, int N, int kt, int gpr, int g,
                                           int t, bool active, int hd) {
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int n = chunk_row<R, MAP>(chunk, u, N, hd);
    const bool ok = active && n >= 0;
    w[u] = ok ? load_stream(qw + (size_t)n * kt + t) : make_uint4(0u, 0u, 0u, 0u);
    s[u] = ok ? __ldg(sz + (size_t)n * gpr + g) : 0u;
  }
}

__device__ __forceinline__ float round_act(float f, bool bf16) { return act_to_f32(f32_to_act(f, bf16), bf16); }

// The rotary epilogue's inputs, and NORM's optional ``add`` (x + add is normed; block 0 writes it to ``hout``)
struct Rope {
  const u16* sin; const long long* pos; u16* kc; u16* vc; int qrows, hd, hstride; const u16* add; u16* hout;
};

// The epilogue's inputs for chunk ``chunk`` (thread t < OUT): EPI 1 the residual of its output; EPI 3 the cos and
// sin of its row's position in the head (q and k rows; ``res`` is cos).
template <int R, int MAP, int EPI>
__device__ __forceinline__ void load_side(float (&side)[2], const u16* __restrict__ res, const Rope& rope,
                                          int chunk, int N, int nout, int OUT, int t, bool bf16) {
  if (EPI == 1 && t < OUT && chunk * OUT + t < nout) side[0] = act_to_f32(res[chunk * OUT + t], bf16);
  if (EPI == 3 && t < R) {
    const int row = chunk_row<R, MAP>(chunk, t, N, rope.hd);
    if (row >= 0 && row < rope.qrows + ((N - rope.qrows) >> 1)) {
      const int d = row % rope.hd;
      side[0] = act_to_f32(res[d], bf16);
      side[1] = act_to_f32(rope.sin[d], bf16);
    }
  }
}

__device__ __forceinline__ void load_act32(float (&xv)[32], const u16* __restrict__ p, bool bf16) {
  const uint4* xp = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = xp[i];
    const u32 parts[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      xv[i * 8 + q * 2] = act_to_f32((u16)(parts[q] & 0xFFFFu), bf16);
      xv[i * 8 + q * 2 + 1] = act_to_f32((u16)(parts[q] >> 16), bf16);
    }
  }
}

// NORM: x is a residual stream and the input is RMSNorm(x) * nw: the product runs over nw * x and is scaled by
// rsqrt(mean(x^2) + eps) at the end (float32 sum of squares, reduced beside the products, so no block-wide wait
// before them). EPI 0: out = the product. EPI 1: out = res + (the product, rounded), rounded, as the eager add.
// EPI 2 (SwiGLU over gate|up = the rows' two halves): out[i] = silu(gate_i) * up_i, N / 2 outputs, each value
// rounded where the eager ops (the product, silu, the multiplication) round. EPI 3 (the rotary embedding over
// q|k|v, one token of cache slot 0): ``res`` is cos, ``rope.sin`` sin (HD each), the products are rounded to the
// activation dtype and rotated (rotate_half's pairs, in float32, rounded once, as the compiled step's kernel does);
// q goes to ``out`` (QROWS outputs), k and v to this token's position (*pos) of ``kc``/``vc`` ([heads, positions,
// HD] with heads HSTRIDE apart).
template <int R, bool NORM, int EPI>
__device__ __forceinline__ void q4gemv(const u16* __restrict__ x, const u16* __restrict__ nw,
                                       const u16* __restrict__ res, const uint4* __restrict__ qw,
                                       const u32* __restrict__ sz, u16* __restrict__ out,
                                       int N, int K, int G, float eps, bool bf16, const Rope rope) {
  constexpr bool PAIRS = EPI == 2;
  constexpr int MAP = EPI == 2 ? 1 : EPI == 3 ? 2 : 0;
  constexpr int OUT = PAIRS ? R / 2 : R;  // outputs per chunk
  __shared__ float red[32 * R];
  __shared__ float ssum[32];
  const int kt = K >> 5, t = threadIdx.x, lane = t & 31, warp = t >> 5, nwarps = blockDim.x >> 5;
  const bool active = t < kt;
  const int nout = PAIRS ? N >> 1 : N;
  const int gpr = K / G, g = (t * 32) / G, chunks = (nout + OUT - 1) / OUT;
  int chunk = blockIdx.x;
  uint4 w[R];
  u32 s[R];
  load_chunk<R, MAP>(w, s, qw, sz, chunk, N, kt, gpr, g, t, active, rope.hd);  // in flight during the prologue
  // The epilogue's own inputs (the residual, the rotary cos/sin) are loaded a chunk ahead too: loaded in the chunk
  // they serve, they arrived after the arithmetic, and the block waited for them at every chunk (8B down with the
  // residual on the H200: 18.5 us, a chunk ahead 15.7, plain 13.5).
  float side[2] = {0.f, 0.f};
  load_side<R, MAP, EPI>(side, res, rope, chunk, N, nout, OUT, t, bf16);
  const long long position = EPI == 3 ? *rope.pos : 0;

  float xv[32];
#pragma unroll
  for (int j = 0; j < 32; ++j) xv[j] = 0.f;
  float ss = 0.f;
  if (active) {
    load_act32(xv, x + t * 32, bf16);
    if (NORM && rope.add != nullptr) {  // x + add (the last layer's MLP output), rounded as the eager add
      float av[32];
      load_act32(av, rope.add + t * 32, bf16);
#pragma unroll
      for (int j = 0; j < 32; ++j) xv[j] = round_act(xv[j] + av[j], bf16);
      if (blockIdx.x == 0) {  // the new residual stream, once
        uint4* hp = reinterpret_cast<uint4*>(rope.hout + t * 32);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          u32 q[4];
#pragma unroll
          for (int j = 0; j < 4; ++j)
            q[j] = (u32)f32_to_act(xv[i * 8 + 2 * j], bf16) | ((u32)f32_to_act(xv[i * 8 + 2 * j + 1], bf16) << 16);
          hp[i] = make_uint4(q[0], q[1], q[2], q[3]);
        }
      }
    }
    if (NORM) {
      float wv[32];
      load_act32(wv, nw + t * 32, bf16);
#pragma unroll
      for (int j = 0; j < 32; ++j) { ss += xv[j] * xv[j]; xv[j] *= wv[j]; }
    }
  }
  if (NORM) {  // read after the chunk loop's first __syncthreads
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) ssum[warp] = ss;
  }

  // the activations as 16-bit fixed point, split in bytes, packed in the codes' order (once per block)
  u32 xh[8], xl[8];  // [word j][even 0 / odd 1]
  float xscale = 0.f;
  int xsum = 0;
  bool finite = true;
#pragma unroll
  for (int i = 0; i < 8; ++i) { xh[i] = 0u; xl[i] = 0u; }
  if (active) {
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < 32; ++j) m = fmaxf(m, fabsf(xv[j]));
    finite = m <= 3.402823466e38f;  // false for inf and NaN
    int e = 0;
    if (m > 0.f && finite) { frexpf(m, &e); }
    const int sh = min(100, 14 - e);  // |x| * 2^sh < 2^14 (magnitudes below 2^-86 flush towards 0)
    const float up = ldexpf(1.f, sh);
    xscale = ldexpf(1.f, -sh);
    int xi[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      xi[j] = finite ? __float2int_rn(xv[j] * up) : 0;
      xsum += xi[j];
    }
#pragma unroll
    for (int wj = 0; wj < 4; ++wj) {
      const int b = wj * 8;
      xh[wj * 2] = pack4(xi[b] >> 8, xi[b + 2] >> 8, xi[b + 4] >> 8, xi[b + 6] >> 8);
      xh[wj * 2 + 1] = pack4(xi[b + 1] >> 8, xi[b + 3] >> 8, xi[b + 5] >> 8, xi[b + 7] >> 8);
      xl[wj * 2] = pack4(xi[b], xi[b + 2], xi[b + 4], xi[b + 6]);
      xl[wj * 2 + 1] = pack4(xi[b + 1], xi[b + 3], xi[b + 5], xi[b + 7]);
    }
  }

  float norm = 1.f;  // NORM: rsqrt(mean(x^2) + eps), from the first chunk's barrier on
  for (int it = 0; chunk < chunks; chunk += gridDim.x, ++it) {
    const int o = chunk * OUT + t;  // this thread's output, for t < OUT
    const int row = EPI == 3 && t < R ? chunk_row<R, MAP>(chunk, t, N, rope.hd) : -1;
    float* const part = red;
    uint4 wn[R];
    u32 sn[R];
    float side_next[2] = {0.f, 0.f};
    const int next = chunk + gridDim.x;
    if (next < chunks) {
      load_chunk<R, MAP>(wn, sn, qw, sz, next, N, kt, gpr, g, t, active, rope.hd);
      load_side<R, MAP, EPI>(side_next, res, rope, next, N, nout, OUT, t, bf16);
    }
#pragma unroll
    for (int u = 0; u < R; ++u) {
      const u32 words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
      int hi = 0;
      u32 lo = 0u;
#pragma unroll
      for (int wj = 0; wj < 4; ++wj) {
        const u32 ev = words[wj] & 0x0F0F0F0Fu, od = (words[wj] >> 4) & 0x0F0F0F0Fu;
        hi = dp4a_us(ev, (int)xh[wj * 2], hi);
        hi = dp4a_us(od, (int)xh[wj * 2 + 1], hi);
        lo = dp4a_uu(ev, xl[wj * 2], lo);
        lo = dp4a_uu(od, xl[wj * 2 + 1], lo);
      }
      const int zero = (int)(s[u] & 0xFFu);
      const float scale = __uint_as_float(s[u] & 0xFFFFFF00u);
      float v = s[u] ? scale * xscale * (float)(hi * 256 + (int)lo - zero * xsum) : 0.f;
      if (!finite) v = __int_as_float(0x7fc00000);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) part[warp * R + u] = v;
    }
    __syncthreads();
    if (NORM && it == 0) {
      float total = 0.f;
      for (int i = 0; i < nwarps; ++i) total += ssum[i];
      norm = rsqrtf(total / (float)K + eps);
    }
    if (EPI == 3 && row >= 0) {  // R == 4: output t, its rotary partner t ^ 2 (the same pair of the other half)
      float mine = 0.f, other = 0.f;
      for (int i = 0; i < nwarps; ++i) { mine += part[i * R + t]; other += part[i * R + (t ^ 2)]; }
      if (NORM) {
        mine *= norm;
        other *= norm;
      }
      const float a = round_act(mine, bf16), b = round_act(other, bf16);
      const int d = row % rope.hd, kvrows = (N - rope.qrows) >> 1;
      if (row < rope.qrows + kvrows) {  // q or k: rotated (side: this row's cos and sin)
        const float v = __fadd_rn(__fmul_rn(a, side[0]), __fmul_rn(t < 2 ? -b : b, side[1]));
        if (row < rope.qrows) {
          out[row] = f32_to_act(v, bf16);
        } else {
          const int kr = row - rope.qrows;
          rope.kc[(size_t)(kr / rope.hd) * rope.hstride + (size_t)position * rope.hd + d] = f32_to_act(v, bf16);
        }
      } else {
        const int vr = row - rope.qrows - kvrows;
        rope.vc[(size_t)(vr / rope.hd) * rope.hstride + (size_t)position * rope.hd + d] = f32_to_act(a, bf16);
      }
    }
    if (EPI != 3 && t < OUT && o < nout) {
      float sum = 0.f, up = 0.f;
      for (int i = 0; i < nwarps; ++i) sum += part[i * R + t];
      if (PAIRS)
        for (int i = 0; i < nwarps; ++i) up += part[i * R + t + R / 2];
      if (NORM) {
        sum *= norm;
        up *= norm;
      }
      if (EPI == 2) {
        const float gate = round_act(sum, bf16);
        out[o] = f32_to_act(round_act(gate / (1.f + expf(-gate)), bf16) * round_act(up, bf16), bf16);
      } else {
        out[o] = EPI == 1 ? f32_to_act(side[0] + round_act(sum, bf16), bf16) : f32_to_act(sum, bf16);
      }
    }
    __syncthreads();  // (one barrier a chunk with red double-buffered measured slower: 20.2 against 18.7 us)
    if (next < chunks) {
#pragma unroll
      for (int u = 0; u < R; ++u) { w[u] = wn[u]; s[u] = sn[u]; }
      side[0] = side_next[0];
      side[1] = side_next[1];
    }
  }
}

// entries: q4gemv_<bf16|f16>_<r4|r8|wide>[_norm][_res|_swiglu] (see _variant); each compiles only its own
#define ENTRY(NAME, BOUND, R, NORM, EPI, BF16)                                                           \
  extern "C" __global__ void __launch_bounds__ BOUND                                                   \
  NAME(const u16* x, const u16* nw, const u16* res, const uint4* qw, const u32* sz, u16* out, int N,     \
       int K, int G, double eps, const u16* sn, const long long* pos, u16* kc, u16* vc, int qrows, int hd,  \
       int hstride, const u16* add, u16* hout, int has_add) {                                          \
    const Rope rope = {sn, pos, kc, vc, qrows, hd, hstride, has_add ? add : nullptr, hout};            \
    q4gemv<R, NORM, EPI>(x, nw, res, qw, sz, out, N, K, G, (float)eps, BF16, rope);                    \
  }
"""


def pack_scale_zero(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[N, K / G] scales (float) and integer zeros in [0, 256) -> int32 [N, K / G]: the float32 scale's bits with
    the low 8 mantissa bits replaced by the zero (exact for float16/bfloat16 scales; module docstring)."""
    bits = scales.float().contiguous().view(torch.int32)
    return ((bits & ~0xFF) | zeros.to(torch.int32)).contiguous()


def unpack_scale_zero(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_scale_zero` (scale float32 with the low mantissa byte cleared, zero int)."""
    return (sz & ~0xFF).view(torch.float32), sz & 0xFF


def reference_dot(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The kernel's arithmetic in tensor ops (x [K], qweight int32 [N, K / 8]) -> float32 [N]: the same per-32
    fixed point, byte split, even/odd byte packing and integer dot products; the CPU tests check it against
    float64."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    xv = x.float().reshape(k // 32, 32)
    m = xv.abs().amax(-1)
    _, e = torch.frexp(m)
    sh = torch.clamp(14 - torch.where(m > 0, e, torch.zeros_like(e)), max=100)
    xi = torch.round(xv * torch.exp2(sh.float())[:, None]).to(torch.int64)  # round half to even, as __float2int_rn
    hi_b, lo_b = xi >> 8, xi & 0xFF  # signed high byte, unsigned low byte: xi = 256 hi + lo
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    ev, od = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
    codes = torch.stack([(ev >> (8 * i)) & 0xFF for i in range(4)] + [(od >> (8 * i)) & 0xFF for i in range(4)], -1)
    codes = codes[..., [0, 4, 1, 5, 2, 6, 3, 7]].reshape(n, k // 32, 32)  # byte i of ev = code 2i, of od = 2i + 1
    hi = (codes * hi_b).sum(-1)
    lo = (codes * lo_b).sum(-1)
    scale, zero = unpack_scale_zero(sz)
    g = torch.arange(k // 32) * 32 // group
    total = (hi * 256 + lo - zero[:, g].long() * xi.sum(-1)).float()
    return (scale[:, g] * torch.exp2(-sh.float()) * total).sum(-1)


def problem(n: int, k: int, group: int, device: torch.device, dtype: torch.dtype) -> str:
    """Why the kernel cannot run this linear, or ""."""
    if group % 32 or k % group:
        return f"group {group} with K = {k} (needs group % 32 == 0 dividing K)"
    return device_problem(k, device, dtype)


def device_problem(k: int, device: torch.device, dtype: torch.dtype) -> str:
    """What the one-token kernels (this module's and ``int8_cuda``'s) need of every linear: CUDA, bf16/fp16
    activations, K % 32 == 0 and at most MAX_K, and PyTorch's NVRTC entry point; "" when all hold."""
    if device.type != "cuda":
        return f"device {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"activations in {dtype}"
    if k % 32 or k > MAX_K:
        return f"K = {k} (needs K % 32 == 0 and K <= {MAX_K})"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this torch has no torch.cuda._compile_kernel (NVRTC)"
    return ""


@functools.cache
def compiled(source: str, name: str):
    """The kernel ``name`` of ``source``, compiled with NVRTC once per process."""
    return torch.cuda._compile_kernel(source, name)


def compile_failure(kernels) -> str:
    """Compile every ``(source, name)`` of ``kernels``; "" or the compiler's one-line reason (the caller keeps its
    fallback)."""
    try:
        for source, name in kernels:
            compiled(source, name)
    except Exception as e:  # no CUDA headers, NVRTC missing, an old driver
        return f"NVRTC compile failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return ""


EPILOGUES = {"": 0, "residual": 1, "swiglu": 2, "rope": 3}  # what the kernel writes (the CUDA source's EPI)


def compile_problem(dtype: torch.dtype, k: int, norm: bool = False, epilogue: str = "") -> str:
    """Compile (once) the variant :func:`gemv` launches for ``dtype``, ``k`` and the fusion; "" or the compiler's
    one-line reason. Other row counts (``gemv(rows=...)``) compile at their first use."""
    return compile_failure([_variant(dtype, k, chunk_rows(k), norm, epilogue)])


@functools.cache
def _variant(dtype: torch.dtype, k: int, rows: int, norm: bool, epilogue: str) -> tuple[str, str]:
    """(source, kernel name) of one entry: the template instantiated for this dtype, width, rows and fusion."""
    bf16 = dtype == torch.bfloat16
    wide = k > WIDE_K
    threads = threads_per_block(k)
    name = (f"q4gemv_{'bf16' if bf16 else 'f16'}_{'wide' if wide else f'r{rows}'}_t{threads}"
            f"{'_norm' if norm else ''}{'_' + epilogue if epilogue else ''}")
    # registers capped so that MIN_THREADS_PER_SM of them fit (ptxas for sm_90: the rotary variant took 104 and
    # 4 blocks of 128 threads an SM under a 512-thread bound, 96 and 5 under this one; bench/kernel_resources.py)
    bound = f"{threads}, {max(1, MIN_THREADS_PER_SM // threads) if rows <= 4 else 1}" if not wide else "1024, 1"
    entry = (f"ENTRY({name}, ({bound}), {2 if wide else rows}, {'true' if norm else 'false'}, "
             f"{EPILOGUES[epilogue]}, {'true' if bf16 else 'false'})\n")
    return _SOURCE + entry, name


MIN_THREADS_PER_SM = 640  # the launch bounds' second figure (up to 4 rows): 5 blocks of 128 threads (K = 4096)


def threads_per_block(k: int) -> int:
    return -(-k // 32 // 32) * 32


def chunk_rows(k: int, rows: int | None = None) -> int:
    """Rows per chunk: 2 for K above WIDE_K (the 1024-thread variant), else ``rows`` or 4 (the H200's 8B shapes:
    q|k|v 6.7 against 7.4 us with 8, gate|up 18.4 against 20.7, down 13.6 against 15.4; bench/RESULTS.md)."""
    return 2 if k > WIDE_K else rows or 4


def launch_shape(n: int, k: int, sms: int, rows: int | None = None, blocks_per_sm: int | None = None):
    """(rows per chunk (:func:`chunk_rows`), blocks) for a [N, K] weight: persistent blocks, ``blocks_per_sm`` of
    them per SM (:func:`gemv` passes the occupancy query's; default 1024 threads' worth), never more than there
    are chunks."""
    rows = chunk_rows(k, rows)
    bps = blocks_per_sm or max(1, 1024 // threads_per_block(k))
    return rows, max(1, min(-(-n // rows), sms * bps))


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def vector_for_kernel(x: torch.Tensor) -> torch.Tensor:
    """One token's activations as the kernels read them: contiguous and 16-byte aligned (a copy only if not)."""
    x = x.reshape(-1)
    return x if x.is_contiguous() and x.data_ptr() % 16 == 0 else x.clone()


def gemv(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group: int, rows: int | None = None,
         blocks_per_sm: int | None = None, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         swiglu: bool = False, residual: torch.Tensor | None = None, rope: "RopeWrite | None" = None,
         add: torch.Tensor | None = None, add_out: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (bf16/fp16, CUDA) @ dequant(qweight, sz).T -> [1, N] in x's dtype. Fused (:func:`fused_reference`
    and :func:`rope_reference` say what each computes): ``norm_weight`` runs RMSNorm(x) * norm_weight first;
    ``swiglu`` takes the N rows as gate|up and returns silu(gate) * up [1, N / 2]; ``residual`` [1, N] is added to
    the product; ``rope`` takes the rows as q|k|v, rotates q and k, writes k and v into the cache at this token's
    position and returns q [1, rope.q_rows]. ``add`` [1, K] (with ``norm_weight``): the input is x + add, rounded
    as the eager add, and is also written to ``add_out`` [1, K] (the decoder's next residual stream)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    if swiglu and (n % 2 or residual is not None):
        raise ValueError(f"the SwiGLU epilogue needs an even number of rows and no residual, got N = {n}")
    if (add is None) != (add_out is None) or (add is not None and norm_weight is None):
        raise ValueError("add needs add_out and norm_weight (it is the normed input's residual stream)")
    if rope is not None and (swiglu or residual is not None or rope.problem(n, k, rows)):
        raise ValueError(f"the rotary epilogue takes q|k|v alone: {rope.problem(n, k, rows) or 'no other epilogue'}")
    x = vector_for_kernel(x)
    epilogue = "rope" if rope is not None else "swiglu" if swiglu else "residual" if residual is not None else ""
    nw = vector_for_kernel(norm_weight) if norm_weight is not None else x
    res = vector_for_kernel(residual) if residual is not None else x
    width = rope.q_rows if rope is not None else n // 2 if swiglu else n
    out = torch.empty(1, width, device=x.device, dtype=x.dtype)
    if rope is not None:
        res = vector_for_kernel(rope.cos)
        extra = [vector_for_kernel(rope.sin), rope.pos, rope.k_cache, rope.v_cache, rope.q_rows, rope.head_dim,
                 rope.k_cache.stride(1)]
    else:
        extra = [x, x, x, x, 0, 0, 0]
    extra += [vector_for_kernel(add), add_out, 1] if add is not None else [x, x, 0]
    if add_out is not None and not (add_out.is_contiguous() and add_out.data_ptr() % 16 == 0 and add_out.numel() == k):
        raise ValueError("add_out must be a contiguous, 16-byte aligned [1, K] tensor")
    variant = _variant(x.dtype, k, chunk_rows(k, rows), norm_weight is not None, epilogue)
    if blocks_per_sm is None:  # as many blocks as fit on the GPU at once (a prologue is paid once per block)
        blocks_per_sm = resident_blocks(*variant, threads_per_block(k))
    _, blocks = launch_shape(n, k, sm_count(x.device.index or 0), rows, blocks_per_sm)
    compiled(*variant)(grid=(blocks, 1, 1), block=(threads_per_block(k), 1, 1),
                       args=[x, nw, res, qweight, sz, out, n, k, group, float(eps), *extra])
    return out


class RopeWrite(NamedTuple):
    """What the rotary epilogue needs (``gemv(rope=...)``): this token's ``cos``/``sin`` [head_dim] (the model's
    rotary embedding, in the activation dtype), ``pos`` (int64 on the GPU: its first value is the cache position to
    write), the caches ``k_cache``/``v_cache`` [slots, kv heads, positions, head_dim] (contiguous in the last two;
    the token is slot 0's), and the layout of q|k|v: ``q_rows`` rows of q, then k and v of equal width, heads of
    ``head_dim`` rows."""

    cos: torch.Tensor
    sin: torch.Tensor
    pos: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    q_rows: int
    head_dim: int

    def problem(self, n: int, k: int, rows: int | None = None) -> str:
        """Why the epilogue cannot take this [N, K] q|k|v and these tensors, or ""."""
        hd, kv = self.head_dim, n - self.q_rows
        if hd % 4 or self.q_rows % hd or kv % (2 * hd) or self.q_rows <= 0:
            return f"q|k|v of {n} rows with {self.q_rows} of q in heads of {hd} (needs whole heads, hd % 4 == 0)"
        if chunk_rows(k, rows) != 4:
            return f"K = {k} at {chunk_rows(k, rows)} rows a chunk (the epilogue pairs 4)"
        if self.cos.numel() != hd or self.sin.numel() != hd:
            return f"cos/sin of {self.cos.numel()} values for heads of {hd} (a partial rotary embedding)"
        if self.cos.dtype != self.sin.dtype:
            return "cos and sin differ in dtype"
        caches = (self.k_cache, self.v_cache)
        if any(c.dim() != 4 or c.shape[1] * hd != kv // 2 or c.shape[3] != hd or c.stride(3) != 1
               or c.stride(2) != hd for c in caches) or self.k_cache.stride() != self.v_cache.stride():  # fmt: skip
            return "k/v caches not [slots, kv heads, positions, head_dim] with contiguous positions"
        if self.pos.dtype != torch.int64 or self.pos.numel() < 1:
            return "pos is not an int64 tensor"
        return ""


def rope_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_rows: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the rotary epilogue computes from the q|k|v product ``qkv`` [1, N] (in the activation dtype): q and k
    rotated by transformers' ``apply_rotary_pos_emb`` (rotate_half's pairs) in float32 and rounded once, as the
    compiled step's fused kernel does; (q [1, q_rows], k [kv heads, head_dim], v [kv heads, head_dim])."""
    kv = (qkv.shape[-1] - q_rows) // 2
    q, k, v = qkv.reshape(-1).split([q_rows, kv, kv])

    def rotate(z: torch.Tensor) -> torch.Tensor:
        z = z.float().reshape(-1, head_dim)
        half = torch.cat([-z[:, head_dim // 2 :], z[:, : head_dim // 2]], dim=-1)
        return (z * cos.float().reshape(1, -1) + half * sin.float().reshape(1, -1)).to(qkv.dtype)

    return rotate(q).reshape(1, -1), rotate(k), v.reshape(-1, head_dim)


def fused_reference(x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                    silu_mul: bool = False) -> torch.Tensor:
    """What the fused kernels stand for, in tensor ops, in x's dtype: transformers' ``LlamaRMSNorm`` (float32 mean
    of squares, ``x * rsqrt(mean + eps)`` rounded to x's dtype, times the weight) before the product, or
    ``silu(gate) * up`` after it with gate|up = x, each rounded where the eager ops round. The SwiGLU epilogue
    rounds as these ops do; the norm's factor multiplies the product instead of each input (no rounding of the
    normed input: closer to the exact value than eager)."""
    if norm_weight is not None:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return norm_weight.to(x.dtype) * normed
    if silu_mul:
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return x


@functools.cache
def resident_blocks(source: str, name: str, threads: int) -> int:
    """How many blocks of ``threads`` of the kernel fit on one SM at once (its registers decide: the driver's
    occupancy query); 1024 threads' worth where the query is not available."""
    fallback = max(1, 1024 // threads)
    try:
        lib = torch.cuda._utils._get_gpu_runtime_library()
        count = ctypes.c_int()
        rc = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(count), compiled(source, name).func,
                                                             threads, ctypes.c_size_t(0))  # fmt: skip
    except (AttributeError, OSError):
        return fallback
    return count.value if rc == 0 and count.value > 0 else fallback


@functools.cache
def custom_op():
    """``torch.ops.quantship.int4_gemv``, ``int4_gemv_fused`` and ``int4_gemv_rope`` (:func:`gemv`'s keywords; the
    last writes this token's k and v into the cache it is given): the launches as opaque ops for ``torch.compile``
    and graph capture."""

    @torch.library.custom_op("quantship::int4_gemv", mutates_args=())
    def op(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
        return gemv(x, qweight, sz, group)

    @op.register_fake
    def _(x, qweight, sz, group):
        return x.new_empty(1, qweight.shape[0])

    @torch.library.custom_op("quantship::int4_gemv_fused", mutates_args=())
    def fused(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group: int,
              norm_weight: torch.Tensor | None, eps: float, swiglu: bool,
              residual: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        return gemv(x, qweight, sz, group, norm_weight=norm_weight, eps=eps, swiglu=swiglu, residual=residual)

    @fused.register_fake
    def _(x, qweight, sz, group, norm_weight, eps, swiglu, residual):
        return x.new_empty(1, qweight.shape[0] // 2 if swiglu else qweight.shape[0])

    @torch.library.custom_op("quantship::int4_gemv_rope", mutates_args=("k_cache", "v_cache"))
    def rope(x: torch.Tensor, add: torch.Tensor | None, qweight: torch.Tensor, sz: torch.Tensor, group: int,
             norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, q_rows: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(q, x + add) with ``add``, else (q, an empty tensor): see :func:`gemv`."""
        h = torch.empty(1, x.shape[-1] if add is not None else 0, device=x.device, dtype=x.dtype)
        q = gemv(x, qweight, sz, group, norm_weight=norm_weight, eps=eps, add=add,
                 add_out=h if add is not None else None,
                 rope=RopeWrite(cos, sin, pos, k_cache, v_cache, q_rows, head_dim))
        return q, h

    @rope.register_fake
    def _(x, add, qweight, sz, group, norm_weight, eps, cos, sin, pos, k_cache, v_cache, q_rows, head_dim):
        return x.new_empty(1, q_rows), x.new_empty(1, x.shape[-1] if add is not None else 0)

    return op
