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
next chunk's 16-byte weight loads issued before the current chunk is computed (register double-buffering). Where a
block is alone on its SM (K above ``AHEAD2_ABOVE_K``: 8B's down, 448 threads) it keeps two chunks in flight, in
three register buffers with the loop unrolled by three: rotated with register moves instead, every iteration waited
for the load it had just issued and gained nothing. On the H200 down alone took 12.8-12.9 against 14.0-14.2 us, but
the layer chain (47.2 against 46.9 us) and decode (448.5 against 439.1 tok/s in one call, 436.4 against 449.6 in
the next) moved within their noise. The products are integer:

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

Fused variants (``quantship::int4_gemv``'s options, the one-token decode layer of ``serve/fused_proj.py``): the
input may be RMSNorm(x) (its factor applied to the result, the sum of squares reduced beside the products), and
the output may have a residual added, or be silu(gate) * up over the rows' two halves (a chunk then holds rows
of both halves, so the epilogue has each gate with its up); :func:`fused_reference` says what they stand for.
``quantship::int4_gemv_rope`` takes q|k|v: a chunk holds rows j, j + 1 of a head and their rotate_half partners
j + HD/2, j + HD/2 + 1, so its epilogue applies the rotary embedding and writes k and v straight into the static
cache at the token's position (:class:`RopeWrite`, :func:`rope_reference`); it may also add the last layer's MLP
output to x first and write the sum back (the decoder's next residual stream). The epilogue's inputs (residual,
cos/sin) are loaded a chunk ahead, as the weights are: loaded in their own chunk they arrived after the
arithmetic and stalled every chunk (8B down with its residual: 18.5 us, loaded ahead 15.7, plain 13.5).
Every variant is launched with programmatic dependent launch where the GPU has it (:mod:`.cuda_launch`): it lets
the next kernel launch at once and reads only its first chunk of weights before the kernel before it completes
(the H200's 8B layer chain: 47.5-48.0 us a layer, 50.7-51.3 without).
Launch bounds are per width (the block's threads, and 5 blocks of 128 threads an SM), so every 4-row variant
stays at or under 96 registers (``bench/kernel_resources.py``).

Tried on the H200 and dropped (bench/RESULTS.md): an L2 prefetch of the next product's weights by blocks that
had issued their last loads (decode 342-335 against 355 tok/s without), a cp.async ring of 2-6 chunks in shared
memory (340-350 against 382), unconditional loads and one barrier a chunk (each slower in a sweep of the three);
with PDL, shared-memory stages filled by Hopper bulk copies (4 chunks a block in flight: an 8B layer 57-58 us
against 48), and, each slower in decode, two chunks loaded before the wait, fewer blocks for the small products,
and two 448-thread blocks an SM for down; then Hopper bulk L2 prefetches of the next product's weights (decode
440 against 458 tok/s), warp 0 summing a chunk's rows with shuffles (421 against 457), the norm weight loaded before
the wait (no gain), two chunks ahead for every width (4 blocks of 128 threads an SM: layer chain 49.4 against
46.9 us). Rows a chunk can differ by product (``gemv(rows=...)``: 2, 4 or 8; the chain's
``fused_proj.CHAIN_ROWS``), 2 rows with two blocks an SM: no setting beat 4 everywhere beyond the noise.

The CUDA C source is :mod:`pipeline.engines.int4_cuda_kernel`. The arithmetic is mirrored in tensor ops by
:func:`reference_dot` so the CPU tests check the packing, the byte order and the fixed point; the GPU tests
(marked ``gpu``) compare the kernel with the float64 product.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import NamedTuple

import torch

from pipeline.engines.cuda_launch import launch
from pipeline.engines.int4_cuda_kernel import SOURCE as _SOURCE

log = logging.getLogger(__name__)

MAX_K = 32 * 1024  # one block of 1024 threads x 32 columns
WIDE_K = 16 * 1024  # above: the 1024-thread variant, 2 rows a chunk (64 registers a thread)
ROWS = (2, 4, 8)  # rows per chunk up to WIDE_K that gemv(rows=...) takes (4 by default: chunk_rows)
# Above this K (one block of more than 256 threads an SM: 8B's down) a block keeps two chunks of weights in flight
# while it computes one (:func:`ahead`); below, the SM's several blocks keep enough in flight between them.
AHEAD2_ABOVE_K = 8192
# Registers a thread of those: 104 (no spills for sm_90) leaves room beside one 448-thread block for a block of the
# next kernel (128 threads at 96), which programmatic dependent launch starts early; uncapped (120) it did not fit,
# and the layer chain was slower even though down alone was faster.
AHEAD2_REGISTERS = 104


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
    return compile_failure([_variant(dtype, k, chunk_rows(k), norm, epilogue, ahead(k, chunk_rows(k)))])


def ahead(k: int, rows: int) -> int:
    """Chunks of weights a block has in flight beyond the one it computes: 2 for K above ``AHEAD2_ABOVE_K`` at 4
    rows a chunk (sm_90: no spills at ``AHEAD2_REGISTERS``; at 2 and 8 rows the third buffer spills)."""
    return 2 if AHEAD2_ABOVE_K < k <= WIDE_K and rows == 4 else 1


@functools.cache
def _variant(dtype: torch.dtype, k: int, rows: int, norm: bool, epilogue: str, depth: int = 1) -> tuple[str, str]:
    """(source, kernel name) of one entry: the template instantiated for this dtype, width, rows, fusion and
    ``depth`` (:func:`ahead`)."""
    bf16 = dtype == torch.bfloat16
    wide = k > WIDE_K
    threads = threads_per_block(k)
    name = (f"q4gemv_{'bf16' if bf16 else 'f16'}_{'wide' if wide else f'r{rows}'}_t{threads}"
            f"{'_a2' if depth == 2 else ''}{'_norm' if norm else ''}{'_' + epilogue if epilogue else ''}")
    # registers capped so that MIN_THREADS_PER_SM of them fit (ptxas for sm_90: the rotary variant took 104 and
    # 4 blocks of 128 threads an SM under a 512-thread bound, 96 and 5 under this one; bench/kernel_resources.py)
    per_sm = {2: MIN_THREADS_PER_SM_R2, 4: MIN_THREADS_PER_SM}.get(rows, MIN_THREADS_PER_SM_R8)
    bound = f"__launch_bounds__({threads}, {max(1, per_sm // threads)})" if not wide else "__launch_bounds__(1024, 1)"
    if depth == 2:  # a third buffer of weights (uncapped 119-127 registers), see AHEAD2_REGISTERS
        bound = f"__maxnreg__({AHEAD2_REGISTERS})"
    entry = (f"ENTRY({name}, {bound}, {2 if wide else rows}, {'true' if norm else 'false'}, "
             f"{EPILOGUES[epilogue]}, {'true' if bf16 else 'false'}, {depth})\n")
    return _SOURCE + entry, name


MIN_THREADS_PER_SM = 640  # the launch bounds' second figure (up to 4 rows): 5 blocks of 128 threads (K = 4096)
MIN_THREADS_PER_SM_R2 = 896  # 2 rows: 7 blocks of 128 threads, 2 of 448 (72 registers)
MIN_THREADS_PER_SM_R8 = 512  # 8 rows: 4 blocks of 128 threads (128 registers; uncapped they took 150-160)


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
    why = "" if rope is None else rope.problem(n, k, rows)
    if rope is not None and (swiglu or residual is not None or why):
        raise ValueError(f"the rotary epilogue takes q|k|v alone: {why or 'no other epilogue'}")
    if rope is not None and {rope.cos.dtype, rope.k_cache.dtype, rope.v_cache.dtype} != {x.dtype}:
        raise ValueError(f"the rotary epilogue reads cos/sin and writes the caches in x's dtype {x.dtype}")
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
    r = chunk_rows(k, rows)
    variant = _variant(x.dtype, k, r, norm_weight is not None, epilogue, ahead(k, r))
    if blocks_per_sm is None:  # as many blocks as fit on the GPU at once (a prologue is paid once per block)
        blocks_per_sm = resident_blocks(*variant, threads_per_block(k))
    _, blocks = launch_shape(n, k, sm_count(x.device.index or 0), rows, blocks_per_sm)
    launch(compiled(*variant), (blocks, 1, 1), (threads_per_block(k), 1, 1),
           [x, nw, res, qweight, sz, out, n, k, group, float(eps), *extra])
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
        if k > WIDE_K or chunk_rows(k, rows) not in ROWS or hd % chunk_rows(k, rows):
            return (f"K = {k} at {chunk_rows(k, rows)} rows a chunk (the epilogue takes K <= {WIDE_K} and rows "
                    f"{', '.join(map(str, ROWS))} dividing the head)")
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
    """``torch.ops.quantship.int4_gemv`` and ``int4_gemv_rope`` (:func:`gemv`'s keywords; the second writes this
    token's k and v into the cache it is given): the launches as opaque ops for ``torch.compile`` and graph
    capture. ``int4_gemv``'s fusions are optional (a plain product by default); ``rows``: rows a chunk (0: the
    default)."""

    @torch.library.custom_op("quantship::int4_gemv", mutates_args=())
    def op(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group: int,
           norm_weight: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
           residual: torch.Tensor | None = None, rows: int = 0) -> torch.Tensor:  # fmt: skip
        return gemv(x, qweight, sz, group, rows or None, norm_weight=norm_weight, eps=eps, swiglu=swiglu,
                    residual=residual)

    @op.register_fake
    def _(x, qweight, sz, group, norm_weight=None, eps=0.0, swiglu=False, residual=None, rows=0):
        return x.new_empty(1, qweight.shape[0] // 2 if swiglu else qweight.shape[0])

    @torch.library.custom_op("quantship::int4_gemv_rope", mutates_args=("k_cache", "v_cache"))
    def rope(x: torch.Tensor, add: torch.Tensor | None, qweight: torch.Tensor, sz: torch.Tensor, group: int,
             norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, q_rows: int, head_dim: int,
             rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(q, x + add) with ``add``, else (q, an empty tensor): see :func:`gemv`."""
        h = torch.empty(1, x.shape[-1] if add is not None else 0, device=x.device, dtype=x.dtype)
        q = gemv(x, qweight, sz, group, rows or None, norm_weight=norm_weight, eps=eps, add=add,
                 add_out=h if add is not None else None,
                 rope=RopeWrite(cos, sin, pos, k_cache, v_cache, q_rows, head_dim))
        return q, h

    @rope.register_fake
    def _(x, add, qweight, sz, group, norm_weight, eps, cos, sin, pos, k_cache, v_cache, q_rows, head_dim, rows=0):
        return x.new_empty(1, q_rows), x.new_empty(1, x.shape[-1] if add is not None else 0)

    return op
