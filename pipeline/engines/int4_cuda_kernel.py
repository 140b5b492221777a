"""The CUDA C source of the one-token INT4 GEMV (:mod:`pipeline.engines.int4_cuda` says what it computes, how it
is laid out and why it is written by hand; that module instantiates, compiles and launches it). Kept apart so the
launch logic reads in one sitting; ``CUDA_PRELUDE`` is shared with ``int8_cuda``'s kernel.
"""

from pipeline.engines.cuda_launch import GRID_SYNC

# Device helpers both one-token kernels use (this module's and ``int8_cuda``'s): activation conversions, a
# streaming 16-byte load that bypasses L1, four bytes packed into a word; then the grid dependency control of
# programmatic dependent launch (``GRID_SYNC``).
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
""" + GRID_SYNC

SOURCE = CUDA_PRELUDE + r"""
__device__ __forceinline__ int dp4a_us(u32 a, int b, int c) {  // unsigned bytes . signed bytes + c
  int d; asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 dp4a_uu(u32 a, u32 b, u32 c) {  // unsigned bytes . unsigned bytes + c
  u32 d; asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
// Row ``u`` of chunk ``chunk`` (-1 past the end). MAP 0: R consecutive rows. MAP 1 (the SwiGLU epilogue over
// gate|up): rows i .. i + R/2 - 1 of the first half (gate) and the same rows of the second half (up), i = chunk *
// R/2. MAP 2 (the rotary epilogue over q|k|v, heads of HD rows, HD % R == 0): rows j .. j + R/2 - 1 of a head and
// their rotary partners j + HD/2 .. j + HD/2 + R/2 - 1, j = R/2 * (chunk % (HD / R)).
template <int R, int MAP>
__device__ __forceinline__ int chunk_row(int chunk, int u, int N, int hd) {
  if (MAP == 2) {
    const int per = hd / R, head = chunk / per, j = (chunk % per) * (R / 2);
    const int n = head * hd + (u < R / 2 ? j + u : (hd >> 1) + j + u - R / 2);
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

// The warp's sums of R rows' partial products (R a power of two <= 32) in five exchange rounds, R - 1 + 5 - log2(R)
// shuffles (R = 4: 6, where four separate reductions take 20): in each of the first log2(R) rounds a lane keeps
// half of its rows (the upper half where its lane bit is set) and adds the partner's values of those rows; then
// one row is left, summed over the remaining lanes. v[0] ends as the sum of row lane / (32 / R), returned. (H200,
// an 8B layer's four GEMVs: 46.9 us against 47.5 with separate reductions; decode 462 against 445 tok/s.)
template <int R>
__device__ __forceinline__ int warp_sum_rows(float (&v)[R], int lane) {
  int off = 16;
#pragma unroll
  for (int n = R; n > 1; n >>= 1, off >>= 1) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int j = 0; j < n / 2; ++j) {
      const float send = upper ? v[j] : v[j + n / 2];
      const float keep = upper ? v[j + n / 2] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
#pragma unroll
  for (; off > 0; off >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
  return R == 1 ? 0 : lane / (32 / R);
}

__device__ __forceinline__ float round_act(float f, bool bf16) { return act_to_f32(f32_to_act(f, bf16), bf16); }

// 32 activations as 16-bit fixed point with one power-of-two scale (the largest magnitude mapped below 2^14),
// split in a signed high and an unsigned low byte, packed four to a word in the codes' order: ``xh``/``xl``
// [word j][even 0 / odd 1]; ``xscale`` = 2^-shift, ``xsum`` the fixed-point values' sum. False (all zero) for inf
// or NaN among them.
__device__ __forceinline__ bool to_fixed32(const float (&xv)[32], u32 (&xh)[8], u32 (&xl)[8], float& xscale,
                                           int& xsum) {
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < 32; ++j) m = fmaxf(m, fabsf(xv[j]));
  const bool finite = m <= 3.402823466e38f;  // false for inf and NaN
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
  return finite;
}

// One row's 32 codes ``w`` (a 16-byte unit) with its group's scale word ``s`` against the token's fixed point:
// the even and odd codes of a word as bytes (one shift, two masks), four dp4a against the high and low bytes,
// then s * 2^-shift * (sum q x - z sum x); 0 for a padded row (s == 0).
__device__ __forceinline__ float unit_dot(const uint4& w, u32 s, const u32 (&xh)[8], const u32 (&xl)[8],
                                          float xscale, int xsum) {
  const u32 words[4] = {w.x, w.y, w.z, w.w};
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
  const int zero = (int)(s & 0xFFu);
  const float scale = __uint_as_float(s & 0xFFFFFF00u);
  return s ? scale * xscale * (float)(hi * 256 + (int)lo - zero * xsum) : 0.f;
}

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

// One chunk's products, reductions and epilogue, from its weights ``w``/``s`` and epilogue inputs ``side`` (loaded
// by the caller, ahead of time); ``it``: the block's chunk count so far (the norm's factor is read at the first).
template <int R, bool NORM, int EPI>
__device__ __forceinline__ void chunk_body(const uint4 (&w)[R], const u32 (&s)[R], const float (&side)[2],
                                           int chunk, int it, const u32 (&xh)[8], const u32 (&xl)[8], float xscale,
                                           int xsum, bool finite, float& norm, float* red, const float* ssum,
                                           u16* __restrict__ out, const Rope& rope, int N, int K, float eps,
                                           bool bf16, long long position) {
  constexpr bool PAIRS = EPI == 2;
  constexpr int MAP = EPI == 2 ? 1 : EPI == 3 ? 2 : 0;
  constexpr int OUT = PAIRS ? R / 2 : R;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, nwarps = blockDim.x >> 5;
  const int nout = PAIRS ? N >> 1 : N;
  const int o = chunk * OUT + t;  // this thread's output, for t < OUT
  const int row = EPI == 3 && t < R ? chunk_row<R, MAP>(chunk, t, N, rope.hd) : -1;
  float* const part = red;
  float v[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    v[u] = unit_dot(w[u], s[u], xh, xl, xscale, xsum);
    if (!finite) v[u] = __int_as_float(0x7fc00000);
  }
  const int row_of_lane = warp_sum_rows<R>(v, lane);
  if ((lane & (32 / R - 1)) == 0) part[warp * R + row_of_lane] = v[0];
  __syncthreads();
  if (NORM && it == 0) {
    float total = 0.f;
    for (int i = 0; i < nwarps; ++i) total += ssum[i];
    norm = rsqrtf(total / (float)K + eps);
  }
  float mine = 0.f, other = 0.f;  // the totals of row t and of its partner (rotary: t ^ R/2; SwiGLU: t + R/2)
  if (t < R) {  // (warp 0 summing them with shuffles, 2 loads a lane: no faster in the chain, slower in decode)
    for (int i = 0; i < nwarps; ++i) mine += part[i * R + t];
    if (EPI == 3 || PAIRS)
      for (int i = 0; i < nwarps; ++i) other += part[i * R + (EPI == 3 ? t ^ (R / 2) : (t + R / 2) % R)];
  }
  if (EPI == 3 && row >= 0) {  // output t, its rotary partner t ^ R/2 (the same row of the other half)
    if (NORM) {
      mine *= norm;
      other *= norm;
    }
    const float a = round_act(mine, bf16), b = round_act(other, bf16);
    const int d = row % rope.hd, kvrows = (N - rope.qrows) >> 1;
    if (row < rope.qrows + kvrows) {  // q or k: rotated (side: this row's cos and sin)
      const float v = __fadd_rn(__fmul_rn(a, side[0]), __fmul_rn(t < R / 2 ? -b : b, side[1]));
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
    float sum = mine, up = other;
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
template <int R, bool NORM, int EPI, int AHEAD>
__device__ __forceinline__ void q4gemv(const u16* __restrict__ x, const u16* __restrict__ nw,
                                       const u16* __restrict__ res, const uint4* __restrict__ qw,
                                       const u32* __restrict__ sz, u16* __restrict__ out,
                                       int N, int K, int G, float eps, bool bf16, const Rope rope) {
  constexpr bool PAIRS = EPI == 2;
  constexpr int MAP = EPI == 2 ? 1 : EPI == 3 ? 2 : 0;
  constexpr int OUT = PAIRS ? R / 2 : R;  // outputs per chunk
  __shared__ float red[32 * R];
  __shared__ float ssum[32];
  const int kt = K >> 5, t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const bool active = t < kt;
  const int nout = PAIRS ? N >> 1 : N;
  const int gpr = K / G, g = (t * 32) / G, chunks = (nout + OUT - 1) / OUT;
  int chunk = blockIdx.x;
  uint4 w[R], w2[R];  // w2: AHEAD 2's second buffer (the block's next chunk, loaded right after the wait)
  u32 s[R], s2[R];
  load_chunk<R, MAP>(w, s, qw, sz, chunk, N, kt, gpr, g, t, active, rope.hd);  // in flight during the prologue
  // Programmatic dependent launch (pipeline.engines.cuda_launch): the next kernel may be launched now (its blocks
  // start where ours leave room, and issue their own weight loads); the weights above are all this kernel reads
  // before the kernel before it has completed.
  grid_launch_next();
  grid_wait();
  if (AHEAD == 2 && chunk + (int)gridDim.x < chunks)
    load_chunk<R, MAP>(w2, s2, qw, sz, chunk + gridDim.x, N, kt, gpr, g, t, active, rope.hd);
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
  if (active) finite = to_fixed32(xv, xh, xl, xscale, xsum);

  float norm = 1.f;  // NORM: rsqrt(mean(x^2) + eps), from the first chunk's barrier on
  if (AHEAD == 2) {
    // Three buffers of weights in rotation, the loop unrolled by three so that no register moves between them: a
    // chunk is computed while the next two are in flight. (Rotating them with moves, as AHEAD 1 does, made every
    // iteration wait for the load it had just issued: no faster than one ahead on the H200.)
    const int step = gridDim.x;
    uint4 w3[R];
    u32 s3[R];
    float side2[2] = {0.f, 0.f}, side3[2] = {0.f, 0.f};
    if (chunk + step < chunks) load_side<R, MAP, EPI>(side2, res, rope, chunk + step, N, nout, OUT, t, bf16);
    int it = 0;
    // computes the chunk in ``cw`` while loading the one two ahead into ``lw`` (freed by the chunk before); false
    // at the block's last chunk
    auto phase = [&](const uint4 (&cw)[R], const u32 (&cs)[R], const float (&cside)[2], uint4 (&lw)[R],
                     u32 (&ls)[R], float (&lside)[2]) -> bool {
      if (chunk + 2 * step < chunks) {
        load_chunk<R, MAP>(lw, ls, qw, sz, chunk + 2 * step, N, kt, gpr, g, t, active, rope.hd);
        load_side<R, MAP, EPI>(lside, res, rope, chunk + 2 * step, N, nout, OUT, t, bf16);
      }
      chunk_body<R, NORM, EPI>(cw, cs, cside, chunk, it++, xh, xl, xscale, xsum, finite, norm, red, ssum, out, rope,
                               N, K, eps, bf16, position);
      return (chunk += step) < chunks;
    };
    while (phase(w, s, side, w3, s3, side3) && phase(w2, s2, side2, w, s, side) &&
           phase(w3, s3, side3, w2, s2, side2)) {
    }
    return;
  }
  for (int it = 0; chunk < chunks; chunk += gridDim.x, ++it) {
    uint4 wn[R];
    u32 sn[R];
    float side_next[2] = {0.f, 0.f};
    const int next = chunk + gridDim.x;
    if (next < chunks) {
      load_chunk<R, MAP>(wn, sn, qw, sz, next, N, kt, gpr, g, t, active, rope.hd);
      load_side<R, MAP, EPI>(side_next, res, rope, next, N, nout, OUT, t, bf16);
    }
    chunk_body<R, NORM, EPI>(w, s, side, chunk, it, xh, xl, xscale, xsum, finite, norm, red, ssum, out, rope, N, K,
                             eps, bf16, position);
    if (next < chunks) {
#pragma unroll
      for (int u = 0; u < R; ++u) { w[u] = wn[u]; s[u] = sn[u]; }
      side[0] = side_next[0];
      side[1] = side_next[1];
    }
  }
}

// entries: q4gemv_<bf16|f16>_<r2|r4|r8|wide>_t<threads>[_a2][_norm][_<epilogue>] (see _variant); each compiles only
// its own
#define ENTRY(NAME, ATTR, R, NORM, EPI, BF16, AHEAD)                                                     \
  extern "C" __global__ void ATTR                                                                      \
  NAME(const u16* x, const u16* nw, const u16* res, const uint4* qw, const u32* sz, u16* out, int N,     \
       int K, int G, double eps, const u16* sn, const long long* pos, u16* kc, u16* vc, int qrows, int hd,  \
       int hstride, const u16* add, u16* hout, int has_add) {                                          \
    const Rope rope = {sn, pos, kc, vc, qrows, hd, hstride, has_add ? add : nullptr, hout};            \
    q4gemv<R, NORM, EPI, AHEAD>(x, nw, res, qw, sz, out, N, K, G, (float)eps, BF16, rope);            \
  }
"""
