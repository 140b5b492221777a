"""Group-wise INT4 kernels in Triton for ``Int4Linear`` on CUDA: a dequantize kernel for prefill (M > 8:
dequantize into a per-call bf16 scratch, then one cuBLAS GEMM; what the "auto" CUDA path uses, measured at 1.2x
bf16's time for 2048 tokens where tinygemm takes 27x) and a GEMV for decode (M <= 8; only behind the explicit
``kernel="cuda-triton"``: on the H200 it read weights at 0.06-0.74 TB/s against tinygemm's 1.4-1.7 TB/s, so
decode stays on tinygemm; bench/RESULTS.md "Fast low-bit decode" has both tables).

Layout, built once at load by :func:`repack` from our unpacked codes (``QuantizedWeight``; AWQ, GPTQ and
compressed-tensors INT4 all unpack to it):

- ``qweight`` int32 [N, K / 8]: word ``i`` of row ``n`` holds codes ``k = 8 i + j`` in bits ``4 j .. 4 j + 3``
  (low nibble first), so a row's codes are contiguous along K and a [BLOCK_N, BLOCK_K / 8] tile is one
  coalesced read per row;
- ``scales`` [K / G, N] (float16 where the scales are exactly float16, as every AWQ/GPTQ checkpoint stores them,
  else float32) and ``zeros`` uint8 [K / G, N]: transposed, so a tile's scales are one coalesced row.

The GEMV dequantizes each [BLOCK_N, BLOCK_K] tile to float32 ``(q - z) * s`` in registers and accumulates
``x * w`` elementwise into a [BLOCK_M, BLOCK_N, BLOCK_K] float32 accumulator, reduced once after the K loop
(a first version reduced every tile and reached only ~140 GB/s on the H200; see bench/RESULTS.md); ``BLOCK_M`` rows of ``x`` share every
weight tile, so one pass over the 4-bit weights serves up to 8 tokens. ``SPLIT_K > 1`` cuts K into slices
accumulated with float32 atomics (for the narrow k/v projections, whose N alone gives too few programs).
Configurations are picked per (M bucket, N, K) by timing a few candidates once on first use
(:func:`_pick_config`), never while a CUDA graph is being captured (then a fixed heuristic).

This follows gemlite's GEMV idea (mobiusml/gemlite, Apache-2.0: ``gemv_A16fWnO16f_int32packing``, K-packed int32
words, one program per column block) and gpt-fast's group-wise (q - z) * s convention; no code is copied.
Exactness against the dequantize reference runs on the CPU through ``TRITON_INTERPRET=1``
(tests/test_decode_kernels.py).
"""

from __future__ import annotations

import functools
import os

import torch

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_HEURISTIC = dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=1, num_warps=4)


def available() -> str:
    """"" when the Triton kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return ""


def repack(w_int: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Codes [N, K] in [0, 16), scales/zeros [N, K / G] -> the kernel's tensors (see the module docstring)."""
    n, k = w_int.shape
    w = w_int.to(device=device, dtype=torch.int32).reshape(n, k // 8, 8)
    shifts = torch.arange(0, 32, 4, device=device, dtype=torch.int32)
    qweight = (w << shifts).sum(dim=-1, dtype=torch.int64).to(torch.int64)
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32).contiguous()
    s = scales.float()
    s_dtype = torch.float16 if torch.equal(s.half().float(), s) else torch.float32
    return {
        "qweight": qweight,
        "scales_t": s.to(s_dtype).t().contiguous().to(device),
        "zeros_t": zeros.to(torch.uint8).t().contiguous().to(device),
    }


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_step(x_ptr, w_ptr, s_ptr, z_ptr, acc, k0, offs_m, offs_n, m_mask, n_mask, N, K, G,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # [BLOCK_N, BLOCK_K / 8] words, contiguous along K per row; unpacked by broadcast shifts to
        # [BLOCK_N, BLOCK_K / 8, 8], dequantized, and multiplied into the [M, N, K/8, 8] accumulator: no reduction
        # inside the loop (one at the end), no reshape.
        offs_w = tl.arange(0, BLOCK_K // 8)
        offs_j = tl.arange(0, 8)
        w = tl.load(w_ptr + offs_n[:, None] * (K // 8) + (k0 // 8 + offs_w)[None, :], mask=n_mask[:, None], other=0)
        q = ((w[:, :, None] >> (offs_j * 4)[None, None, :]) & 15).to(tl.float32)
        g = k0 // G
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        wq = (q - z[:, None, None]) * s[:, None, None]
        k_offs = k0 + offs_w[:, None] * 8 + offs_j[None, :]  # [BLOCK_K / 8, 8]
        x = tl.load(x_ptr + offs_m[:, None, None] * K + k_offs[None, :, :], mask=m_mask[:, None, None], other=0.0)
        return acc + x.to(tl.float32)[:, None, :, :] * wq[None, :, :, :]

    # A @triton.jit kernel resolves the functions it calls in its module's globals, not in this closure.
    globals()["_gemv_step"] = _gemv_step

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    LOOP_WHILE: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        m_mask = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 8, 8), dtype=tl.float32)
        k_per_split = K // SPLIT_K
        k_start = pid_k * k_per_split
        if LOOP_WHILE:  # Triton's interpreter (numpy 2.x) cannot index a range with a run-time bound
            kk = 0
            while kk < k_per_split:
                acc = _gemv_step(x_ptr, w_ptr, s_ptr, z_ptr, acc, k_start + kk, offs_m, offs_n, m_mask, n_mask, N, K, G,
                                 BLOCK_N, BLOCK_K)
                kk += BLOCK_K
        else:
            for kk in range(0, k_per_split, BLOCK_K):
                acc = _gemv_step(x_ptr, w_ptr, s_ptr, z_ptr, acc, k_start + kk, offs_m, offs_n, m_mask, n_mask, N, K, G,
                                 BLOCK_N, BLOCK_K)
        res = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
        out_offs = offs_m[:, None] * N + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out_ptr + out_offs, res, mask=mask)

    @triton.jit
    def dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, G, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = pid_k * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        w = tl.load(w_ptr + offs_n[:, None] * (K // 8) + (offs_k // 8)[None, :], mask=n_mask[:, None], other=0)
        q = ((w >> ((offs_k % 8) * 4)[None, :]) & 15).to(tl.float32)
        g = offs_k // G
        s = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=n_mask[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[None, :] * N + offs_n[:, None], mask=n_mask[:, None], other=0).to(tl.float32)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], ((q - z) * s).to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None])

    return gemv_kernel, dequant_kernel


def _block_m(m: int) -> int:
    return 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 8


def config_ok(cfg: dict, k: int, group: int) -> bool:
    """A config must tile K into whole groups per step and whole steps per split."""
    bk, split = cfg["BLOCK_K"], cfg["SPLIT_K"]
    return group % bk == 0 and k % (bk * split) == 0 and (k // split) % group == 0


def gemv(x2: torch.Tensor, t: dict[str, torch.Tensor], group: int, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M <= 8, K] @ dequant(t).T -> [M, N] in x2's dtype."""
    m, k = x2.shape
    n = t["qweight"].shape[0]
    cfg = cfg or _pick_config(m, n, k, group, x2)
    gemv_kernel, _ = _kernels()
    split = cfg["SPLIT_K"]
    out = torch.zeros(m, n, device=x2.device, dtype=torch.float32) if split > 1 else torch.empty(
        m, n, device=x2.device, dtype=x2.dtype)
    grid = (triton_cdiv(n, cfg["BLOCK_N"]), split)
    gemv_kernel[grid](x2, t["qweight"], t["scales_t"], t["zeros_t"], out, m, n, k, group,
                      BLOCK_M=_block_m(m), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split, LOOP_WHILE=_INTERPRETED,
                      num_warps=cfg.get("num_warps", 4))
    return out if split == 1 else out.to(x2.dtype)


def dequantize(t: dict[str, torch.Tensor], group: int, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight (q - z) * s in ``dtype`` (a fresh scratch tensor per call)."""
    n, k = t["qweight"].shape[0], t["qweight"].shape[1] * 8
    out = torch.empty(n, k, device=t["qweight"].device, dtype=dtype)
    bk = 64 if group % 64 == 0 and k % 64 == 0 else 32 if k % 32 == 0 and group % 32 == 0 else 8
    _, dequant_kernel = _kernels()
    dequant_kernel[(triton_cdiv(n, 32), k // bk)](t["qweight"], t["scales_t"], t["zeros_t"], out, n, k, group,
                                                   BLOCK_N=32, BLOCK_K=bk, num_warps=4)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _candidates(m: int, n: int, k: int, group: int) -> list[dict]:
    """A few block shapes per M bucket (each distinct one is a Triton compile, so the list stays short); the
    accumulator holds BLOCK_M x BLOCK_N x BLOCK_K floats, spread over the program's threads."""
    bm = _block_m(m)
    if bm == 1:
        shapes = [(16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (8, 128, 4)]
    elif bm <= 4:
        shapes = [(16, 64, 4), (16, 128, 8), (32, 64, 8), (8, 128, 4)]
    else:
        shapes = [(8, 64, 4), (16, 64, 8), (8, 128, 8), (16, 32, 4)]
    out = []
    for bn, bk, warps in shapes:
        for split in (1, 2, 4, 8):
            cfg = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps)
            if config_ok(cfg, k, group) and (split == 1 or triton_cdiv(n, bn) * split <= 8192):
                out.append(cfg)
    return out


_TUNED: dict[tuple, dict] = {}


def _pick_config(m: int, n: int, k: int, group: int, x2: torch.Tensor) -> dict:
    key = (_block_m(m), n, k, group, x2.dtype)
    if key in _TUNED:
        return _TUNED[key]
    fallback = next((c for c in ([_HEURISTIC] + [dict(_HEURISTIC, BLOCK_K=b) for b in (64, 32, 16, 8)])
                     if config_ok(c, k, group)), None)
    if fallback is None:
        raise ValueError(f"no int4 GEMV config for K={k}, group={group}")
    if x2.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return fallback
    _TUNED[key] = _tune(m, n, k, group, x2, fallback)
    return _TUNED[key]


def _tune(m, n, k, group, x2, fallback) -> dict:
    """Time each candidate on random data (median of a few event-timed runs) and keep the fastest."""
    g = torch.Generator(device=x2.device).manual_seed(0)
    t = {"qweight": torch.randint(-2**31, 2**31 - 1, (n, k // 8), device=x2.device, dtype=torch.int32, generator=g),
         "scales_t": torch.rand(k // group, n, device=x2.device, dtype=torch.float16, generator=g),
         "zeros_t": torch.randint(0, 16, (k // group, n), device=x2.device, dtype=torch.uint8, generator=g)}
    x = torch.randn(m, k, device=x2.device, dtype=x2.dtype, generator=g)
    best, best_ms = fallback, float("inf")
    for cfg in _candidates(m, n, k, group):
        try:
            ms = _time(lambda: gemv(x, t, group, cfg))
        except Exception:  # a config this build of Triton refuses (registers, shared memory): skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def _time(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[1]


def tuned_configs() -> dict[str, dict]:
    """The configurations picked so far, for the bench's record."""
    return {f"m{k[0]}_n{k[1]}_k{k[2]}_g{k[3]}": v for k, v in _TUNED.items()}


def int4_matmul(x2: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
                group: int) -> torch.Tensor:
    """x2 [M, K] @ dequant.T: the GEMV for M <= 8; above, dequantize into a bf16/fp16 scratch and one cuBLAS GEMM
    (prefill is compute-bound, so this is as fast as the float model's GEMM plus one pass over the weight)."""
    t = {"qweight": qweight, "scales_t": scales_t, "zeros_t": zeros_t}
    if x2.shape[0] <= 8:
        return gemv(x2, t, group)
    return x2 @ dequantize(t, group, x2.dtype).t()


@functools.cache
def custom_op():
    """``torch.ops.quantship.int4_matmul``: the same call as an opaque op, so ``torch.compile`` and CUDA-graph
    capture see one node (shape inferred by its fake implementation) instead of tracing the launch code."""

    @torch.library.custom_op("quantship::int4_matmul", mutates_args=())
    def op(x2: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
           group: int) -> torch.Tensor:
        return int4_matmul(x2, qweight, scales_t, zeros_t, group)

    @op.register_fake
    def _(x2, qweight, scales_t, zeros_t, group):
        return x2.new_empty(x2.shape[0], qweight.shape[0])

    return op
