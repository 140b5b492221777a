"""GPTQ's column loop as one Triton kernel per block of columns: the arithmetic of ``gptq.gptq_quantize``, on a GPU.

Why by hand: GPTQ (Algorithm 1) is sequential over columns but independent across rows, and each column is a
dozen tiny element-wise steps. Eager PyTorch launches ~14 kernels per column (≈1.4 s for one 14336-wide
down_proj on an H100); replaying the block as a CUDA graph (this project's earlier ``gptq_cuda.py``) removes
the launch overhead but still runs every step as its own kernel over all rows (0.71 s for one Llama-3-8B
layer's four solves on an H200, against 0.09 s here: bench/RESULTS.md). No library offers the loop
(GPTQModel and llm-compressor run it eagerly; ``torch.compile`` of a 128-step loop takes minutes per shape). Here one program owns ``BLOCK_R`` rows and walks the block's columns in
registers: quantize the column, compute the error, update the rest of its rows' block. One launch per block;
the lazy update of the columns after the block stays one cuBLAS GEMM (paper §3.2).

Rounding matches ``torch.round`` (half to even) through the fp32 magic-number trick, and the division is
IEEE (``div_rn``); a multiply-add may still be fused where PyTorch rounds twice, so a code can differ from the
eager loop's at an exact rounding tie. Under Triton's interpreter (numpy, no fusion) the codes equal the eager
loop's bit for bit: that is how CI, which has no GPU, tests this kernel (tests/test_gptq_triton.py).

Grids per column come in as ``[rows, B]`` tiles with a column stride, so one kernel serves both cases GPTQ
has: a grid fitted at each block start (block = group, stride 0) and grids fixed up front and gathered in
act-order (static groups, any column order).
"""

import os

import torch

try:  # Triton comes with PyTorch's CUDA builds; without it (CPU-only torch) the eager loop in gptq.py runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None


def available() -> bool:
    return triton is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def eligible(w: torch.Tensor, block: int) -> bool:
    """The kernel runs on CUDA tensors (or on the CPU under ``TRITON_INTERPRET=1``: Triton's interpreter, which is
    how CI tests it) with a power-of-two block of 16..128 columns that divides the width."""
    return ((w.is_cuda or _interpret()) and available() and block in (16, 32, 64, 128)
            and w.shape[1] % block == 0)


if triton is not None:  # defined only where Triton is (its annotations need it); no __future__ annotations here

    def _gptq_block(W, stride_w, Hinv, stride_h, S, stride_sr, stride_sc, Z, stride_zr, stride_zc,
                    Q, stride_q, E, stride_e, n_rows, maxq, B: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        cols = tl.arange(0, B)
        w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=rmask[:, None], other=0.0)
        s = tl.load(S + rows[:, None] * stride_sr + cols[None, :] * stride_sc, mask=rmask[:, None], other=1.0)
        z = tl.load(Z + rows[:, None] * stride_zr + cols[None, :] * stride_zc, mask=rmask[:, None], other=0.0)
        for i in range(B):
            sel = cols[None, :] == i
            w_i = tl.sum(tl.where(sel, w, 0.0), axis=1)
            s_i = tl.sum(tl.where(sel, s, 0.0), axis=1)
            z_i = tl.sum(tl.where(sel, z, 0.0), axis=1)
            # + then - 1.5·2²³ (the fp32 magic number) rounds half to even, as torch.round does; no libdevice needed
            r = (tl.div_rn(w_i, s_i) + 12582912.0) - 12582912.0
            q_i = tl.minimum(tl.maximum(r + z_i, 0.0), maxq)
            d = tl.load(Hinv + i * stride_h + i)
            err = tl.div_rn(w_i - (q_i - z_i) * s_i, d)
            h = tl.load(Hinv + i * stride_h + cols, mask=cols >= i, other=0.0)
            # Algorithm 1: W[:, i:] -= err · [H⁻¹]_i,i: (only this block's columns; the rest lazily, by GEMM)
            w = w - err[:, None] * h[None, :]
            tl.store(Q + rows * stride_q + i, q_i.to(tl.int32), mask=rmask)
            tl.store(E + rows * stride_e + i, err, mask=rmask)


_KERNELS: dict[bool, object] = {}
_SUPER_BLOCK = 1024  # columns per outer lazy update (a multiple of the block); the block size gives the one-level loop


def _kernel():
    # triton.jit reads TRITON_INTERPRET when it wraps the function: one wrapped kernel per mode.
    mode = _interpret()
    if mode not in _KERNELS:
        _KERNELS[mode] = triton.jit(_gptq_block)
    return _KERNELS[mode]


def _launch(W1, Hinv1, S, Z, Q1, E1, maxq: int, block: int) -> None:
    n_rows = W1.shape[0]
    block_r = 16
    grid = ((n_rows + block_r - 1) // block_r,)
    _kernel()[grid](W1, W1.stride(0), Hinv1, Hinv1.stride(0), S, S.stride(0), S.stride(1), Z, Z.stride(0),
                    Z.stride(1), Q1, Q1.stride(0), E1, E1.stride(0), n_rows, float(maxq), B=block, BLOCK_R=block_r,
                    num_warps=4)


@torch.no_grad()
def gptq_columns(W: torch.Tensor, Hinv: torch.Tensor, bits: int, sym: bool, block: int, group_qparams,
                 static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, super_block: int | None = None):
    """Quantize ``W`` [out, in] (fp32, permuted and dead-column-fixed; updated in place) given the upper Cholesky
    factor of H⁻¹. Returns ``(q_int, scales, zeros)`` as ``gptq.gptq_quantize``'s loop does.

    ``static=None``: each block of ``block`` columns is one group, its grid fitted by ``group_qparams`` on the
    block's updated weights when it starts. ``static=(scales, zeros, col_group)``: grids fixed up front
    ([out, groups]) and ``col_group`` [in] the group of the column at each (permuted) position."""
    n_out, n_in = W.shape
    dev = W.device
    maxq = 2**bits - 1
    q_int = torch.empty(n_out, n_in, dtype=torch.int32, device=dev)
    # Two levels of lazy updates: a block's errors reach the rest of its super-block at once (K = block), and a
    # super-block's errors reach every column after it in one GEMM with K = super (fp32 GEMMs with K = 128 run at a
    # fraction of the card's fp32 rate; K = 1024 near it). The same products and the same fp32 arithmetic, summed
    # in another order: equal to the one-level loop up to fp32 rounding (tests/test_quant_chunked.py).
    sup = max(block, (super_block or _SUPER_BLOCK) // block * block)
    errs = torch.empty(n_out, min(sup, n_in), dtype=torch.float32, device=dev)
    if static is None:
        scales = torch.empty(n_out, n_in // block, dtype=torch.float32, device=dev)
        zeros = torch.empty(n_out, n_in // block, dtype=torch.int32, device=dev)
    else:
        scales, zeros, col_group = static
        zeros_f = zeros.float()
    for i1 in range(0, n_in, block):
        i2 = i1 + block
        s1 = i1 // sup * sup
        s2 = min(s1 + sup, n_in)
        err = errs[:, i1 - s1 : i2 - s1]
        if static is None:
            s, z = group_qparams(W[:, i1:i2], bits, sym)
            scales[:, i1 // block] = s[:, 0]
            zeros[:, i1 // block] = z[:, 0]
            S, Z = s.expand(n_out, block), z.float().expand(n_out, block)  # stride 0 along the columns
        else:
            idx = col_group[i1:i2]
            S, Z = scales[:, idx], zeros_f[:, idx]
        # The factor comes column-major from cuSOLVER; the kernel reads rows of this [B, B] block, so copy it.
        _launch(W[:, i1:i2], Hinv[i1:i2, i1:i2].contiguous(), S, Z, q_int[:, i1:i2], err, maxq, block)
        if i2 < s2:  # lazy batch update (paper §3.2): the block's errors reach the rest of its super-block
            W[:, i2:s2].addmm_(err, Hinv[i1:i2, i2:s2], alpha=-1.0)
        if i2 == s2 and s2 < n_in:  # ... and the super-block's errors every column after it
            W[:, s2:].addmm_(errs[:, : s2 - s1], Hinv[s1:s2, s2:], alpha=-1.0)
    return q_int, scales, zeros
