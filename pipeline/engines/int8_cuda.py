"""A one-token W8A8 GEMV in CUDA C for ``Int8Linear``'s decode on NVIDIA GPUs (compiled with NVRTC at load, like
``int4_cuda``, whose launch shapes it shares).

Why: ``torch._int_mm`` (cuBLASLt) needs more than 16 rows, so a decode step pads one token to 17 and the INT8
model decoded at 0.57x bf16 on the H200 (bench/RESULTS.md, "Fast low-bit decode"): slower than the float model it
replaces. Here thread ``t`` owns the 32 columns ``32 t .. 32 t + 31``: the block quantizes the token itself
(the row's absolute maximum by a block reduction, then ``quantize_per_token_int8``'s float32 division, round half
to even and clamp, so the activation quantizer's own kernels disappear from the step), keeps its 32 activation
bytes in 8 registers, reads each row's 32 weight bytes as two 16-byte loads and takes them with 8 ``dp4a``
(signed 4-byte dot products into int32). The int32 sums are reduced exactly (warp
shuffles, then the block's warps), so a row's accumulator is bit for bit ``_int_mm``'s, and the epilogue is
``Int8Linear``'s own float32 arithmetic in its order (``acc * act_scale * w_scale``): the result is identical to
the ``_int_mm`` path (the GPU test checks equality). Blocks are persistent and keep the next chunk's loads in
flight, as in ``int4_cuda``.
"""

from __future__ import annotations

import functools

import torch

from pipeline.engines.int4_cuda import (
    WIDE_K,
    compile_failure,
    compiled,
    device_problem,
    launch_shape,
    sm_count,
    threads_per_block,
    vector_for_kernel,
)
from pipeline.engines.cuda_launch import launch
from pipeline.engines.int4_cuda_kernel import CUDA_PRELUDE

# What the one-byte one-token GEMVs share (this module's and ``fp8_cuda``'s): a chunk's rows as two 16-byte loads
# a thread (32 weights), the first of them loaded before the PDL wait (``first_chunk``), and the token: thread t's 32
# activations as floats and the row's absolute maximum (a warp reduction, then over the block's warps through shared
# memory).
BYTE_GEMV_PRELUDE = CUDA_PRELUDE + r"""
template <int R>
__device__ __forceinline__ void load_chunk(uint4 (&w)[R][2], const uint4* __restrict__ qw, int chunk, int N, int kt,
                                           int t, bool active) {
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int n = chunk * R + u;
    const bool ok = active && n < N;
    w[u][0] = ok ? load_stream(qw + ((size_t)n * kt + t) * 2) : make_uint4(0u, 0u, 0u, 0u);
    w[u][1] = ok ? load_stream(qw + ((size_t)n * kt + t) * 2 + 1) : make_uint4(0u, 0u, 0u, 0u);
  }
}
// The block's first chunk of weights (all it reads before the PDL wait, pipeline.engines.cuda_launch), then the
// trigger for the next kernel and the wait for the one before
template <int R>
__device__ __forceinline__ void first_chunk(uint4 (&w)[R][2], const uint4* __restrict__ qw, int N, int kt, int t,
                                            bool active) {
  load_chunk<R>(w, qw, blockIdx.x, N, kt, t, active);
  grid_launch_next();
  grid_wait();
}
__device__ __forceinline__ float token_absmax(float (&xv)[32], const uint4* __restrict__ x, int t, bool active,
                                              bool bf16) {
  __shared__ float wmax[32];
  const int lane = t & 31, warp = t >> 5, nwarps = blockDim.x >> 5;
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = active ? x[t * 4 + i] : make_uint4(0u, 0u, 0u, 0u);
    const u32 parts[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      xv[i * 8 + p * 2] = act_to_f32((u16)(parts[p] & 0xFFFFu), bf16);
      xv[i * 8 + p * 2 + 1] = act_to_f32((u16)(parts[p] >> 16), bf16);
    }
  }
#pragma unroll
  for (int j = 0; j < 32; ++j) m = fmaxf(m, fabsf(xv[j]));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) wmax[warp] = m;
  __syncthreads();
  m = 0.f;
  for (int i = 0; i < nwarps; ++i) m = fmaxf(m, wmax[i]);
  return m;
}
// The persistent blocks' walk over chunks of R rows from ``chunk`` on, the next chunk's loads in flight while
// this one is computed (``w`` holds the first, loaded before the PDL wait): ``dot(w[u], n)`` is the thread's part
// of row n's sum (T: int or float), added up over the warp with shuffles and over the block's warps through
// ``red``; ``store(n, sum)`` writes row n.
template <int R, typename T, typename Dot, typename Store>
__device__ __forceinline__ void byte_rows(uint4 (&w)[R][2], const uint4* __restrict__ qw, int chunk, int N,
                                          int kt, int t, bool active, T* red, Dot dot, Store store) {
  const int lane = t & 31, warp = t >> 5, nwarps = blockDim.x >> 5, chunks = (N + R - 1) / R;
  for (; chunk < chunks; chunk += gridDim.x) {
    uint4 wn[R][2];
    const int next = chunk + gridDim.x;
    if (next < chunks) load_chunk<R>(wn, qw, next, N, kt, t, active);
#pragma unroll
    for (int u = 0; u < R; ++u) {
      T acc = dot(w[u], chunk * R + u);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) red[warp * R + u] = acc;
    }
    __syncthreads();
    if (t < R && chunk * R + t < N) {
      T sum = 0;
      for (int i = 0; i < nwarps; ++i) sum += red[i * R + t];
      store(chunk * R + t, sum);
    }
    __syncthreads();
    if (next < chunks) {
#pragma unroll
      for (int u = 0; u < R; ++u) { w[u][0] = wn[u][0]; w[u][1] = wn[u][1]; }
    }
  }
}
"""

_SOURCE = BYTE_GEMV_PRELUDE + r"""
__device__ __forceinline__ int dp4a_ss(u32 a, u32 b, int c) {
  int d; asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ int dot16(uint4 w, uint4 x, int acc) {
  acc = dp4a_ss(w.x, x.x, acc); acc = dp4a_ss(w.y, x.y, acc);
  acc = dp4a_ss(w.z, x.z, acc); acc = dp4a_ss(w.w, x.w, acc);
  return acc;
}

__device__ __forceinline__ u32 quant4(float a, float b, float c, float d, float scale) {
  // quantize_per_token_int8: clamp(round_half_even(x / scale), -128, 127), four to a word
  const int qa = (int)fminf(fmaxf(rintf(__fdiv_rn(a, scale)), -128.f), 127.f);
  const int qb = (int)fminf(fmaxf(rintf(__fdiv_rn(b, scale)), -128.f), 127.f);
  const int qc = (int)fminf(fmaxf(rintf(__fdiv_rn(c, scale)), -128.f), 127.f);
  const int qd = (int)fminf(fmaxf(rintf(__fdiv_rn(d, scale)), -128.f), 127.f);
  return pack4(qa, qb, qc, qd);
}

template <int R>
__device__ __forceinline__ void q8gemv(const uint4* __restrict__ x, const uint4* __restrict__ qw,
                                       const float* __restrict__ wscale, float* __restrict__ out, int N, int K,
                                       bool bf16) {
  __shared__ int red[32 * R];
  const int kt = K >> 5, t = threadIdx.x;
  const bool active = t < kt;
  uint4 w[R][2];
  first_chunk<R>(w, qw, N, kt, t, active);
  // the token's activations: 32 per thread, their absolute maximum over the whole row (block reduction), then
  // int8 exactly as quantize_per_token_int8 does it
  float xv[32];
  const float m = token_absmax(xv, x, t, active, bf16);
  const float a = __fdiv_rn(fmaxf(m, 1e-7f), 127.f);
  uint4 xa, xb;
  xa.x = quant4(xv[0], xv[1], xv[2], xv[3], a); xa.y = quant4(xv[4], xv[5], xv[6], xv[7], a);
  xa.z = quant4(xv[8], xv[9], xv[10], xv[11], a); xa.w = quant4(xv[12], xv[13], xv[14], xv[15], a);
  xb.x = quant4(xv[16], xv[17], xv[18], xv[19], a); xb.y = quant4(xv[20], xv[21], xv[22], xv[23], a);
  xb.z = quant4(xv[24], xv[25], xv[26], xv[27], a); xb.w = quant4(xv[28], xv[29], xv[30], xv[31], a);
  byte_rows<R>(w, qw, blockIdx.x, N, kt, t, active, red,
               [&](const uint4 (&wr)[2], int) { return dot16(wr[1], xb, dot16(wr[0], xa, 0)); },
               [&](int n, int sum) { out[n] = (float)sum * a * wscale[n]; });
}

#define ENTRY(NAME, BOUND, R, BF16)                                                                       \
  extern "C" __global__ void __launch_bounds__(BOUND)                                                   \
  NAME(const uint4* x, const uint4* qw, const float* wscale, float* out, int N, int K) {                \
    q8gemv<R>(x, qw, wscale, out, N, K, BF16);                                                          \
  }
ENTRY(q8gemv_bf16_r4, 512, 4, true)
ENTRY(q8gemv_bf16_wide, 1024, 2, true)
ENTRY(q8gemv_f16_r4, 512, 4, false)
ENTRY(q8gemv_f16_wide, 1024, 2, false)
"""


def problem(n: int, k: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """Why the kernel cannot run an [N, K] int8 weight on ``dtype`` activations, or ""."""
    return device_problem(k, device, dtype)


def _name(dtype: torch.dtype, k: int) -> str:
    return f"q8gemv_{'bf16' if dtype == torch.bfloat16 else 'f16'}_{'wide' if k > WIDE_K else 'r4'}"


def compile_problem(k: int) -> str:
    """Compile (once) the variants for ``k``; "" or the compiler's one-line reason (the caller keeps _int_mm)."""
    return compile_failure([(_SOURCE, _name(dtype, k)) for dtype in (torch.bfloat16, torch.float16)])


def gemv(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [1, K] bf16/fp16 -> float32 [1, N]: ``quantize_per_token_int8(x)``, then ``(x_int8 @ w_int8.T) * act_scale
    * w_scale`` with Int8Linear's exact arithmetic, in one kernel."""
    n, k = w_int8.shape
    x = vector_for_kernel(x)
    out = torch.empty(1, n, device=x.device, dtype=torch.float32)
    # 4 rows a chunk (launch_shape makes it 2 above WIDE_K): each row is two 16-byte loads a thread, twice the int4
    # kernel's registers, so the compiled variants are r4 and wide only
    _, blocks = launch_shape(n, k, sm_count(x.device.index or 0), rows=4)
    launch(compiled(_SOURCE, _name(x.dtype, k)), (blocks, 1, 1), (threads_per_block(k), 1, 1),
           [x, w_int8, w_scale, out, n, k])
    return out


@functools.cache
def custom_op():
    """``torch.ops.quantship.int8_gemv``: the launch as one opaque op for ``torch.compile`` and graph capture."""

    @torch.library.custom_op("quantship::int8_gemv", mutates_args=())
    def op(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        return gemv(x, w_int8, w_scale)

    @op.register_fake
    def _(x, w_int8, w_scale):
        return x.new_empty(1, w_int8.shape[0], dtype=torch.float32)

    return op
