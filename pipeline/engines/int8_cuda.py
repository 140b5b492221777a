"""A one-token W8A8 GEMV in CUDA C for ``Int8Linear``'s decode on NVIDIA GPUs (compiled with NVRTC at load, like
``int4_cuda``, whose launch shapes it shares).

Why: ``torch._int_mm`` (cuBLASLt) needs more than 16 rows, so a decode step pads one token to 17 and the INT8
model decoded at 0.57x bf16 on the H200 (bench/RESULTS.md, "Fast low-bit decode"): slower than the float model it
replaces. Here thread ``t`` owns the 32 columns ``32 t .. 32 t + 31``: its 32 activation bytes (the per-token
int8 of ``quantize_per_token_int8``) stay in 8 registers, each row's 32 weight bytes come as two 16-byte loads,
and 8 ``dp4a`` (signed 4-byte dot products into int32) take them. The int32 sums are reduced exactly (warp
shuffles, then the block's warps), so a row's accumulator is bit for bit ``_int_mm``'s, and the epilogue is
``Int8Linear``'s own float32 arithmetic in its order (``acc * act_scale * w_scale``): the result is identical to
the ``_int_mm`` path (the GPU test checks equality). Blocks are persistent and keep the next chunk's loads in
flight, as in ``int4_cuda``.
"""

from __future__ import annotations

import functools

import torch

from pipeline.engines.int4_cuda import MAX_K, WIDE_K, sm_count, launch_shape, threads_per_block

_SOURCE = r"""
typedef unsigned int u32;

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ int dp4a_ss(u32 a, u32 b, int c) {
  int d; asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ int dot16(uint4 w, uint4 x, int acc) {
  acc = dp4a_ss(w.x, x.x, acc); acc = dp4a_ss(w.y, x.y, acc);
  acc = dp4a_ss(w.z, x.z, acc); acc = dp4a_ss(w.w, x.w, acc);
  return acc;
}

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

template <int R>
__device__ __forceinline__ void q8gemv(const uint4* __restrict__ x, const float* __restrict__ act_scale,
                                       const uint4* __restrict__ qw, const float* __restrict__ wscale,
                                       float* __restrict__ out, int N, int K) {
  __shared__ int red[32 * R];
  const int kt = K >> 5, t = threadIdx.x, lane = t & 31, warp = t >> 5, nwarps = blockDim.x >> 5;
  const bool active = t < kt;
  const int chunks = (N + R - 1) / R;
  int chunk = blockIdx.x;
  uint4 w[R][2];
  load_chunk<R>(w, qw, chunk, N, kt, t, active);
  const uint4 xa = active ? x[t * 2] : make_uint4(0u, 0u, 0u, 0u);
  const uint4 xb = active ? x[t * 2 + 1] : make_uint4(0u, 0u, 0u, 0u);
  const float a = act_scale[0];
  for (; chunk < chunks; chunk += gridDim.x) {
    uint4 wn[R][2];
    const int next = chunk + gridDim.x;
    if (next < chunks) load_chunk<R>(wn, qw, next, N, kt, t, active);
#pragma unroll
    for (int u = 0; u < R; ++u) {
      int acc = dot16(w[u][1], xb, dot16(w[u][0], xa, 0));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) red[warp * R + u] = acc;
    }
    __syncthreads();
    if (t < R && chunk * R + t < N) {
      int sum = 0;
      for (int i = 0; i < nwarps; ++i) sum += red[i * R + t];
      out[chunk * R + t] = (float)sum * a * wscale[chunk * R + t];
    }
    __syncthreads();
    if (next < chunks) {
#pragma unroll
      for (int u = 0; u < R; ++u) { w[u][0] = wn[u][0]; w[u][1] = wn[u][1]; }
    }
  }
}

#define ENTRY(NAME, BOUND, R)                                                                             \
  extern "C" __global__ void __launch_bounds__(BOUND)                                                   \
  NAME(const uint4* x, const float* act_scale, const uint4* qw, const float* wscale, float* out, int N, int K) { \
    q8gemv<R>(x, act_scale, qw, wscale, out, N, K);                                                     \
  }
ENTRY(q8gemv_r4, 512, 4)
ENTRY(q8gemv_r8, 512, 8)
ENTRY(q8gemv_wide, 1024, 2)
"""


def problem(n: int, k: int, device: torch.device) -> str:
    """Why the kernel cannot run an [N, K] int8 weight, or ""."""
    if device.type != "cuda":
        return f"device {device.type}"
    if k % 32 or k > MAX_K:
        return f"K = {k} (needs K % 32 == 0 and K <= {MAX_K})"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this torch has no torch.cuda._compile_kernel (NVRTC)"
    return ""


@functools.cache
def _kernel(name: str):
    return torch.cuda._compile_kernel(_SOURCE, name)


def _name(k: int, rows: int) -> str:
    return "q8gemv_wide" if k > WIDE_K else f"q8gemv_r{rows}"


def compile_problem(k: int) -> str:
    """Compile (once) the variants for ``k``; "" or the compiler's one-line reason."""
    try:
        for rows in ((2,) if k > WIDE_K else (4, 8)):
            _kernel(_name(k, rows))
    except Exception as e:  # no CUDA headers, NVRTC missing: the caller keeps _int_mm
        return f"NVRTC compile failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return ""


def gemv(x_int8: torch.Tensor, act_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x_int8 [1, K], act_scale [1, 1] float32, w_int8 [N, K], w_scale [N] float32 -> float32 [1, N]:
    ``(x_int8 @ w_int8.T) * act_scale * w_scale`` with Int8Linear's exact arithmetic."""
    n, k = w_int8.shape
    x = x_int8.reshape(-1)
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone()
    out = torch.empty(1, n, device=x.device, dtype=torch.float32)
    rows, blocks = launch_shape(n, k, sm_count(x.device.index or 0))
    _kernel(_name(k, rows))(grid=(blocks, 1, 1), block=(threads_per_block(k), 1, 1),
                            args=[x, act_scale.float().contiguous(), w_int8, w_scale, out, n, k])
    return out


@functools.cache
def custom_op():
    """``torch.ops.quantship.int8_gemv``: the launch as one opaque op for ``torch.compile`` and graph capture."""

    @torch.library.custom_op("quantship::int8_gemv", mutates_args=())
    def op(x_int8: torch.Tensor, act_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        return gemv(x_int8, act_scale, w_int8, w_scale)

    @op.register_fake
    def _(x_int8, act_scale, w_int8, w_scale):
        return x_int8.new_empty(1, w_int8.shape[0], dtype=torch.float32)

    return op
