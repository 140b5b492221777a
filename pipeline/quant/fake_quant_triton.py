"""Group-wise fake quantization (quantize, then dequantize) as one Triton kernel: ``primitives.fake_quantize``'s
arithmetic in a single pass over the weight, with AWQ's per-column scales applied on the way in and out.

Why by hand: AWQ's scale search fake-quantizes every linear of a layer at each of its 20 grid points, and its clip
search at each of its 10 ratios. In eager PyTorch that is ``w * s``, the group min and max, a division, five
in-place passes (round, add the zero, clamp, subtract it, multiply by the scale) and the division by ``s``: about
ten reads and writes of an fp32 weight per candidate, ~70 GB per 70B-wide layer and grid point, which was most of
the 1.44 s a layer the 70B-width run spent quantizing (bench/RESULTS.md). Here one program loads a tile of
``BLOCK_R`` rows by one group, and writes the candidate once. No library has it: torchao's and llm-compressor's
fake-quantize ops are the same chain of eager steps.

Exactness: the same fp32 operations in the same order as ``fake_quantize`` on the device it runs on — IEEE
division (``div_rn``) where PyTorch divides tensor by tensor, and for the division by ``qmax`` (a Python number)
what PyTorch does there: true division on the CPU, a multiply by the fp32 reciprocal on CUDA (the first GPU run,
with ``div_rn`` everywhere, differed from eager CUDA in a few elements for that reason); rounding
half to even through the fp32 magic number (as ``gptq_triton``), and no multiply feeding an add (a min, max,
clamp or abs sits between every product and the next sum), so nothing can be fused into a multiply-add. Under
Triton's interpreter (numpy) the result equals the eager function bit for bit: that is how CI, which has no GPU,
tests it (tests/test_fake_quant_triton.py); on a GPU the test compares the compiled kernel the same way.
"""

import os

import torch

try:  # Triton comes with PyTorch's CUDA builds; without it the eager ``fake_quantize`` runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None

_TILE = 4096  # elements per program: BLOCK_R rows of one group


def available() -> bool:
    return triton is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def eligible(w: torch.Tensor, group_size: int) -> bool:
    """The kernel runs on contiguous fp32 CUDA tensors (or on the CPU under ``TRITON_INTERPRET=1``) with a
    power-of-two group of 16..256 columns that divides the width."""
    return ((w.is_cuda or _interpret()) and available() and w.dtype == torch.float32 and w.dim() == 2
            and w.is_contiguous() and group_size in (16, 32, 64, 128, 256) and w.shape[1] % group_size == 0
            and w.numel() < 2**31)


if triton is not None:  # defined only where Triton is (its annotations need it); no __future__ annotations here

    @triton.jit
    def _by_qmax(x, maxq, inv_maxq, RECIP: tl.constexpr):
        # PyTorch divides a CUDA tensor by a Python number as a multiply by the number's fp32 reciprocal
        # (BinaryDivTrueKernel.cu), and a CPU float tensor by true division: each device's eager arithmetic.
        if RECIP:
            return x * inv_maxq
        else:
            return tl.div_rn(x, maxq)

    def _fake_quant(W, S, Out, n_rows, n_cols, ratio, maxq, inv_maxq, zero_sym,
                    HAS_S: tl.constexpr, CLIP: tl.constexpr, SYM: tl.constexpr, G: tl.constexpr,
                    BLOCK_R: tl.constexpr, RECIP: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * G + tl.arange(0, G)
        rmask = rows < n_rows
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        w = tl.load(W + offs, mask=rmask[:, None], other=0.0)
        if HAS_S:
            s = tl.load(S + cols)
            w = w * s[None, :]
        lo = tl.min(w, axis=1)
        hi = tl.max(w, axis=1)
        if CLIP:
            lo = lo * ratio
            hi = hi * ratio
        if SYM:  # compute_qparams, symmetric: 2·absmax / qmax, the zero at the middle code
            absmax = tl.maximum(tl.maximum(tl.abs(lo), tl.abs(hi)), 1e-8)
            scale = _by_qmax(absmax * 2.0, maxq, inv_maxq, RECIP)
            zero = tl.zeros_like(scale) + zero_sym
        else:  # asymmetric: [min(lo, 0), max(hi, 0)] onto [0, qmax]
            lo = tl.minimum(lo, 0.0)
            hi = tl.maximum(hi, 0.0)
            scale = tl.maximum(_by_qmax(hi - lo, maxq, inv_maxq, RECIP), 1e-8)
            zero = (tl.div_rn(-lo, scale) + 12582912.0) - 12582912.0  # round half to even (|x| < 2**22)
            zero = tl.minimum(tl.maximum(zero, 0.0), maxq)
        q = (tl.div_rn(w, scale[:, None]) + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q + zero[:, None], 0.0), maxq)
        q = (q - zero[:, None]) * scale[:, None]
        if HAS_S:
            q = tl.div_rn(q, s[None, :])
        tl.store(Out + offs, q, mask=rmask[:, None])


_KERNELS: dict[bool, object] = {}


def _kernel():
    # triton.jit reads TRITON_INTERPRET when it wraps the function: one wrapped kernel per mode.
    mode = _interpret()
    if mode not in _KERNELS:
        _KERNELS[mode] = triton.jit(_fake_quant)
    return _KERNELS[mode]


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = False, clip_ratio: float = 1.0,
                  col_scales: torch.Tensor | None = None) -> torch.Tensor:
    """``primitives.fake_quantize(w * col_scales, ...) / col_scales`` (``col_scales`` [in], or None for plain
    ``fake_quantize``) for an ``eligible`` ``w``, in one pass; a new fp32 tensor."""
    n_rows, n_cols = w.shape
    out = torch.empty_like(w)
    s = col_scales.to(device=w.device, dtype=torch.float32).contiguous() if col_scales is not None else w
    block_r = max(1, _TILE // group_size)
    grid = (triton.cdiv(n_rows, block_r), n_cols // group_size)
    maxq = float(2**bits - 1)
    inv_maxq = (torch.ones((), dtype=torch.float32) / maxq).item()  # fp32 1/qmax, exact as a Python float
    _kernel()[grid](w, s, out, n_rows, n_cols, float(clip_ratio), maxq, inv_maxq, float((2**bits) // 2),
                    HAS_S=col_scales is not None, CLIP=float(clip_ratio) != 1.0, SYM=bool(sym), G=group_size,
                    BLOCK_R=block_r, RECIP=w.is_cuda, num_warps=4)
    return out
