"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1) as plain tensor functions.

GPTQ quantizes one linear layer ``W`` [out, in] column by column, minimising the layer-output error
``||X Wᵀ - X Qᵀ||²`` over calibration inputs ``X``. The error of each rounded column is spread onto the
columns not yet quantized through the inverse Hessian ``H⁻¹`` of that objective, ``H = 2 XᵀX / n``.

- :func:`accumulate_hessian` keeps the running mean of ``2 xᵀx`` over calibration tokens (one matmul per batch).
- :func:`gptq_quantize` runs Algorithm 1 (Cholesky form of ``H⁻¹``, blocks of ``block_size`` columns with
  lazy batch updates, optional act-order) and returns a :class:`QuantizedWeight` in the original column order.
- :func:`gptq_loss` is the objective itself, for tests and benchmarks.

Checked against the reference implementations it must agree with: AutoGPTQ ``auto_gptq/quantization/gptq.py``
(``add_batch``, ``fasterquant``), GPTQModel ``gptqmodel/quantization/gptq.py`` and llm-compressor
``modifiers/gptq/gptq_quantize.py`` (``accumulate_hessian``, ``quantize_weight``).
"""

from __future__ import annotations

import logging

import torch

from pipeline.errors import QuantizationError
from pipeline.quant.primitives import QuantizedWeight, compute_qparams, quantize_with_qparams

logger = logging.getLogger(__name__)

# A failed Cholesky factorisation is retried with the dampening multiplied by this factor, this many times.
_DAMP_GROWTH = 4.0
_DAMP_RETRIES = 4


def accumulate_hessian(H: torch.Tensor | None, x: torch.Tensor, n_seen: int) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs ``x`` [..., in] into the running mean ``H = 2 XᵀX / n`` (fp32, [in, in]).

    ``n_seen`` counts the tokens (rows of ``x`` flattened to [-1, in]) already in ``H``. Returns the updated
    ``(H, n_seen)``; a given ``H`` is updated in place. The batch is moved to ``H``'s device. The mean is
    rescaled before adding, as AutoGPTQ's ``add_batch`` does, so fp32 never sums millions of tokens unscaled.
    (AutoGPTQ and llm-compressor count sequences rather than tokens; GPTQ is invariant to the scale of ``H``,
    since dampening is relative to its diagonal, so the counting unit only matters for this mean.)
    """
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    elif H.shape != (x.shape[1], x.shape[1]):
        raise QuantizationError(
            f"The Hessian being accumulated has shape {tuple(H.shape)} but the layer input has width "
            f"{x.shape[1]}. Each linear layer needs its own Hessian; pass H=None to start a new one."
        )
    if m == 0:
        return H, n_seen
    total = n_seen + m
    # H = (n·H_old + 2 XᵀX) / (n + m): one GEMM per batch, no loop over tokens.
    if _half_gemm_into_fp32(H, x, n_seen / total, 2.0 / total):
        return H, total
    x = x.to(device=H.device, dtype=torch.float32)
    H.mul_(n_seen / total)
    H.addmm_(x.t(), x, alpha=2.0 / total)
    return H, total


_HALF_GEMM_OK: bool | None = None  # whether this torch has CUDA addmm with out_dtype (PyTorch >= 2.9)


def _half_gemm_into_fp32(H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> bool:
    """``H = beta·H + alpha·xᵀx`` straight from bf16/fp16 ``x`` on CUDA, products and sums in fp32 (bf16 and fp16
    products are exact in fp32), without an fp32 copy of ``x``: half the GEMM time and no [tokens, in] fp32
    buffer (0.5 GB per batch on a 14336-wide input). False where this torch cannot (then the caller upcasts)."""
    global _HALF_GEMM_OK
    if _HALF_GEMM_OK is False or not (x.is_cuda and H.is_cuda) or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        torch.addmm(H, x.t(), x, beta=beta, alpha=alpha, out_dtype=torch.float32, out=H)
    except (RuntimeError, TypeError) as e:
        logger.info("GPTQ: no fp32-output half GEMM in this torch (%s); upcasting the Hessian inputs", e)
        _HALF_GEMM_OK = False
        return False
    _HALF_GEMM_OK = True
    return True


def gptq_loss(w: torch.Tensor, q: QuantizedWeight | torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)ᵀ) / 2``; with ``H = 2XᵀX/n`` this is ``||X Wᵀ - X Qᵀ||²_F / n``, the layer-output
    squared error per calibration token (summed over outputs), i.e. the objective GPTQ minimises."""
    q_w = q.dequantize() if isinstance(q, QuantizedWeight) else q
    err = w.float() - q_w.to(w.device).float()
    H = H.to(device=w.device, dtype=torch.float32)
    return 0.5 * float(((err @ H) * err).sum())


def _check_args(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, damp: float, block_size: int) -> None:
    if w.dim() != 2:
        raise QuantizationError(f"GPTQ quantizes a 2-D weight [out, in]; got shape {tuple(w.shape)}.")
    n_in = w.shape[1]
    if H.shape != (n_in, n_in):
        raise QuantizationError(
            f"The Hessian has shape {tuple(H.shape)} but the weight has {n_in} input columns; it must be "
            f"[{n_in}, {n_in}], accumulated from this layer's inputs with accumulate_hessian()."
        )
    if not 2 <= bits <= 8:
        raise QuantizationError(f"GPTQ supports 2 to 8 bits, got {bits}. Choose w_bits in 2..8 (4 is the usual).")
    if group_size != -1 and (group_size <= 0 or n_in % group_size):
        raise QuantizationError(
            f"Group size {group_size} does not divide the input width {n_in} of this layer. Use a group size "
            f"that divides every linear's input width (128 usually does), or -1 for one group per output channel."
        )
    if not damp > 0:
        raise QuantizationError(f"The GPTQ dampening fraction must be positive, got {damp}; 0.01 is the usual.")
    if block_size <= 0:
        raise QuantizationError(f"The GPTQ block size must be positive, got {block_size}; 128 is the usual.")
    if not bool(torch.isfinite(H).all()):
        raise QuantizationError(
            "The GPTQ Hessian contains NaN or infinity: the calibration activations of this layer overflowed. "
            "Run calibration in float32 or bfloat16 rather than float16, or check the model's weights."
        )
    if not bool(torch.isfinite(w).all()):
        raise QuantizationError("The weight to quantize contains NaN or infinity; the checkpoint is damaged.")


_CHUNK_ROWS = 1024  # rows per step of the chunked permute / flip / finiteness check: bounds their temporaries
_TRI_BLOCK = 1024  # rows per block of the triangular inverse; a width up to this is one triangular solve


def _lower_inverse_into(L: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``M <- L⁻¹`` for a lower-triangular ``L`` [n, n], by block rows: ``M_II = L_II⁻¹`` (a small triangular solve)
    and ``M_I,<I = -M_II · (L_I,<I · M_<I,<I)``. Two GEMMs per block row, 2n³/3 flops in all, against n³ for one
    triangular solve of ``L X = I`` over the full identity (most of whose solution is known to be zero), and GEMMs
    run nearer the card's rate than a triangular solve. Temporaries: a block row ([block, n])."""
    n = L.shape[0]
    M.zero_()
    for i1 in range(0, n, _TRI_BLOCK):
        i2 = min(i1 + _TRI_BLOCK, n)
        eye = torch.eye(i2 - i1, dtype=L.dtype, device=L.device)
        diag = torch.linalg.solve_triangular(L[i1:i2, i1:i2], eye, upper=False)  # M_II
        M[i1:i2, i1:i2] = diag
        if i1:
            M[i1:i2, :i1] = (diag @ (L[i1:i2, :i1] @ M[:i1, :i1])).neg_()
    return M


def _all_finite(A: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(A[i : i + _CHUNK_ROWS]).all()) for i in range(0, A.shape[0], _CHUNK_ROWS))


def _flip_both_(A: torch.Tensor) -> torch.Tensor:
    """``A[i, j] <- A[n-1-i, n-1-j]`` in place (swapping mirrored row blocks), with temporaries of one block."""
    n = A.shape[0]
    half = n // 2
    for a in range(0, half, _CHUNK_ROWS):
        b = min(a + _CHUNK_ROWS, half)
        top = A[a:b].flip(0, 1)
        A[a:b] = A[n - b : n - a].flip(0, 1)
        A[n - b : n - a] = top
        del top
    if n % 2:
        A[half] = A[half].flip(0)
    return A


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(Hp + λI)⁻¹`` (``UᵀU = (Hp + λI)⁻¹``), with ``Hp = H[perm][:, perm]`` (``H``
    when ``perm`` is None) and ``λ = damp · mean(diag H)``.

    Row ``i`` of ``U`` (scaled by ``1/U_ii``) is the update direction GPTQ applies to the columns after ``i``
    once column ``i`` is rounded (paper §3.3, "Cholesky reformulation"). If a factorisation fails the
    dampening grows by ``_DAMP_GROWTH``, up to ``_DAMP_RETRIES`` times (GPTQModel's ``damp_auto_increment``).

    Computed without forming the inverse: with ``J`` the order-reversing permutation, ``J (Hp + λI) J = L Lᵀ``
    (lower Cholesky), so ``Hp + λI = R Rᵀ`` with ``R = J L J`` upper, ``(Hp + λI)⁻¹ = (R⁻¹)ᵀ R⁻¹`` and, by the
    uniqueness of the Cholesky factor (positive diagonal), ``U = R⁻¹ = J L⁻¹ J``: one factorisation (n³/3) and one
    triangular inverse (2n³/3 in GEMMs, :func:`_lower_inverse_into`) instead of a factorisation,
    ``cholesky_inverse`` (two triangular solves against the identity, 2n³, and a working copy) and a second
    factorisation: a third of the flops. Equal to the former
    ``cholesky(cholesky_inverse(cholesky(H)), upper=True)`` up to float32 rounding (tests/test_quant_chunked.py).

    ``H`` is consumed: its storage holds ``L``, and ``U`` is built in one new [in, in] buffer, so two such matrices
    exist at once however ``H`` is held by the caller (3.1 GiB each on a 28672-wide down_proj).
    """
    n = H.shape[0]
    mean_diag = float(torch.diag(H).mean())
    order = torch.arange(n - 1, -1, -1, device=H.device) if perm is None else perm.flip(0).to(H.device)
    G = torch.empty_like(H)  # G = J Hp J, gathered a block of rows at a time
    for a in range(0, n, _CHUNK_ROWS):
        G[a : a + _CHUNK_ROWS] = H.index_select(0, order[a : a + _CHUNK_ROWS]).index_select(1, order)
    # L goes into H's storage, column-major (H.mT): the layout LAPACK/cuSOLVER write, so no proxy buffer.
    L_buf = H.mT if H.is_contiguous() else torch.empty_like(H).mT
    info = torch.empty((), dtype=torch.int32, device=H.device)
    frac, added = damp, 0.0
    for attempt in range(_DAMP_RETRIES + 1):
        G.diagonal().add_((frac - added) * mean_diag)
        added = frac
        L, info = torch.linalg.cholesky_ex(G, out=(L_buf, info))
        if int(info) == 0:
            dampened = G
            if n <= _TRI_BLOCK:
                G.zero_()
                G.diagonal().fill_(1.0)
                torch.linalg.solve_triangular(L, G, upper=False, out=G)  # G = L⁻¹, in place (trsm)
            else:
                _lower_inverse_into(L, G)  # G = L⁻¹, by block rows (G's old content is not read)
            if _all_finite(G):
                if attempt:
                    logger.warning("GPTQ: Hessian needed dampening %.4g (asked %.4g) to factorise", frac, damp)
                return _flip_both_(G)
            # Rare: L⁻¹ overflowed (a nearly singular Hessian). Rebuild the dampened G = L Lᵀ and damp more.
            torch.matmul(L, L.mT, out=dampened)
            G = dampened
        frac *= _DAMP_GROWTH
    raise QuantizationError(
        f"GPTQ could not factorise this layer's Hessian even with dampening {frac / _DAMP_GROWTH:.3g} "
        f"(asked {damp}): the calibration inputs are too few or too degenerate for its {n} input "
        f"columns. Use more (and more varied) calibration samples, or raise the GPTQ dampening fraction."
    )


def _group_qparams(cols: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale [out, 1] and zero [out, 1] of one group of columns [out, k].

    The scale is rounded to fp16 first: GPTQ checkpoints store fp16 scales (AutoGPTQ/GPTQModel ``scales`` fp16,
    TurboMind ``GPTQFormat.normalize`` casts them to fp16), so GPTQ compensates the error of the grid that
    is actually deployed rather than of a slightly different fp32 one.
    """
    scale, zero = compute_qparams(cols.amin(dim=1, keepdim=True), cols.amax(dim=1, keepdim=True), bits, sym)
    scale = scale.to(torch.float16).float().clamp(min=2.0**-24)  # 2**-24: the smallest fp16 subnormal
    return scale, zero


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
    overwrite_h: bool = False,
) -> QuantizedWeight:
    """Quantize ``w`` [out, in] with GPTQ given the layer's input Hessian ``H`` [in, in] (from
    :func:`accumulate_hessian`). Runs on ``w``'s device; ``w`` is not modified, nor ``H`` unless
    ``overwrite_h``.

    - ``group_size``: columns per (scale, zero) group; ``-1`` = one group per output channel (the returned
      ``QuantizedWeight.group_size`` is then the input width).
    - ``sym``: GPTQ's symmetric grid (zero fixed at ``2**(bits-1)``), else min/max asymmetric.
    - ``desc_act`` (act-order): quantize columns in decreasing ``diag(H)``; groups are consecutive columns *in
      that order*, so the result carries ``g_idx`` (input column -> group), exactly AutoGPTQ's
      ``g_idx[perm[i]] = i // group_size``. ``static_groups`` (GPTQModel option) instead fixes every group's
      grid on the unquantized weight in the original column order, so ``g_idx`` stays ``i // group_size``.
    - ``damp``: fraction of ``mean(diag H)`` added to the diagonal; retried larger if Cholesky fails.
    - ``overwrite_h``: ``H`` may be used as scratch (the caller drops it): saves one [in, in] copy.

    Group grids are fitted when a group starts, on the weights already updated by the errors of all
    previously quantized columns (AutoGPTQ ``fasterquant``); here that includes the not-yet-flushed updates
    of the current block, so the result is the same for every ``block_size``.
    """
    _check_args(w, H, bits, group_size, damp, block_size)
    device = w.device
    n_out, n_in = w.shape
    W = w.detach().to(dtype=torch.float32, copy=True)  # one fp32 copy (a .to() then .clone() made two at once)
    H = H.detach().to(device=device, dtype=torch.float32)
    if not overwrite_h:
        H = H.clone()
    per_channel = group_size == -1
    gs = n_in if per_channel else group_size
    n_groups = n_in // gs

    # Inputs that are always zero carry no information: fix H_ii = 1 so H stays invertible and quantize the
    # column to zero (AutoGPTQ / llm-compressor "dead" columns).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static_scales = static_zeros = None
    if static_groups or per_channel:
        # Grids fixed up front on the original column order (one group per row when per-channel, as
        # AutoGPTQ's Quantizer.find_params(W) before the loop).
        static_scales, static_zeros = _group_qparams(W.reshape(n_out * n_groups, gs), bits, sym)
        static_scales = static_scales.reshape(n_out, n_groups)
        static_zeros = static_zeros.reshape(n_out, n_groups)

    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
    else:
        perm = torch.arange(n_in, device=device)

    # The permutation is applied inside, in the same gather that reverses the order for the factorisation.
    Hinv = _inverse_hessian_cholesky(H, damp, perm if desc_act else None)
    del H

    from pipeline.quant import gptq_triton

    # On a GPU the column loop runs as one Triton kernel per block (gptq_triton.py); the loop below is the
    # reference it is tested against, and the CPU path.
    # Fixed grids work with any block; grids fitted at each group start need block == group.
    static = None if static_scales is None else (static_scales, static_zeros, perm // gs)
    block = gs if static is None else block_size
    if gptq_triton.eligible(W, block):
        q_int, scales, zeros = gptq_triton.gptq_columns(W, Hinv, bits, sym, block, _group_qparams, static=static)
        return _finish(q_int, scales, zeros, perm, desc_act, bits, gs, static=static is not None)

    q_int = torch.empty(n_out, n_in, dtype=torch.int32, device=device)
    if static_scales is not None:
        scales, zeros = static_scales, static_zeros
        # Group of the column at each (permuted) position: its original index // gs.
        col_group_list = (perm // gs).tolist()
    else:
        scales = torch.empty(n_out, n_groups, dtype=torch.float32, device=device)
        zeros = torch.empty(n_out, n_groups, dtype=torch.int32, device=device)

    scale = zero = zero_f = None
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if static_scales is None and c % gs == 0:
                # A group starts: fit its grid on its current (updated) weights. Columns inside this block are
                # up to date in W1; columns past it still lack this block's pending updates Err1 · Hinv.
                g_end = min(c + gs, n_in)
                cols = W1[:, i:g_end - i1]
                if g_end > i2:
                    rest = W[:, i2:g_end] - Err1[:, :i] @ Hinv[i1:c, i2:g_end]
                    cols = torch.cat([cols, rest], dim=1)
                scale, zero = _group_qparams(cols, bits, sym)
                scales[:, c // gs] = scale[:, 0]
                zeros[:, c // gs] = zero[:, 0]
                zero_f = zero.float()
            elif static_scales is not None and (c == 0 or col_group_list[c] != col_group_list[c - 1]):
                gi = col_group_list[c]
                scale, zero = scales[:, gi:gi + 1], zeros[:, gi:gi + 1]
                zero_f = zero.float()
            w_col = W1[:, i:i + 1]
            q = quantize_with_qparams(w_col, scale, zero, bits)
            q_int[:, c] = q[:, 0]
            # Algorithm 1: δ = (w - quant(w)) / [H⁻¹]_cc, then W[:, c:] -= δ · [H⁻¹]_c,c: (Cholesky row).
            err = (w_col - (q.float() - zero_f) * scale) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        # Lazy batch update (paper §3.2): the block's errors reach the remaining columns in one GEMM.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return _finish(q_int, scales, zeros, perm, desc_act, bits, gs, static=static_scales is not None)


def _finish(q_int, scales, zeros, perm, desc_act: bool, bits: int, gs: int, static: bool = False) -> QuantizedWeight:
    """Check the scales, undo act-order's permutation, and build g_idx."""
    if not bool(torch.isfinite(scales).all()):
        raise QuantizationError(
            "A GPTQ group scale overflows float16 (the weights exceed ~1e6 in magnitude), so the layer cannot be "
            "stored in the GPTQ format. Check the checkpoint's weights, or leave this layer unquantized."
        )
    g_idx = None
    if desc_act:
        invperm = torch.argsort(perm)
        q_int = q_int[:, invperm]
        if not static:
            # Groups are runs of gs consecutive positions in act-order: g_idx[perm[i]] = i // group_size.
            g_idx = (invperm // gs).to(torch.int32)
    return QuantizedWeight(w_int=q_int, scales=scales, zeros=zeros, bits=bits, group_size=gs, g_idx=g_idx)
