"""q|k|v and gate|up as one product each in the static-cache decode step (:mod:`pipeline.serve.cuda_graphs`).

At batch 1 a decode step is memory-bound and its small products pay a launch and a ramp each: on the H200, for
the Llama-3-8B shape, bf16 q, k and v take 12.4 + 6.9 + 6.9 us through cuBLAS and 15.4 us as one [6144, 4096]
product; our one-token INT4 GEMV 5.7 + 3.7 + 3.7 us against 7.5, and gate|up 2 x 12.1 against 20.5
(bench/RESULTS.md, ``results_int4_gemv_h200.json``). vLLM's ``QKVParallelLinear`` and
``MergedColumnParallelLinear`` merge the same products; here the merge happens at serve time, over the modules
the loader built, and costs no memory: the fused module owns the concatenated weight and the original modules'
weights become row views of it (prefill and evaluation still call ``q_proj`` ... through transformers' forward).

What fuses: plain ``nn.Linear`` parts (any dtype; one ``F.linear``), ``Int8Linear`` (W8A8: int8 rows and their
per-row scales concatenate, the activation quantizer is per token, so every output is the part's own),
``Fp8Linear`` per channel (the same, through one ``torch._scaled_mm``, or one token through ``fp8_cuda``'s GEMV)
or in 128x128 blocks where every part but the last has whole rows of blocks (q|k|v and gate|up of the FP8
checkpoints that ship blocks: the rows of block scales concatenate, and the activations' 1 x 128 groups do not
depend on N; the dequantize path, or one token through ``fp8_cuda``'s block GEMV), and
``Int4Linear`` parts: one token through our CUDA GEMV over the merged codes (``qweight`` [N, K / 8] and
``scale_zero`` [N, K / G] are row-major in N, so rows concatenate), 2-16 tokens on CUDA through our tensor-core
kernel over the merged ``qmma`` (tiles of 8 rows, which concatenate), and on the CPU (any number of tokens), or on
CUDA where that kernel is not built (up to 8), PyTorch's int4 kernel over the merged packed weight (its tiles start
with 8 rows, so rows concatenate too; the [K / G, N, 2] scales are copied, a few MB); prefill on CUDA runs the
parts one by one. Any other mix (block-scaled FP8 parts with a partial row of blocks before the last,
bitsandbytes, parts that differ in width, group or bias) is called part by part, as before.

:func:`decode_layer` is the decoder layer's forward for one token per slot with those products: the body of
transformers' ``LlamaDecoderLayer``/``LlamaAttention``/``LlamaMLP`` (Mistral and Qwen2 are the same; Qwen3 adds
RMS norms on q and k), checked against each family's own forward in tests/test_static_decoder_families.py. Its
last residual add is left to the next layer, where ``torch.compile`` fuses it with that layer's first norm.

The one-token INT4 chain (``FusedLayer.int4_chain``): where every product of a layer is on our CUDA GEMV, a
single token runs the whole layer's non-attention work inside its four GEMVs (``quantship::int4_gemv``'s fusions):
the input RMSNorm in q|k|v's, the residual add in o's, the second RMSNorm and SwiGLU in gate|up's (its output is
silu(gate) * up), the residual add in down's: 4 kernels a layer fewer. On the H200 (Llama-3-8B shape, batch 1,
bench/RESULTS.md) it took INT4 from 322 to 361 tok/s with the kernels of that day; with today's faster plain
kernels the gain is within the run-to-run noise (368 against 361).

Where the family's rotary embedding is transformers' rotate_half over whole heads (Llama, Mistral, Qwen2 without
a q|k|v bias: ``FusedLayer.rope_chain``), q|k|v's GEMV is ``quantship::int4_gemv_rope``: it also rotates q and k
and writes k and v into the static cache (two compiled kernels a layer fewer), and it adds the last layer's
down output to the residual stream first, so down runs the plain kernel (13.5 against 15.7 us with the add).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engines.qlinear import _GEMV_ROWS, KERNEL_CPU, int4_route, int4pack_mm

log = logging.getLogger(__name__)
# Switches for bench/decode_speed.py's comparisons ("-nochain", "-nodefer"), not user settings: the one-token INT4
# chain of FusedLayer, and decode_layer leaving its last residual add to the next layer's norm.
INT4_CHAIN = True
DEFER_RESIDUAL = True
ROPE_IN_QKV = True  # the chain's q|k|v GEMV also rotates q and k and writes k and v into the cache ("-norope")
CHAIN_ROWS = {"qkv": 4, "o": 4, "gate_up": 4, "down": 4}  # rows a chunk of the chain's GEMVs ("-rows4442", ...)


class FusedLinear(nn.Module):
    """``parts`` (same input) as one product whose output is their outputs side by side (module docstring)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = list(parts)  # a plain list: the parts stay the model's modules, not ours
        self.kind = _kind(self.parts)
        self.register_buffer("bias", None)
        if self.kind == "dense":
            self.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
            if parts[0].bias is not None:
                self.bias = torch.cat([p.bias.detach() for p in parts])
            _rebind(parts, "weight", self.weight, parameter=True)
            if self.bias is not None:
                _rebind(parts, "bias", self.bias, parameter=True)
        elif self.kind == "int8":  # W8A8: int8 rows and per-row scales concatenate; any number of tokens
            from pipeline.engines.int8_linear import Int8Linear

            bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
            self.int8 = Int8Linear(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), bias)
            for name in ("weight", "scale", "bias"):
                if getattr(self.int8, name) is not None:
                    _rebind(parts, name, getattr(self.int8, name))
        elif self.kind == "fp8":  # FP8: rows and their scales (per row, or per row of blocks) concatenate
            from pipeline.engines.fp8_linear import Fp8Linear

            first = parts[0]
            bias = torch.cat([p.bias for p in parts]) if first.bias is not None else None
            self.fp8 = Fp8Linear(torch.cat([p.weight for p in parts]), torch.cat([p.weight_scale for p in parts]),
                                 block=first.block, bias=bias, device=first.weight.device, dtype=first.compute_dtype,
                                 kernel=first.kernel, act_quant=first.act_quant)  # fmt: skip
            for name in ("weight", "weight_scale", "bias"):
                if getattr(self.fp8, name) is not None:
                    _rebind(parts, name, getattr(self.fp8, name))
            for p in parts:  # the parts' derived scale buffers: views of their merged scales too
                p.rebind_scale_views()
        elif self.kind == "int4":
            first = parts[0]
            self.group_size, self.compute_dtype = first.group_size, first.compute_dtype
            self.gemv, self.packed, self.mma = _int4_paths(parts)
            self.cpu_kernel = first.kernel == KERNEL_CPU
            self.prefill_dequant = first.prefill_dequant
            if self.gemv:
                self.qweight = torch.cat([p.qweight for p in parts])
                self.scale_zero = torch.cat([p.scale_zero for p in parts])
                _rebind(parts, "qweight", self.qweight)
                _rebind(parts, "scale_zero", self.scale_zero)
            if self.mma:  # int4_mma's tiles of 8 rows concatenate
                self.qmma = torch.cat([p.qmma for p in parts])
                _rebind(parts, "qmma", self.qmma)
            if self.packed:  # PyTorch's int4 kernel: tiles of 8 rows first, so rows concatenate; its scales
                # ([K / G, N, 2]) concatenate along N into a new (small) tensor, the parts keep theirs
                self.weight_int4pack = torch.cat([p.weight_int4pack for p in parts])
                self.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts], dim=1)
                _rebind(parts, "weight_int4pack", self.weight_int4pack)
            if first.bias is not None:
                self.bias = torch.cat([p.bias for p in parts])
                _rebind(parts, "bias", self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dense":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "int8":
            return self.int8(x)
        if self.kind == "fp8":
            return self.fp8(x)
        if self.kind == "int4":  # the parts' own routes (qlinear.int4_route) over the merged weights
            rows = x.shape[:-1].numel()
            x2 = x.reshape(rows, -1).to(self.compute_dtype)
            route = int4_route(rows, self.gemv, _GEMV_ROWS if self.prefill_dequant else None, self.mma)
            if route == "gemv":
                y = torch.ops.quantship.int4_gemv(x2, self.qweight, self.scale_zero, self.group_size)
            elif route == "mma":
                y = torch.ops.quantship.int4_mma(x2, self.qmma, self.scale_zero, self.group_size)
            elif route == "packed" and self.packed and rows > 0:
                y = int4pack_mm(x2.contiguous(), self.weight_int4pack, self.group_size, self.scales_and_zeros,
                                self.cpu_kernel)  # fmt: skip
            else:  # prefill's dequantize + matmul, or packed weights that do not concatenate: part by part
                return torch.cat([p(x) for p in self.parts], dim=-1)
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*x.shape[:-1], -1)
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, parts={len(self.parts)}"


def _kind(parts: list[nn.Module]) -> str:
    """"dense", "int8", "fp8", "int4" or "separate" (module docstring)."""
    from pipeline.engines.fp8_linear import Fp8Linear
    from pipeline.engines.int8_linear import Int8Linear
    from pipeline.engines.qlinear import Int4Linear

    def same(*attrs: str) -> bool:
        return len({tuple(getattr(p, a, None) for a in attrs) for p in parts}) == 1

    if not same("in_features") or len({getattr(p, "bias", None) is not None for p in parts}) != 1:
        return "separate"
    if any(hasattr(p, "_hf_hook") or any(t.is_meta for t in p.parameters()) for p in parts):
        return "separate"  # accelerate's offloading moves weights in at call time: leave its modules alone
    if all(type(p) is nn.Linear for p in parts) and len({(p.weight.dtype, p.weight.device) for p in parts}) == 1:
        return "dense"
    if all(type(p) is Int4Linear for p in parts) and same("group_size", "compute_dtype", "kernel") and any(
            _int4_paths(parts)):  # fmt: skip
        return "int4"
    if all(type(p) is Int8Linear for p in parts) and len({p.weight.device for p in parts}) == 1:
        return "int8"
    if all(type(p) is Fp8Linear for p in parts) and same("kernel", "act_quant", "compute_dtype", "block") and (
            parts[0].block is None or all(p.out_features % parts[0].block[0] == 0 for p in parts[:-1])):
        return "fp8"  # block scales concatenate where every part but the last fills whole rows of blocks
    return "separate"


# Rows of PyTorch's packed int4 weight that are laid out together: tiles of 8 rows on CUDA (tinygemm); on the CPU
# blocks of four float vectors (int4mm_kernel.cpp's BLOCK_N: 32 rows with AVX2, 64 with AVX-512), the last block of
# a part packed as a short one. Parts concatenate where every part but the last fills whole blocks.
_PACK_ROWS = {"cuda": 8, "cpu": 64}


def _int4_paths(parts: list[nn.Module]) -> tuple[bool, bool, bool]:
    """Which paths of these ``Int4Linear`` parts merged weights can serve: (one token through our CUDA GEMV,
    PyTorch's packed int4 kernel, whose packed rows concatenate in whole blocks: :data:`_PACK_ROWS`, 2-16 tokens
    through our tensor-core kernel)."""
    gemv = all(p.gemv_cuda for p in parts)
    block = _PACK_ROWS["cpu" if parts[0].kernel == KERNEL_CPU else "cuda"]
    packed = all("weight_int4pack" in p._buffers for p in parts) and all(
        p.out_features % (8 if i == len(parts) - 1 else block) == 0 for i, p in enumerate(parts))
    return gemv, packed, gemv and all(p.mma_cuda for p in parts)


def _rebind(parts: list[nn.Module], name: str, fused: torch.Tensor, parameter: bool = False) -> None:
    """Each part's ``name`` becomes its rows of ``fused`` (a view: the part's own copy is freed)."""
    start = 0
    for p in parts:
        rows = getattr(p, name).shape[0]
        view = fused.detach()[start : start + rows]
        if parameter:
            setattr(p, name, nn.Parameter(view, requires_grad=False))
        else:
            p._buffers[name] = view
        start += rows


class FusedLayer(nn.Module):
    """One decoder layer's merged products: ``qkv`` (q|k|v) and ``gate_up`` (gate|up). A module, so that
    ``torch.compile`` inlines it as it does the layer (one compiled region for all layers, not one per layer).
    ``int4_chain``: at one token the layer's four INT4 GEMVs also run its norms, SwiGLU and residual adds
    (:func:`_int4_chain_problem`)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj])
        self.splits = (_out(attn.q_proj), _out(attn.k_proj), _out(attn.v_proj))
        self.rotary = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        why = _int4_chain_problem(layer, self)
        self.int4_chain = INT4_CHAIN and not why
        if why and self.qkv.kind == "int4":
            log.debug("decode layer: INT4 products without the fused norms/SwiGLU/residuals (%s)", why)
        why = _rope_problem(layer, self) if self.int4_chain else "no INT4 chain"
        self.rope_chain = ROPE_IN_QKV and not why
        if why and self.int4_chain:
            log.debug("decode layer: the rotary embedding and cache write outside the q|k|v GEMV (%s)", why)


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # transformers' one RMSNorm forward


def _int4_chain_problem(layer: nn.Module, fused: FusedLayer) -> str:
    """Why ``layer``'s one-token INT4 products cannot also run its norms, SwiGLU and residual adds, or "": q|k|v
    and gate|up merged on our GEMV (gate|up without bias, its halves equal), o and down our GEMV without bias, the
    norms transformers' ``LlamaRMSNorm`` (the families of :data:`_RMS_NORMS` share its forward), the activation
    SiLU, one activation dtype, and the fused kernels compiled."""
    from pipeline.engines import int4_cuda
    from pipeline.engines.qlinear import Int4Linear

    o, down, act = layer.self_attn.o_proj, layer.mlp.down_proj, layer.mlp.act_fn
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not all(f.kind == "int4" and f.gemv for f in (fused.qkv, fused.gate_up)):
        return "q|k|v or gate|up is not merged on the one-token INT4 GEMV"
    if not all(type(m) is Int4Linear and m.gemv_cuda and m.bias is None for m in (o, down)):
        return "o_proj or down_proj is not a bias-free INT4 linear on the one-token GEMV"
    gate, up = fused.gate_up.parts
    if fused.gate_up.bias is not None or gate.out_features != up.out_features:
        return "gate and up differ in width or have a bias (SwiGLU after the product needs neither)"
    if not all(type(n).__name__ in _RMS_NORMS and hasattr(n, "variance_epsilon") for n in norms):
        return f"norm {type(norms[0]).__name__} is not one of {', '.join(_RMS_NORMS)}"
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return f"activation {type(act).__name__} is not SiLU"
    dtype = fused.qkv.compute_dtype
    if {fused.gate_up.compute_dtype, o.compute_dtype, down.compute_dtype, *(n.weight.dtype for n in norms)} != {dtype}:
        return "the products and norms differ in dtype"
    for k, norm, epilogue in ((o.in_features, False, "residual"), (down.in_features, False, "residual"),
                              (fused.qkv.parts[0].in_features, True, ""), (gate.in_features, True, "swiglu")):
        why = int4_cuda.compile_problem(dtype, k, norm, epilogue)
        if why:
            return why
    return ""


# transformers' modules whose apply_rotary_pos_emb is the rotate_half form over whole heads that the rotary epilogue
# computes (Qwen3 normalises q and k first: excluded by its q_norm)
_ROPE_MODULES = tuple(f"transformers.models.{m}.modeling_{m}" for m in ("llama", "mistral", "qwen2"))


def _rope_problem(layer: nn.Module, fused: FusedLayer) -> str:
    """Why the q|k|v GEMV of ``layer``'s INT4 chain cannot also apply the rotary embedding and write k and v into
    the cache (``int4_cuda.RopeWrite``), or "": the family's rotary is transformers' rotate_half form, no norm on
    q and k, no q|k|v bias (it would come before the rotation), whole heads, and the variant compiled."""
    from pipeline.engines import int4_cuda

    attn = layer.self_attn
    if fused.rotary.__module__ not in _ROPE_MODULES:
        return f"rotary embedding of {fused.rotary.__module__}"
    if hasattr(attn, "q_norm") or fused.qkv.bias is not None:
        return "a norm on q and k, or a q|k|v bias, comes before the rotation"
    q_rows, k, hd = fused.splits[0], fused.qkv.parts[0].in_features, attn.head_dim
    if hd % 4 or q_rows % hd or fused.splits[1] != fused.splits[2] or fused.splits[1] % hd or k > int4_cuda.WIDE_K:
        return f"q|k|v widths {fused.splits} in heads of {hd} with K = {k}"
    return int4_cuda.compile_problem(fused.qkv.compute_dtype, k, True, "rope")


def _gemv(linear: nn.Module, x: torch.Tensor, norm: nn.Module | None = None, swiglu: bool = False,
          residual: torch.Tensor | None = None, rows: int = 0) -> torch.Tensor:
    """One token through ``quantship::int4_gemv``'s fusions over ``linear``'s codes (an ``Int4Linear`` or an int4
    ``FusedLinear``): ``norm`` (an RMSNorm) before the product; after it ``+ residual``, or with ``swiglu``
    silu(gate) * up over gate|up (half the width); ``rows``: rows a chunk (0: the kernel's default)."""
    y = torch.ops.quantship.int4_gemv(
        x.reshape(1, -1), linear.qweight, linear.scale_zero, linear.group_size,
        None if norm is None else norm.weight, 0.0 if norm is None else float(norm.variance_epsilon), swiglu,
        None if residual is None else residual.reshape(1, -1), rows)  # fmt: skip
    if linear.bias is not None:  # q|k|v's (Qwen2); the chain refuses a biased gate|up
        y = y + linear.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], -1)


def _out(linear: nn.Module) -> int:
    return getattr(linear, "out_features", None) or linear.weight.shape[0]


def fuse_layers(model: nn.Module) -> list[FusedLayer] | None:
    """The merged products of every layer of ``model``, or None where :func:`decode_layer` is not its layer."""
    from pipeline.serve.graph_step import SAME_LOOP  # the static-cache step's families: decode_layer is their layer

    family = getattr(getattr(model, "config", None), "model_type", None)
    layers = model.model.layers
    need = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", "input_layernorm", "post_attention_layernorm")  # fmt: skip
    if family not in SAME_LOOP or not all(_has(layer, n) for layer in layers for n in need):
        return None
    if any(not hasattr(importlib.import_module(type(layer.self_attn).__module__), "apply_rotary_pos_emb")
           for layer in layers):  # fmt: skip
        return None
    return [FusedLayer(layer) for layer in layers]


def _has(obj: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def decode_layer(layer: nn.Module, fused: FusedLayer, h: torch.Tensor, pending: torch.Tensor | None,
                 mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: Any) -> tuple[torch.Tensor, Any]:
    """``layer``'s forward over ``h`` [b, 1, hidden] with the merged products, writing k/v through ``kv.update``.

    Returns (residual stream, the MLP output still to add to it or None): the add is left to the next layer, where
    ``torch.compile`` fuses it with that layer's first norm (one kernel a layer less; the caller adds the last).
    With ``fused.int4_chain`` at one token the norms, SwiGLU and residual adds run inside the four INT4 GEMVs."""
    from pipeline.serve.decode_attention import decode_attention

    attn, mlp = layer.self_attn, layer.mlp
    b, t, _ = h.shape
    chain = fused.int4_chain and b * t == 1 and h.dtype == fused.qkv.compute_dtype
    rope = (chain and fused.rope_chain and cos.shape[-1] == attn.head_dim and getattr(kv, "start", 0) is None
            and cos.dtype == h.dtype and kv.k.dtype == h.dtype)
    if pending is not None and not (rope and pending.dtype == h.dtype):
        h = h + pending
        pending = None
    if rope:
        # one kernel: the last layer's residual add, RMSNorm, q|k|v, the rotary embedding, k and v into the cache
        # at slot 0's position
        norm = layer.input_layernorm
        q, added = torch.ops.quantship.int4_gemv_rope(
            h.reshape(1, -1), None if pending is None else pending.reshape(1, -1), fused.qkv.qweight,
            fused.qkv.scale_zero, fused.qkv.group_size, norm.weight, float(norm.variance_epsilon), cos.reshape(-1),
            sin.reshape(-1), kv.pos, kv.k, kv.v, fused.splits[0], attn.head_dim, CHAIN_ROWS["qkv"])  # fmt: skip
        if pending is not None:
            h = added.reshape(h.shape)
        q = q.reshape(b, t, -1, attn.head_dim).transpose(1, 2)
        k, v = kv.k[:b], kv.v[:b]
    else:
        qkv = (_gemv(fused.qkv, h, norm=layer.input_layernorm, rows=CHAIN_ROWS["qkv"]) if chain
               else fused.qkv(layer.input_layernorm(h)))
        q, k, v = qkv.split(list(fused.splits), dim=-1)
        q, k, v = (z.reshape(b, t, -1, attn.head_dim) for z in (q, k, v))
        if hasattr(attn, "q_norm"):  # Qwen3: RMS norm per head on q and k, before the rotary embedding
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = fused.rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        k, v = kv.update(k, v.transpose(1, 2), attn.layer_idx)
    out, _ = decode_attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
    out = out.reshape(b, t, -1)
    if chain:
        h = _gemv(attn.o_proj, out, residual=h, rows=CHAIN_ROWS["o"])
        act = _gemv(fused.gate_up, h, norm=layer.post_attention_layernorm, swiglu=True, rows=CHAIN_ROWS["gate_up"])
        if fused.rope_chain:  # the next layer's q|k|v GEMV (or the final norm) adds it
            return h, _gemv(mlp.down_proj, act, rows=CHAIN_ROWS["down"])
        return _gemv(mlp.down_proj, act, residual=h, rows=CHAIN_ROWS["down"]), None
    h = h + attn.o_proj(out)
    gate, up = fused.gate_up(layer.post_attention_layernorm(h)).chunk(2, dim=-1)
    down = mlp.down_proj(mlp.act_fn(gate) * up)
    return (h, down) if DEFER_RESIDUAL else (h + down, None)
