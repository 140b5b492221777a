"""Runtime modules that run quantized linears, and the registry that builds them from a folder's tensors.

``Int4Linear`` computes ``y = x @ ((q - z) * s).T + b`` for group-wise 4-bit weights with PyTorch's own packed
int4 kernels (the "tinygemm" ops gpt-fast and torchao use):

- CPU: ``aten._convert_weight_to_int4pack_for_cpu(int32 [N, K] codes in [0, 16), innerKTiles)`` -> uint8
  [N, K / 2]; ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, scales_and_zeros [K / group, N, 2])``
  with ``x`` and ``scales_and_zeros`` of one dtype (float32, bfloat16 or float16), N % 16 == 0, group in
  {32, 64, 128, 256} (checked on torch 2.13; same op since 2.6, cf. torchao ``Int4CPULayout.from_plain``).
- CUDA (sm80+), "cuda-int4pack" (what "auto" takes on CUDA): decode (M <= 8 tokens) on PyTorch's tinygemm kernel
  below, the fastest 4-bit GEMV measured on the H200 (bench/RESULTS.md, "Fast low-bit decode": ~1.4-1.7 TB/s of
  weight reads at M = 1, against gemlite 0.6's 1.1-1.5 TB/s and our own Triton GEMV's 0.06-0.74 TB/s); prefill
  (M > 8, where tinygemm is slower than bf16) dequantizes into a per-call bf16 scratch with our Triton kernel
  (``int4_triton``, from a second 4-bit copy in its layout) and runs one cuBLAS GEMM.
  Under "auto", a single token (M = 1, batch-1 decode) runs our CUDA GEMV instead (``int4_cuda``, compiled with
  NVRTC at load; tinygemm where it does not compile) over the Triton copy, so it costs only a 32-bit word per
  group: on the H200 it read 1.5-3.5 TB/s against tinygemm's 1.4-2.1 (bench/RESULTS.md, "One-token INT4 GEMV").
  And 2-16 tokens (batched decode, short prefills) run our tensor-core kernel (``int4_mma``, its own 4-bit copy,
  which then replaces tinygemm's): on the H200 the Llama-3-8B products took 0.53-0.63x tinygemm's time and
  0.59-0.88x bf16 cuBLAS's at 8 tokens, 0.77-1.06x bf16's at 16; at 2 tokens it took 1.01-1.30x tinygemm's time
  (0.59-0.82x bf16's), a loss kept for one 4-bit copy less (bench/RESULTS.md, "INT4 for 2-16 tokens").
- CUDA, "cuda-triton" (explicit only): our Triton GEMV for M <= 8, dequantize + cuBLAS above.
- the tinygemm ops: ``aten._convert_weight_to_int4pack(uint8 [N, K / 2] with column 2j in the *high* nibble,
  innerKTiles)`` and ``aten._weight_int4pack_mm(x bf16 [M, K], packed, group, scales_and_zeros bf16)``
  (torchao / torchchat: ``(w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)``).

Both kernels dequantize as ``(q - 8) * scale + zero`` with a *float* zero (gpt-fast ``quantize.py``,
``group_quantize_tensor_from_qparams``). Our convention is ``(q - z) * s``, so ``zero = (8 - z) * s``, which is
exact in float32 for fp16 scales and integer ``z``.

The other path, "dequantize", keeps the codes two per byte and computes ``x @ ((q - z) * s).T`` per call: exact
float32 math, and 4 bits per weight in memory too. "auto" picks it where an op is missing or a shape unsupported,
and on CPU for float32/float16, where the int4 kernel has only a scalar path (measured on 2 AVX2 cores,
2048x2048: float32 kernel 17 ms at 1 token, 268 ms at 16, 1.7 s at 128; bfloat16 kernel 1 / 16 / 67 ms;
dequantize + float32 matmul 30 / 77 / 88 ms). The chosen path is ``Int4Linear.kernel``, logged per module.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch
from torch import nn

from pipeline.errors import QuantizationError
from pipeline.formats import awq_gemm
from pipeline.quant.primitives import QuantizedWeight

log = logging.getLogger(__name__)

KERNEL_CPU = "cpu-int4pack"
KERNEL_CUDA = "cuda-int4pack"
KERNEL_DEQUANT = "dequantize"
KERNEL_TRITON = "cuda-triton"
KERNELS = ("auto", KERNEL_CPU, KERNEL_CUDA, KERNEL_TRITON, KERNEL_DEQUANT)
_KERNEL_GROUPS = (32, 64, 128, 256)
_GEMV_ROWS = 8  # up to this many tokens a packed int4 kernel; above, dequantize + cuBLAS (CUDA)
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aten_op(name: str):
    return getattr(torch.ops.aten, name, None)


def _in_order(qw: QuantizedWeight) -> bool:
    if qw.g_idx is None:
        return True
    in_features = qw.w_int.shape[1]
    return torch.equal(qw.g_idx.long().cpu(), torch.arange(in_features) // qw.group_size)


def _scales_and_zeros(qw: QuantizedWeight, dtype: torch.dtype, device) -> torch.Tensor:
    """[K / group, N, 2]: (scale, float zero) with zero = (8 - z) * s, so (q - 8) * s + zero == (q - z) * s."""
    s = qw.scales.float()
    zero = (8 - qw.zeros.float()) * s
    return torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(device=device, dtype=dtype)


def _inner_k_tiles(in_features: int) -> int | None:
    """The largest innerKTiles (8, 4, 2) with K % (innerKTiles * 16) == 0, as gpt-fast's ``_check_linear_int4_k``."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


def _packed_kernel_problem(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(the packed kernel for this device, why it cannot run this weight or "" when it can)."""
    out_features, in_features = qw.w_int.shape
    if device.type == "cpu":
        kernel, ops = KERNEL_CPU, ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    elif device.type == "cuda":
        kernel, ops = KERNEL_CUDA, ("_convert_weight_to_int4pack", "_weight_int4pack_mm")
    else:
        return KERNEL_DEQUANT, f"no int4 kernel for device {device.type}"
    if any(_aten_op(op) is None for op in ops):
        return kernel, f"this torch has no aten.{ops[1]}"
    if qw.bits != 4:
        return kernel, f"{qw.bits}-bit weights"
    if not _in_order(qw):
        return kernel, "permuted groups (g_idx)"
    if qw.group_size not in _KERNEL_GROUPS:
        return kernel, f"group size {qw.group_size} not in {_KERNEL_GROUPS}"
    if kernel == KERNEL_CPU:
        if out_features % 16:
            return kernel, f"out features {out_features} not a multiple of 16"
        if dtype not in _CPU_DTYPES:
            return kernel, f"dtype {dtype}"
    else:
        if torch.cuda.get_device_capability(device) < (8, 0):
            return kernel, "the CUDA int4 kernel needs sm80+"
        if out_features % 8 or _inner_k_tiles(in_features) is None:
            return kernel, f"shape [{out_features}, {in_features}] (needs N % 8 == 0, K % 32 == 0)"
    return kernel, ""


def _triton_problem(qw: QuantizedWeight) -> str:
    """Why our Triton int4 kernels cannot run this weight, or ""."""
    from pipeline.engines import int4_triton

    why = int4_triton.available()
    if why:
        return why
    if qw.bits != 4:
        return f"{qw.bits}-bit weights"
    if not _in_order(qw):
        return "permuted groups (g_idx)"
    if qw.group_size % 8 or qw.w_int.shape[1] % qw.group_size:
        return f"group size {qw.group_size} (needs a multiple of 8 dividing K)"
    return ""


def _choose_kernel(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype, kernel: str) -> tuple[str, str]:
    """(kernel, why not the packed one) for ``kernel`` = "auto" or an explicit choice."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == KERNEL_DEQUANT:
        return KERNEL_DEQUANT, "asked for"
    if kernel == KERNEL_TRITON:  # explicit only: measured slower than tinygemm at decode (bench/RESULTS.md)
        if device.type != "cuda":
            raise ValueError(f"kernel {KERNEL_TRITON!r} needs a CUDA device, got {device.type}")
        problem = _triton_problem(qw)
        if problem:
            raise ValueError(f"kernel {KERNEL_TRITON!r} cannot run this weight: {problem}")
        return KERNEL_TRITON, ""
    packed, problem = _packed_kernel_problem(qw, device, dtype)
    if problem:
        return KERNEL_DEQUANT, problem
    if kernel == "auto" and packed == KERNEL_CPU and dtype != torch.bfloat16:
        # The CPU tinygemm kernel is vectorized for bfloat16 only (aten/src/ATen/native/cpu/int4mm_kernel.cpp);
        # float32/float16 take a scalar path, measured 17x (16 tokens) to 25x (128 tokens) slower than bfloat16
        # on 2048x2048 and slower than dequantize + matmul from 4 tokens on. So: exact float math, dequantized.
        return KERNEL_DEQUANT, f"the CPU int4 kernel is slow in {dtype} (bfloat16 only is vectorized)"
    if kernel not in ("auto", packed):
        raise ValueError(f"kernel {kernel!r} cannot run on {device.type}")
    return packed, ""


def int4_route(rows: int, gemv: bool, dequant_above: int | None, mma: bool = False) -> str:
    """The kernel an INT4 product of ``rows`` tokens takes (``Int4Linear`` and the serve-time merged products
    share it): "gemv" (one token, where our CUDA GEMV is built), "mma" (2 to ``int4_mma.MAX_M`` tokens, where our
    tensor-core kernel is built), "dequant-matmul" (the Triton dequantize + cuBLAS, above ``dequant_above``
    tokens: :data:`_GEMV_ROWS` for prefill, 0 under ``kernel="cuda-triton"``, None never), else "packed"
    (PyTorch's int4 kernel)."""
    from pipeline.engines.int4_mma import MAX_M

    if gemv and rows == 1:
        return "gemv"
    if mma and 1 <= rows <= MAX_M:
        return "mma"
    if dequant_above is not None and rows > dequant_above:
        return "dequant-matmul"
    return "packed"


def int4pack_mm(x2: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
                cpu: bool) -> torch.Tensor:  # fmt: skip
    """PyTorch's packed int4 product (tinygemm on CUDA, its CPU kernel with ``cpu``) of x2 [M, K]."""
    aten = torch.ops.aten
    op = aten._weight_int4pack_mm_for_cpu if cpu else aten._weight_int4pack_mm
    return op(x2, packed, group, scales_and_zeros)


class Int4Linear(nn.Module):
    """A linear layer with group-wise 4-bit weights, built from a ``QuantizedWeight`` on its target device
    (other widths up to 8 bits, e.g. GPTQ 2/8-bit, run on the dequantize path).

    ``kernel``: "auto" (the packed int4 kernel where it is fast: CPU in bfloat16, CUDA; else dequantize on the
    fly), or force "cpu-int4pack" / "cuda-int4pack" / "dequantize". Both paths keep 4 bits per weight in memory.
    """

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernel: str = "auto",
    ):
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = qw.w_int.shape
        self.group_size = qw.group_size
        self.bits = qw.bits
        self.kernel, reason = _choose_kernel(qw, device, dtype, kernel)
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))
        if self.kernel == KERNEL_TRITON:
            self._build_triton(qw, device, dtype)
        elif self.kernel != KERNEL_DEQUANT:
            try:
                self._build_packed(qw, device, dtype)
                self._run_packed(torch.zeros(1, self.in_features, device=device, dtype=self.compute_dtype))
            except RuntimeError as e:  # an op that exists but refuses this build/shape: keep running, slower
                self.kernel, reason = KERNEL_DEQUANT, f"kernel raised: {str(e).splitlines()[0]}"
                for name in ("weight_int4pack", "scales_and_zeros"):
                    self._buffers.pop(name, None)
        self.prefill_dequant, self.gemv_cuda, self.mma_cuda = False, False, False
        if self.kernel == KERNEL_CUDA and not _triton_problem(qw):
            # prefill (M > 8): dequantize into a bf16 scratch + one cuBLAS GEMM; keeps a second 4-bit copy
            self._build_triton(qw, device, torch.bfloat16)
            self.compute_dtype, self.prefill_dequant = torch.bfloat16, True
            if kernel == "auto":  # one token: our CUDA GEMV over that same copy (int4_cuda), where it compiles
                self._build_gemv(qw, device)
            if self.gemv_cuda:  # 2-16 tokens: our tensor-core kernel (int4_mma), in place of tinygemm's copy
                self._build_mma(device)
        if self.kernel == KERNEL_DEQUANT:
            self._build_dequant(qw, device, dtype)
            log.debug("Int4Linear [%d, %d]: dequantize on the fly (%s)", self.out_features, self.in_features, reason)
        else:
            log.debug("Int4Linear [%d, %d]: %s", self.out_features, self.in_features, self.kernel)
        self.fallback_reason = reason

    def _build_packed(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        w = qw.w_int.to(torch.int32)
        if self.kernel == KERNEL_CPU:
            self.compute_dtype = dtype
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.contiguous(), 1)  # innerKTiles unused on CPU
        else:
            self.compute_dtype = torch.bfloat16  # the CUDA tinygemm kernel takes bfloat16 activations only
            w = w.to(device)
            w_uint8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, _inner_k_tiles(self.in_features))
        self.register_buffer("weight_int4pack", packed.to(device))
        self.register_buffer("scales_and_zeros", _scales_and_zeros(qw, self.compute_dtype, device))

    def _build_triton(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        """int32 words of 8 codes along K, scales/zeros transposed (``int4_triton.repack``), computed in ``dtype``
        (bfloat16 or float16 on CUDA)."""
        from pipeline.engines import int4_triton

        self.compute_dtype = dtype
        for name, t in int4_triton.repack(qw.w_int, qw.scales, qw.zeros, device).items():
            self.register_buffer(name, t)
        int4_triton.custom_op()  # registered now; forward calls it as torch.ops.quantship.int4_matmul

    def _build_gemv(self, qw: QuantizedWeight, device: torch.device) -> None:
        from pipeline.engines import int4_cuda

        n, k = qw.w_int.shape
        why = int4_cuda.problem(n, k, qw.group_size, device, self.compute_dtype) or int4_cuda.compile_problem(
            self.compute_dtype, k)
        if why:
            log.debug("Int4Linear [%d, %d]: one-token GEMV on tinygemm (%s)", n, k, why)
            return
        self.register_buffer("scale_zero", int4_cuda.pack_scale_zero(qw.scales, qw.zeros).to(device))
        int4_cuda.custom_op()  # registered now; forward calls it as torch.ops.quantship.int4_gemv
        self.gemv_cuda = True

    def _build_mma(self, device: torch.device) -> None:
        from pipeline.engines import int4_mma

        n, k = self.out_features, self.in_features
        why = int4_mma.problem(n, k, self.group_size, device, self.compute_dtype) or int4_mma.compile_problem(
            self.group_size, n, k)
        if why:
            log.debug("Int4Linear [%d, %d]: 2-16 tokens on tinygemm (%s)", n, k, why)
            return
        self.register_buffer("qmma", int4_mma.pack(self.qweight))
        for name in ("weight_int4pack", "scales_and_zeros"):  # tinygemm's copy: nothing reads it any more
            self._buffers.pop(name, None)
        int4_mma.custom_op()  # registered now; forward calls it as torch.ops.quantship.int4_mma
        self.mma_cuda = True

    def _build_dequant(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        """Codes two per byte (column 2j in the low nibble; one per byte above 4 bits), scales float32, zeros uint8,
        g_idx when the groups are permuted."""
        if qw.bits > 8:
            raise QuantizationError(f"{qw.bits}-bit weights cannot be stored as uint8 codes; at most 8 bits.")
        self.compute_dtype = dtype
        w = qw.w_int.to(device=device, dtype=torch.uint8)
        self.nibbles = qw.bits <= 4 and self.in_features % 2 == 0
        self.register_buffer("w_packed", (w[:, 0::2] | (w[:, 1::2] << 4)).contiguous() if self.nibbles else w)
        self.register_buffer("scales", qw.scales.to(device=device, dtype=torch.float32))
        self.register_buffer("zeros", qw.zeros.to(device=device, dtype=torch.uint8))
        g_idx = None if _in_order(qw) else qw.g_idx.to(device=device, dtype=torch.int64)
        self.register_buffer("g_idx", g_idx)

    def _run_packed(self, x2: torch.Tensor) -> torch.Tensor:
        return int4pack_mm(x2, self.weight_int4pack, self.group_size, self.scales_and_zeros, self.kernel == KERNEL_CPU)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] = (q - z) * s (the dequantize path; also what tests compare against)."""
        if self.kernel != KERNEL_DEQUANT:
            raise RuntimeError("the packed kernels keep no plain codes; dequantize the QuantizedWeight instead")
        p = self.w_packed
        codes = torch.stack((p & 15, p >> 4), dim=-1).reshape(self.out_features, -1) if self.nibbles else p
        if self.g_idx is not None:
            return (codes.float() - self.zeros[:, self.g_idx].float()) * self.scales[:, self.g_idx]
        g = codes.reshape(self.out_features, -1, self.group_size).float()
        return ((g - self.zeros.unsqueeze(-1).float()) * self.scales.unsqueeze(-1)).reshape(self.out_features, -1)

    def route(self, rows: int) -> str:
        """The kernel a product of ``rows`` (> 0) tokens takes on the packed paths (:func:`int4_route`)."""
        above = 0 if self.kernel == KERNEL_TRITON else _GEMV_ROWS if self.prefill_dequant else None
        return int4_route(rows, self.gemv_cuda, above, self.mma_cuda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == KERNEL_DEQUANT:
            y = x2 @ self.dequantized_weight().to(x.dtype).t()
        elif x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        else:
            route = self.route(x2.shape[0])
            x2 = x2.to(self.compute_dtype)
            if route == "gemv":
                y = torch.ops.quantship.int4_gemv(x2, self.qweight, self.scale_zero, self.group_size)
            elif route == "mma":
                y = torch.ops.quantship.int4_mma(x2, self.qmma, self.scale_zero, self.group_size)
            elif route == "dequant-matmul":
                y = torch.ops.quantship.int4_matmul(x2.contiguous(), self.qweight, self.scales_t, self.zeros_t,
                                                    self.group_size)  # fmt: skip
            else:
                y = self._run_packed(x2.contiguous())
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel}"
        )


# -- registry: quant_method -> builder of one runtime linear from that linear's tensors --------------------------
# A builder gets the tensors stored under one linear's prefix (keys without the prefix, e.g. {"qweight", "qzeros",
# "scales", "bias"}), the folder's quantization_config, the device, the compute dtype and keyword options (today
# ``int4_kernel``: "auto" or a kernel name; a builder ignores options it has no use for), and returns a module.
LinearBuilder = Callable[..., nn.Module]  # (tensors, quant_config, device, dtype, **options) -> nn.Module


def _require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], method: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise QuantizationError(
            f"a {method} linear lacks tensor(s) {', '.join(missing)} (it has {', '.join(sorted(tensors))}). The folder "
            "does not match its quantization_config; re-run the quantize stage."
        )


def awq_linear(tensors: dict[str, torch.Tensor], quant_config: dict, device, dtype, int4_kernel="auto", **_):
    """AWQ GEMM ``qweight``/``qzeros``/``scales`` (+ ``bias``) -> ``Int4Linear``."""
    _require(tensors, awq_gemm.TENSOR_SUFFIXES, "awq")
    _, group_size = awq_gemm.read_quantization_config(quant_config)
    qw = awq_gemm.unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size)
    return Int4Linear(qw, tensors.get("bias"), device=device, dtype=dtype, kernel=int4_kernel)


def gptq_linear(tensors: dict[str, torch.Tensor], quant_config: dict, device, dtype, int4_kernel="auto", **_):
    """GPTQ ``qweight``/``qzeros``/``scales``/``g_idx`` (+ ``bias``) -> ``Int4Linear`` (any GPTQ bit width; act-order
    ``g_idx`` runs on the dequantize path)."""
    from pipeline.formats import gptq

    _require(tensors, ("qweight", "qzeros", "scales"), "gptq")
    checkpoint_format = quant_config.get("checkpoint_format") or quant_config.get("format") or "gptq"
    qw = gptq.unpack(tensors, int(quant_config.get("bits", 4)), checkpoint_format)
    return Int4Linear(qw, tensors.get("bias"), device=device, dtype=dtype, kernel=int4_kernel)


def smooth_quant_linear(tensors: dict[str, torch.Tensor], quant_config: dict, device, dtype, **_) -> nn.Module:
    """lmdeploy smooth_quant W8A8 ``weight`` int8 / ``scale`` (+ ``bias``) -> ``Int8Linear``."""
    from pipeline.formats import w8a8

    return _int8_on(device, *w8a8.unpack_lmdeploy(tensors), tensors.get("bias"))


def _int8_on(device, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """An ``Int8Linear`` built on ``device`` (so on CUDA it picks its one-token kernel at construction)."""
    from pipeline.engines.int8_linear import Int8Linear

    return Int8Linear(w_int8.to(device), w_scale.to(device), None if bias is None else bias.to(device))


def fp8_linear(tensors: dict[str, torch.Tensor], quant_config: dict, device, dtype, fp8_kernel="auto", **_):
    """FP8 ``weight`` e4m3 + ``weight_scale_inv`` (quant_method fp8) or ``weight_scale`` (compressed-tensors
    float-quantized), per channel or in blocks (+ ``bias``) -> ``Fp8Linear``."""
    from pipeline.engines.fp8_linear import Fp8Linear
    from pipeline.formats import fp8

    w_fp8, scale, block = fp8.unpack(tensors, quant_config)
    return Fp8Linear(w_fp8, scale, block, tensors.get("bias"), device=device, dtype=dtype, kernel=fp8_kernel)


def compressed_tensors_linear(tensors: dict[str, torch.Tensor], quant_config: dict, device, dtype, int4_kernel="auto",
                              **options):
    """compressed-tensors: ``int-quantized`` W8A8 -> ``Int8Linear``; ``float-quantized`` FP8 -> ``Fp8Linear``;
    ``pack-quantized`` INT4 -> ``Int4Linear``."""
    from pipeline.formats import compressed_tensors_int4, w8a8

    fmt = quant_config.get("format")
    if fmt == "int-quantized":
        return _int8_on(device, *w8a8.unpack_compressed_tensors(tensors), tensors.get("bias"))
    if fmt == "float-quantized":
        return fp8_linear(tensors, quant_config, device, dtype, **options)
    if fmt == "pack-quantized":
        group_size, _ = compressed_tensors_int4.read_quantization_config(quant_config)
        qw = compressed_tensors_int4.unpack(tensors, group_size)
        return Int4Linear(qw, tensors.get("bias"), device=device, dtype=dtype, kernel=int4_kernel)
    raise QuantizationError(
        f"compressed-tensors format {fmt!r} has no runtime in the transformers engine; int-quantized (W8A8), "
        "float-quantized (FP8) and pack-quantized (INT4) do. Compile for vLLM, which reads every compressed-tensors "
        "format."
    )


RUNTIME_FORMATS: dict[str, LinearBuilder] = {
    "awq": awq_linear,
    "gptq": gptq_linear,
    "smooth_quant": smooth_quant_linear,
    "compressed-tensors": compressed_tensors_linear,
    "fp8": fp8_linear,
}


def build_linear(
    quant_method: str, tensors: dict[str, torch.Tensor], quant_config: dict, device, dtype: torch.dtype, **options
) -> nn.Module:
    """The runtime module for one quantized linear, or a QuantizationError naming the supported methods."""
    try:
        builder = RUNTIME_FORMATS[quant_method]
    except KeyError:
        raise QuantizationError(
            f"quant_method {quant_method!r} has no runtime in the transformers engine. Supported: "
            f"{', '.join(sorted(RUNTIME_FORMATS))}. Quantize with a method that writes one of these, or compile for "
            "an engine that reads this format."
        ) from None
    return builder(tensors, quant_config, torch.device(device), dtype, **options)


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many ``Int4Linear`` modules of ``model`` run on each kernel path (``Int8Linear``s count as "w8a8",
    ``Fp8Linear``s as "fp8-<kernel>"; "+gemv": one token goes through our CUDA GEMV)."""
    counts = Counter()
    for m in model.modules():
        if isinstance(m, Int4Linear):
            counts[m.kernel + ("+gemv" if m.gemv_cuda else "")] += 1
        elif type(m).__name__ == "Int8Linear":
            counts["w8a8" + ("+gemv" if m.gemv_cuda else "")] += 1
        elif type(m).__name__ == "Fp8Linear":
            counts[f"fp8-{m.kernel}"] += 1
    return dict(counts)
