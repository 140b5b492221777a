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

The kernel (one block per ``R`` output rows; thread ``t`` owns the 32 columns ``32 t .. 32 t + 31`` of the
activation in registers, so a block spans the whole of K, up to 32 768):

- the block's ``R`` 16-byte weight loads per thread are issued first, then the activation is read and scaled
  while they are in flight (a first version loaded 4 rows at a time after the activation and read at ~1.2-2.0
  TB/s on the H200, no faster than tinygemm);

- a code is turned into a float with no convert instruction: for a word shifted so that a pair of codes sits
  at mantissa bits 15-18 and 19-22, ``float_bits(0x3F800000 | (w' & 0x00078000))`` is ``1 + q / 256`` (and
  the other mask gives ``1 + q / 16``); with the activation pre-scaled by 256 (or 16) the product is
  ``x' + q x``, and the thread subtracts the constant ``sum x'`` once per row. Four shifts, eight LOP3 and eight
  FMAs per 8 weights; each product's rounding error is 2^-24 of ``512 |x|``, far below bfloat16's output step;
- per row: ``s * (sum q x - z * sum x)``, a warp shuffle reduction, then a sum over the block's warps in shared
  memory, written in the activation dtype (bfloat16 or float16).

The arithmetic is mirrored in plain tensor ops by :func:`reference_dot` so the CPU tests check the bit tricks;
the GPU tests (marked ``gpu``) compare the kernel with the float64 product.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

MAX_K = 32 * 1024  # one block of 1024 threads x 32 columns
WIDE_K = 16 * 1024  # above: the 1024-thread variant, 4 rows a block
ROWS = (4, 8, 16)  # rows per block of the compiled variants

_SOURCE = r"""
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
#define ONE 0x3F800000u
// sum_j (1 + q_j c_j) xs_j over the 8 codes of w; c_j = 2^-8 (even j) or 2^-4 (odd j), xs pre-scaled by 1/c_j:
// each pair of codes is shifted to mantissa bits 15-18 and 19-22 (bit 23 is the exponent's)
__device__ __forceinline__ float dot8(u32 w, const float* xs, float acc) {
  const u32 a = w << 15, b = w << 7, c = w >> 1, d = w >> 9;
  acc = fmaf(__uint_as_float((a & 0x00078000u) | ONE), xs[0], acc);
  acc = fmaf(__uint_as_float((a & 0x00780000u) | ONE), xs[1], acc);
  acc = fmaf(__uint_as_float((b & 0x00078000u) | ONE), xs[2], acc);
  acc = fmaf(__uint_as_float((b & 0x00780000u) | ONE), xs[3], acc);
  acc = fmaf(__uint_as_float((c & 0x00078000u) | ONE), xs[4], acc);
  acc = fmaf(__uint_as_float((c & 0x00780000u) | ONE), xs[5], acc);
  acc = fmaf(__uint_as_float((d & 0x00078000u) | ONE), xs[6], acc);
  acc = fmaf(__uint_as_float((d & 0x00780000u) | ONE), xs[7], acc);
  return acc;
}

template <int R>
__device__ __forceinline__ void q4gemv(const u16* __restrict__ x, const uint4* __restrict__ qw,
                                       const u32* __restrict__ sz, u16* __restrict__ out,
                                       int N, int K, int G, bool bf16) {
  __shared__ float red[32 * R];
  const int kt = K >> 5, t = threadIdx.x, lane = t & 31, warp = t >> 5, nwarps = blockDim.x >> 5;
  const bool active = t < kt;
  const int gpr = K / G, g = (t * 32) / G, row0 = blockIdx.x * R;
  // every weight load of the block first, so they are in flight while x is read and scaled
  uint4 w[R];
  u32 s[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int n = row0 + u;
    const bool ok = active && n < N;
    w[u] = ok ? load_stream(qw + (size_t)n * kt + t) : make_uint4(0u, 0u, 0u, 0u);
    s[u] = ok ? __ldg(sz + (size_t)n * gpr + g) : 0u;
  }
  float xs[32];
  float C = 0.f, X = 0.f;
  if (active) {
    const uint4* xp = reinterpret_cast<const uint4*>(x) + t * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 v = xp[i];
      const u32 parts[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float lo = act_to_f32((u16)(parts[p] & 0xFFFFu), bf16), hi = act_to_f32((u16)(parts[p] >> 16), bf16);
        xs[i * 8 + p * 2] = lo * 256.f;
        xs[i * 8 + p * 2 + 1] = hi * 16.f;
        X += lo + hi;
      }
    }
#pragma unroll
    for (int j = 0; j < 32; ++j) C += xs[j];
  } else {
#pragma unroll
    for (int j = 0; j < 32; ++j) xs[j] = 0.f;
  }
#pragma unroll
  for (int u = 0; u < R; ++u) {
    float acc = dot8(w[u].x, xs, 0.f);
    acc = dot8(w[u].y, xs + 8, acc);
    acc = dot8(w[u].z, xs + 16, acc);
    acc = dot8(w[u].w, xs + 24, acc);
    const float scale = __uint_as_float(s[u] & 0xFFFFFF00u), zero = (float)(s[u] & 0xFFu);
    float v = s[u] ? scale * ((acc - C) - zero * X) : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) red[warp * R + u] = v;
  }
  __syncthreads();
  if (t < R && row0 + t < N) {
    float sum = 0.f;
    for (int i = 0; i < nwarps; ++i) sum += red[i * R + t];
    out[row0 + t] = f32_to_act(sum, bf16);
  }
}

#define ENTRY(NAME, BOUND, R, BF16)                                                                     \
  extern "C" __global__ void __launch_bounds__(BOUND)                                                 \
  NAME(const u16* x, const uint4* qw, const u32* sz, u16* out, int N, int K, int G) {                 \
    q4gemv<R>(x, qw, sz, out, N, K, G, BF16);                                                         \
  }
ENTRY(q4gemv_bf16_r4, 512, 4, true)
ENTRY(q4gemv_bf16_r8, 512, 8, true)
ENTRY(q4gemv_bf16_r16, 512, 16, true)
ENTRY(q4gemv_bf16_wide, 1024, 4, true)
ENTRY(q4gemv_f16_r4, 512, 4, false)
ENTRY(q4gemv_f16_r8, 512, 8, false)
ENTRY(q4gemv_f16_r16, 512, 16, false)
ENTRY(q4gemv_f16_wide, 1024, 4, false)
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
    """The kernel's arithmetic in tensor ops, float32 (x [K], qweight int32 [N, K / 8]) -> [N]: the same masks,
    the same ``1 + q c`` floats, the same per-thread constants; the CPU tests check it against float64."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    w = qweight.to(torch.int64) & 0xFFFFFFFF  # unsigned words
    shifted = [(w << 15) & 0xFFFFFFFF, (w << 7) & 0xFFFFFFFF, w >> 1, w >> 9]
    vals = []
    for j in range(8):
        mask = 0x00078000 if j % 2 == 0 else 0x00780000
        bits = (shifted[j // 2] & mask) | 0x3F800000
        vals.append(bits.to(torch.int32).view(torch.float32))
    ones_plus = torch.stack(vals, dim=-1).reshape(n, k)  # 1 + q c_j
    xf = x.float()
    xs = xf * torch.tensor([256.0, 16.0], dtype=torch.float32).repeat(k // 2)
    per_thread = (ones_plus * xs).reshape(n, k // 32, 32).sum(-1)  # one thread's acc
    c_const = xs.reshape(k // 32, 32).sum(-1)
    x_sum = xf.reshape(k // 32, 32).sum(-1)
    scale, zero = unpack_scale_zero(sz)
    g = torch.arange(k // 32) * 32 // group
    return (scale[:, g] * ((per_thread - c_const) - zero[:, g].float() * x_sum)).sum(-1)


def problem(n: int, k: int, group: int, device: torch.device, dtype: torch.dtype) -> str:
    """Why the kernel cannot run this linear, or ""."""
    if device.type != "cuda":
        return f"device {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"activations in {dtype}"
    if k % 32 or group % 32 or k % group or k > MAX_K:
        return f"K = {k}, group {group} (needs K % 32 == 0, group % 32 == 0 and K <= {MAX_K})"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this torch has no torch.cuda._compile_kernel (NVRTC)"
    return ""


@functools.cache
def _kernel(name: str):
    return torch.cuda._compile_kernel(_SOURCE, name)


def compile_problem(dtype: torch.dtype, k: int) -> str:
    """Compile (once) the variants for ``dtype`` and ``k``; "" or the compiler's one-line reason."""
    try:
        for rows in ((4,) if k > WIDE_K else ROWS):
            _kernel(_name(dtype, k, rows))
    except Exception as e:  # no CUDA headers, NVRTC missing, an old driver: the caller keeps tinygemm
        return f"NVRTC compile failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return ""


def _name(dtype: torch.dtype, k: int, rows: int) -> str:
    kind = "bf16" if dtype == torch.bfloat16 else "f16"
    return f"q4gemv_{kind}_wide" if k > WIDE_K else f"q4gemv_{kind}_r{rows}"


def rows_per_block(n: int, k: int, sms: int) -> int:
    """Rows per block (a compiled variant): 4 for K above 16 384 (1024 threads, 64 registers each); else the
    most rows that still leave two blocks per SM (measured on the H200, bench/int4_gemv.py: 8 or 16 rows
    read 1.2-1.9x faster than 1-2 rows)."""
    if k > WIDE_K:
        return 4
    for rows in (16, 8):
        if n // rows >= 2 * sms:
            return rows
    return 4


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group: int, rows: int | None = None) -> torch.Tensor:
    """x [1, K] (bf16/fp16, CUDA) @ dequant(qweight, sz).T -> [1, N] in x's dtype."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    x = x.reshape(-1)
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone()
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    r = 4 if k > WIDE_K else (rows or rows_per_block(n, k, _sms(x.device.index or 0)))
    threads = -(-k // 32 // 32) * 32
    _kernel(_name(x.dtype, k, r))(grid=(-(-n // r), 1, 1), block=(threads, 1, 1), args=[x, qweight, sz, out, n, k, group])
    return out


@functools.cache
def custom_op():
    """``torch.ops.quantship.int4_gemv``: the launch as one opaque op for ``torch.compile`` and graph capture."""

    @torch.library.custom_op("quantship::int4_gemv", mutates_args=())
    def op(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
        return gemv(x, qweight, sz, group)

    @op.register_fake
    def _(x, qweight, sz, group):
        return x.new_empty(1, qweight.shape[0])

    return op
