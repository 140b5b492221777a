"""A one-token FP8 W8A8 GEMV in CUDA C for ``Fp8Linear``'s decode on NVIDIA GPUs with FP8 conversions (sm_89+),
compiled with NVRTC at load like ``int4_cuda`` and ``int8_cuda``, whose launch shapes it shares.

Why: ``torch._scaled_mm`` quantizes the token in separate kernels and runs an FP8 GEMM sized for many rows, so a
per-channel FP8 model decoded one sequence at 0.94x bf16 on the H200 (bench/RESULTS.md, "INT8 and FP8 at the
server's cache length"): its weights are half of bf16's bytes and it was slower. No installed library has an FP8
GEMV for one token (vLLM's and TensorRT-LLM's live in their own builds).

What it computes is ``Fp8Linear``'s scaled-mm path for one token: ``quantize_activations_per_token`` (the row's
absolute maximum by a block reduction, ``scale = max / 448`` by true division and clamped below at
``MIN_ACT_SCALE``, then ``x / scale`` clamped to +-448 and rounded to e4m3, nearest even, with PTX's
``cvt.rn.satfinite.e4m3x2.f32``), then ``scale * w_scale[n] * sum_k x_fp8[k] w_fp8[n, k]`` rounded once to the
activation dtype. Each product of two e4m3 values is exact in float32 (8 significant bits), so the only
roundings are float32's in the sum and the output's: tighter than FP8 tensor cores, whose accumulator keeps fewer
bits, so results agree with ``_scaled_mm`` to the output's rounding, not bit for bit (the GPU test bounds both
against float64). Thread ``t`` owns the 32 columns ``32 t .. 32 t + 31``: its 32 activations are quantized once
and kept as floats, each row's 32 weight bytes are two 16-byte loads turned into floats with ``cvt.rn.f16x2.e4m3x2``
(exact), and the float32 sums are reduced with warp shuffles, then over the block's warps. Blocks are persistent
and keep the next chunk's loads in flight, as in ``int4_cuda`` (the loop is ``int8_cuda``'s ``byte_rows``).
ptxas for sm_90: 124 registers and no spills up to K = 16384; the 1024-thread variant above it is held to 64
registers and spills 92 bytes a thread (timed on Llama-3-8B widths only, which stay below it; the GPU tests run
it at K = 28672).

Block scales (``gemv(block=...)``, 128x128 as DeepSeek-V3's and TurboMind's FP8): the token is quantized per
group of the block's columns (the group's lanes share their maximum with shuffles), and each thread scales its
columns' sum by the group's two scales before the reduction; a row's scale is read where it is used (an L1 hit
after the first).

Measured on the H200 (bench/RESULTS.md, seventh session): Llama-3-8B per-channel FP8 at batch 1 280.2 tok/s
against bf16's 217.7 (1.29x; 0.94x through ``_scaled_mm``). One token (``bench/fp8_gemv.py``): gate|up 32.0 us per
channel, 40.1 in blocks, against bf16 cuBLAS 56.6, ``_scaled_mm`` 68.0 and the blocks' dequantize + matmul 1213.
"""

from __future__ import annotations

import functools

import torch

from pipeline.engines.cuda_launch import launch
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
from pipeline.engines.int8_cuda import BYTE_GEMV_PRELUDE
from pipeline.quant.fp8 import FP8_MAX, MIN_ACT_SCALE

_SOURCE = BYTE_GEMV_PRELUDE + r"""
// Two floats to two e4m3 codes (round to nearest even, saturating at +-448): lo in the low byte
__device__ __forceinline__ unsigned short e4m3x2_of(float lo, float hi) {
  unsigned short d; asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo)); return d;
}
// Two e4m3 codes (low byte first) to two floats, exactly (through float16, which holds every e4m3 value)
__device__ __forceinline__ float2 floats_of_e4m3x2(unsigned short v) {
  u32 h2; asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(v));
  float lo, hi;
  asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
      : "=f"(lo), "=f"(hi) : "r"(h2));
  return make_float2(lo, hi);
}
// 16 weights (one 16-byte load, column order) times 16 activations, added to acc
__device__ __forceinline__ float dot16(uint4 w, const float* x, float acc) {
  const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = floats_of_e4m3x2((unsigned short)(words[i] & 0xFFFFu));
    const float2 b = floats_of_e4m3x2((unsigned short)(words[i] >> 16));
    acc = fmaf(a.x, x[4 * i], acc);
    acc = fmaf(a.y, x[4 * i + 1], acc);
    acc = fmaf(b.x, x[4 * i + 2], acc);
    acc = fmaf(b.y, x[4 * i + 3], acc);
  }
  return acc;
}


// BLK: 128x128-style block scales (``wscale`` [ceil(N / BO), GPR], BI columns a group, BI / 32 a power of two up
// to 32 lanes): the token is quantized per BI-column group (the group's lanes share their maximum with shuffles),
// and each thread scales its 32 columns' sum by its group's two scales before the reduction.
template <int R, bool BLK>
__device__ __forceinline__ void f8gemv(const uint4* __restrict__ x, const uint4* __restrict__ qw,
                                       const float* __restrict__ wscale, u16* __restrict__ out, int N, int K,
                                       float fp8_max, float min_scale, bool bf16, int bo, int bi, int gpr) {
  __shared__ float red[32 * R];
  const int kt = K >> 5, t = threadIdx.x;
  const bool active = t < kt;
  uint4 w[R][2];
  first_chunk<R>(w, qw, N, kt, t, active);
  // the token's activations: 32 per thread, their absolute maximum over the row (block reduction), then e4m3 as
  // quantize_activations_per_token does it, kept as the floats they stand for
  float xv[32];
  float m = token_absmax(xv, x, t, active, bf16);
  if (BLK) {  // the maximum of this thread's group of BI columns instead
    m = 0.f;
#pragma unroll
    for (int j = 0; j < 32; ++j) m = fmaxf(m, fabsf(xv[j]));
    for (int o = 1; o < (bi >> 5); o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  }
  const float a = fmaxf(__fdiv_rn(m, fp8_max), min_scale);
  const int g = (t << 5) / bi;  // BLK: this thread's column group
#pragma unroll
  for (int j = 0; j < 32; j += 2) {
    const float lo = fminf(fmaxf(__fdiv_rn(xv[j], a), -fp8_max), fp8_max);
    const float hi = fminf(fmaxf(__fdiv_rn(xv[j + 1], a), -fp8_max), fp8_max);
    const float2 q = floats_of_e4m3x2(e4m3x2_of(lo, hi));
    xv[j] = q.x;
    xv[j + 1] = q.y;
  }
  byte_rows<R>(w, qw, blockIdx.x, N, kt, t, active, red,
               [&](const uint4 (&wr)[2], int n) {
                 const float d = dot16(wr[1], xv + 16, dot16(wr[0], xv, 0.f));
                 return BLK && n < N && active ? d * a * __ldg(wscale + (size_t)(n / bo) * gpr + g) : d;
               },
               [&](int n, float sum) { out[n] = f32_to_act(BLK ? sum : sum * a * wscale[n], bf16); });
}

#define ENTRY(NAME, BOUND, R, BF16, BLK)                                                                  \
  extern "C" __global__ void __launch_bounds__(BOUND)                                                   \
  NAME(const uint4* x, const uint4* qw, const float* wscale, u16* out, int N, int K, double fmax,        \
       double smin, int bo, int bi, int gpr) {                                                           \
    f8gemv<R, BLK>(x, qw, wscale, out, N, K, (float)fmax, (float)smin, BF16, bo, bi, gpr);             \
  }
"""
_VARIANTS = {(dt, wide, blk): f"f8gemv_{dt}_{'wide' if wide else 'r4'}{'_blk' if blk else ''}"
             for dt in ("bf16", "f16") for wide in (False, True) for blk in (False, True)}
_SOURCE += "".join(f"ENTRY({name}, {1024 if wide else 512}, {2 if wide else 4}, {'true' if dt == 'bf16' else 'false'}, "
                   f"{'true' if blk else 'false'})\n" for (dt, wide, blk), name in _VARIANTS.items())


def problem(n: int, k: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
            block: tuple[int, int] | None = None) -> str:
    """Why the kernel cannot run an [N, K] e4m3 weight (per channel, or in ``block`` (rows, columns) blocks) on
    ``dtype`` activations, or ""."""
    if block is not None and (block[1] % 32 or block[1] > 1024 or (block[1] // 32) & (block[1] // 32 - 1)):
        return f"blocks of {block[1]} columns (needs 32 times a power of two, at most 1024)"
    why = device_problem(k, device, dtype)
    if not why and torch.cuda.get_device_capability(device.index or 0) < (8, 9):
        return "a GPU before sm_89 (no FP8 conversions)"
    return why


def _name(dtype: torch.dtype, k: int, block: bool = False) -> str:
    return _VARIANTS[("bf16" if dtype == torch.bfloat16 else "f16", k > WIDE_K, block)]


def compile_problem(k: int, block: bool = False) -> str:
    """Compile (once) the variants for ``k``; "" or the compiler's one-line reason (the caller keeps its path)."""
    return compile_failure([(_SOURCE, _name(dtype, k, block)) for dtype in (torch.bfloat16, torch.float16)])


def gemv(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
         block: tuple[int, int] | None = None) -> torch.Tensor:
    """x [1, K] bf16/fp16 -> [1, N] in x's dtype: ``quantize_activations_per_token(x)``, then ``x_scale * w_scale *
    (x_fp8 @ w_fp8.T)`` (module docstring), in one kernel. ``w_scale``: float32, one per row; with ``block`` (rows,
    columns) the [ceil(N / rows), ceil(K / columns)] block scales, and the token quantized per group of ``columns``
    (``quantize_activations_per_token(x, columns)``, the engines' 1 x 128 groups)."""
    n, k = w_fp8.shape
    x = vector_for_kernel(x)
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    _, blocks = launch_shape(n, k, sm_count(x.device.index or 0), rows=4)  # 2 rows a chunk above WIDE_K
    bo, bi = block or (1, k)
    launch(compiled(_SOURCE, _name(x.dtype, k, block is not None)), (blocks, 1, 1), (threads_per_block(k), 1, 1),
           [x, w_fp8, w_scale.contiguous(), out, n, k, FP8_MAX, MIN_ACT_SCALE, bo, bi, -(-k // bi)])
    return out


def reference(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
              block: tuple[int, int] | None = None) -> torch.Tensor:
    """What :func:`gemv` stands for, in float64 over the same quantized activations: [1, N] float64."""
    from pipeline.quant.fp8 import dequantize_activations, dequantize_fp8, quantize_activations_per_token

    if block is None:
        x_fp8, x_scale = quantize_activations_per_token(x.reshape(1, -1))
        return (x_fp8.double() @ w_fp8.double().t()) * x_scale.double() * w_scale.double().reshape(1, -1)
    xq = dequantize_activations(*quantize_activations_per_token(x.reshape(1, -1).float(), block[1]), block[1])
    return xq.double() @ dequantize_fp8(w_fp8, w_scale, block).double().t()


@functools.cache
def custom_op():
    """``torch.ops.quantship.fp8_gemv``: the launch as one opaque op for ``torch.compile`` and graph capture."""

    @torch.library.custom_op("quantship::fp8_gemv", mutates_args=())
    def op(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, block_rows: int = 0,
           block_cols: int = 0) -> torch.Tensor:  # fmt: skip
        return gemv(x, w_fp8, w_scale, (block_rows, block_cols) if block_rows else None)

    @op.register_fake
    def _(x, w_fp8, w_scale, block_rows=0, block_cols=0):
        return x.new_empty(1, w_fp8.shape[0])

    return op
