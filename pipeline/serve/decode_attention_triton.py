"""Split-K ("flash-decoding") attention for one query token per sequence over the static KV cache, in Triton,
that reads only the key blocks its mask keeps.

The static-cache step (:mod:`pipeline.serve.cuda_graphs`) has fixed shapes: every slot's cache is ``max_len``
positions (the server's default is 4,096) and a boolean mask hides the positions past each sequence. Two matrix
products (:func:`pipeline.serve.decode_attention.decode_attention`) read all of them: for Llama-3-8B that is
537 MB of keys and values a token per slot whatever the sequence's length, 11% of an INT4 step's bytes at batch
1 and more than its weights at batch 8; measured on the H200, a 4,096-position cache made bf16 decode 8% and
INT4 11% slower than a 72-position one. Here the cache is cut in blocks of ``BLOCK_L`` positions; one program per
(sequence, key/value head, block) loads the block's mask and, where nothing in it is kept, writes an empty
partial without touching the keys; else it computes the group's scores (the query heads that share the key/value
head, padded to 16 rows for ``tl.dot``), the block's maximum, sum of exponentials and weighted values. A second
kernel combines the partials of each (sequence, head) with the usual log-sum-exp rescaling, reading only the
blocks that were not empty (an empty block writes its maximum, -inf, and nothing else). Shapes stay static, so
the CUDA graphs and ``torch.compile`` see one opaque op (``torch.ops.quantship.decode_attention``). On sm_90+ both
kernels are launched with programmatic dependent launch (:mod:`pipeline.engines.cuda_launch`): each lets the next
kernel launch, then waits for the one before it, so the o projection's GEMV loads its weights during attention.

Why by hand: PyTorch's fused attention kernels parallelise a one-token query over heads only, and they read
every masked position (bench/RESULTS.md: 75 us a layer through cuDNN's kernel at 4,096 positions); FlashInfer's
and vLLM's decode kernels take paged caches through their own builds, not installable here. Scores and the
softmax are float32 (the two-product path computes scores in the cache dtype first), so results agree with it to
the cache dtype's rounding, not bit for bit; tests/test_decode_attention_triton.py checks the kernel under
Triton's interpreter on the CPU against a float64 reference, and on a GPU against the two-product path.
"""

from __future__ import annotations

import functools
import os

import torch

from pipeline.engines import cuda_launch

# Cache positions per program, and its warps. Compiled for sm_90 (Triton 3.6, head dim 128, 16 query rows), 256
# positions with 4 warps spilled ~4.9 KB a thread to local memory (32 registers + stack), so the one live block of
# a short sequence took ~6 us a layer on the H200; 128 positions with 8 warps use 181 registers and no stack.
BLOCK_L = 128
PARTIAL_WARPS = 8


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def pdl_capable() -> bool:
    """This Triton launches with programmatic dependent launch (``launch_pdl``, ``gdc_wait``: Triton 3.4 and later)."""
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


def eligible(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """One query per sequence on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) with a boolean keep-mask."""
    on = query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (on and available() and mask is not None and mask.dtype == torch.bool and query.shape[2] == 1
            and query.dtype in (torch.float16, torch.bfloat16) and key.dtype == query.dtype
            and query.shape[-1] in (16, 32, 64, 128, 256))  # fmt: skip


@functools.cache
def _kernels(interpret: bool):
    import triton
    import triton.language as tl

    if pdl_capable():
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    else:  # a Triton without grid dependency control: PDL is never set, the names are never reached
        gdc_launch_dependents = gdc_wait = None

    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, HKV, G, L, S, scale,
                 sq_b, sq_h, sq_g, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b,
                 D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        if PDL:  # launched early (programmatic dependent launch): let the next go, wait for q and the cache write
            gdc_launch_dependents()
            gdc_wait()
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        offs_l = s * BLOCK + tl.arange(0, BLOCK)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        live = tl.load(mask_ptr + b * sm_b + offs_l, mask=offs_l < L, other=0) != 0
        part = (bh * S + s) * BLOCK_G + offs_g
        if tl.sum(live.to(tl.int32), axis=0) == 0:  # only the maximum: _combine reads nothing else of it
            tl.store(m_ptr + part, tl.full([BLOCK_G], float("-inf"), tl.float32))
        else:
            q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_g[:, None] * sq_g + offs_d[None, :],
                        mask=offs_g[:, None] < G, other=0.0)  # fmt: skip
            k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_l[:, None] * sk_l + offs_d[None, :],
                        mask=live[:, None], other=0.0)  # fmt: skip
            v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_l[:, None] * sv_l + offs_d[None, :],
                        mask=live[:, None], other=0.0)  # fmt: skip  (issued with k, used after the scores)
            scores = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale
            scores = tl.where(live[None, :], scores, float("-inf"))
            m = tl.max(scores, axis=1)
            p = tl.exp(scores - m[:, None])
            acc = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
            tl.store(m_ptr + part, m)
            tl.store(l_ptr + part, tl.sum(p, axis=1))
            tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc)

    @triton.jit
    def _combine(m_ptr, l_ptr, acc_ptr, out_ptr, S, so_bh, so_g,
                 D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        # one program per (sequence x key/value head, query head of the group): all its partials in one load
        bh = tl.program_id(0)
        g = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        part = (bh * S + offs_s) * BLOCK_G + g
        ms = tl.load(m_ptr + part, mask=offs_s < S, other=float("-inf"))
        w = tl.exp(ms - tl.max(ms, axis=0))  # 0 for an empty partial; the token's own position is always kept
        full = (offs_s < S) & (ms > float("-inf"))  # an empty partial wrote its maximum only: skip its sum and acc
        total = tl.sum(w * tl.load(l_ptr + part, mask=full, other=0.0), axis=0)
        acc = tl.load(acc_ptr + part[:, None] * D + offs_d[None, :], mask=full[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, axis=0) / total
        tl.store(out_ptr + bh * so_bh + g * so_g + offs_d, out.to(out_ptr.dtype.element_ty))

    return _partial, _combine


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """``query`` [b, H_kv, G, d] (the G query heads of each key/value head), ``key``/``value`` [b, H_kv, L, d],
    ``mask`` bool broadcastable to [b, L] (True: attend) -> [b, H_kv, G, d] in the value dtype."""
    partial, combine = _kernels(os.environ.get("TRITON_INTERPRET") == "1")
    b, hkv, g, d = query.shape
    length = key.shape[2]
    keep = mask.reshape(mask.shape[0], -1)[:, :length].expand(b, length)  # bool, read as bytes: no copy
    if keep.stride(-1) != 1:
        keep = keep.contiguous()
    splits = -(-length // BLOCK_L)
    # programmatic dependent launch (pipeline.engines.cuda_launch) on Hopper and later: each kernel lets the next
    # launch, then waits for the one before it
    on = query.is_cuda and cuda_launch.PDL and pdl_capable() and cuda_launch.pdl_available(query.device.index or 0)
    pdl = dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)
    block_g = max(16, 1 << (g - 1).bit_length())
    m = torch.empty(b * hkv, splits, block_g, device=query.device, dtype=torch.float32)
    sums = torch.empty_like(m)
    acc = torch.empty(b * hkv, splits, block_g, d, device=query.device, dtype=torch.float32)
    out = torch.empty(b, hkv, g, d, device=query.device, dtype=value.dtype)
    q = query.contiguous()
    k = key if key.stride(-1) == 1 else key.contiguous()  # the static cache is; anything else is copied
    v = value if value.stride(-1) == 1 else value.contiguous()
    partial[(b * hkv, splits)](q, k, v, keep, m, sums, acc, hkv, g, length, splits, scale,
                               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                               v.stride(0), v.stride(1), v.stride(2), keep.stride(0),
                               D=d, BLOCK_G=block_g, BLOCK=BLOCK_L, num_warps=PARTIAL_WARPS, **pdl)  # fmt: skip
    combine[(b * hkv, g)](m, sums, acc, out, splits, out.stride(1), out.stride(2),
                          D=d, BLOCK_G=block_g, BLOCK_S=max(16, 1 << (splits - 1).bit_length()), **pdl)  # fmt: skip
    return out


@functools.cache
def custom_op():
    """``torch.ops.quantship.decode_attention``: one opaque node for ``torch.compile`` and CUDA-graph capture."""

    @torch.library.custom_op("quantship::decode_attention", mutates_args=())
    def op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
           scale: float) -> torch.Tensor:  # fmt: skip
        return decode_attention(query, key, value, mask, scale)

    @op.register_fake
    def _(query, key, value, mask, scale):
        return query.new_empty(query.shape, dtype=value.dtype)

    return op
