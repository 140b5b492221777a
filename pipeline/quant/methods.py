"""The calibrated methods as the layer walker sees them: statistics in, a quantized layer and its packed tensors out.

Each class is thin glue: the math is in ``gptq.py``, ``awq.py`` and ``smoothquant.py``; the layouts are in
``pipeline/formats``. Per method, ``observe`` keeps only what the method needs (GPTQ a Hessian per shared input,
AWQ the inputs themselves, SmoothQuant a per-channel max), keyed by the module that produces the input.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.quant.arch import ArchSpec, LinearGroup
from pipeline.quant.layerwise import get_module
from pipeline.quant.primitives import QuantizedWeight, tf32_matmuls


def quantize_fp16_scales(w: torch.Tensor, bits: int, group_size: int, sym: bool, clip_ratio=1.0) -> QuantizedWeight:
    """Group-wise RTN (optionally clipped) with codes chosen for the fp16-rounded scales the checkpoint stores;
    the one implementation is ``rtn.rtn_quantize_weight``."""
    from pipeline.quant.rtn import rtn_quantize_weight

    return rtn_quantize_weight(w, bits, group_size, sym, clip_ratio)


def _set_weight(linear: nn.Linear, w: torch.Tensor) -> None:
    linear.weight.data = w.to(device=linear.weight.device, dtype=linear.weight.dtype)


def _pack_into(out: dict, name: str, linear: nn.Linear, tensors: dict[str, torch.Tensor] | None) -> None:
    if tensors is None:  # fake-quant mode (pack=False): the layer's dequantized weights are the output
        return
    out.update({f"{name}.{k}": v for k, v in tensors.items()})
    if linear.bias is not None:
        out[f"{name}.bias"] = linear.bias.detach().to(torch.float16)


def _fold_into(layer: nn.Module, group: LinearGroup, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Fold per-input-channel ``scales`` into ``group``'s producer and linears, in place (AWQ and SmoothQuant)."""
    from pipeline.quant.fold import fold_scales

    prev = get_module(layer, group.prev)
    folded = fold_scales(prev.weight, getattr(prev, "bias", None), [lin.weight for lin in linears], scales,
                         prev_is_norm=not isinstance(prev, nn.Linear))
    prev.weight.data = folded.prev_weight
    if folded.prev_bias is not None:
        prev.bias.data = folded.prev_bias
    for lin, w in zip(linears, folded.linears):
        lin.weight.data = w


def _can_fold(layer: nn.Module, group: LinearGroup) -> bool:
    prev = get_module(layer, group.prev)
    first = get_module(layer, group.linears[0])
    width = prev.weight.shape[0]
    return width == first.weight.shape[1]


class GPTQMethod:
    """GPTQ (Frantar et al., 2022) with one Hessian per shared input (q/k/v share one, gate/up another)."""

    def __init__(self, bits: int, group_size: int, sym: bool, desc_act: bool, damp: float, block_size: int,
                 static_groups: bool = False, hessian_dtype: torch.dtype = torch.float32, pack: bool = True):
        self.pack = pack
        self.args = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, damp=damp,
                         block_size=block_size, static_groups=static_groups)
        self.hessian_dtype = hessian_dtype
        self.H: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}

    def begin_layer(self, index: int) -> None:
        self.H, self.n = {}, {}

    def observe(self, group: LinearGroup, x: torch.Tensor) -> None:
        from pipeline.quant.gptq import accumulate_hessian

        # On CUDA the bf16/fp16 inputs go to the GEMM as they are, with fp32 output (accumulate_hessian); where
        # torch cannot, they are upcast and TF32 is exact for them (their mantissas fit TF32's 10 bits).
        with tf32_matmuls(x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
            self.H[group.prev], self.n[group.prev] = accumulate_hessian(
                self.H.get(group.prev), x, self.n.get(group.prev, 0))

    def quantize(self, layer: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
        from pipeline.formats import gptq as fmt
        from pipeline.quant.gptq import gptq_quantize

        out: dict[str, torch.Tensor] = {}
        for group in spec.groups:
            linears = [get_module(layer, name) for name in group.linears]
            # GPTQ treats rows independently given H, so the linears sharing this input are solved as one
            # stacked weight (one pass over the columns instead of one per linear): same result, fewer launches.
            stacked = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
            # The Hessian is handed over (popped, no other reference): GPTQ factorises it in place.
            qw = gptq_quantize(stacked, self.H.pop(group.prev), overwrite_h=True, **self.args)
            del stacked
            start = 0
            for name, linear in zip(group.linears, linears):
                rows = slice(start, start + linear.weight.shape[0])
                start = rows.stop
                part = QuantizedWeight(qw.w_int[rows], qw.scales[rows], qw.zeros[rows], qw.bits, qw.group_size, qw.g_idx)
                _set_weight(linear, part.dequantize())
                _pack_into(out, name, linear, fmt.pack(part) if self.pack else None)
            del qw
        return out


class AWQMethod:
    """AWQ (Lin et al., 2023): per-group scale search and fold, then clipping search, then INT4 (GEMM layout)."""

    def __init__(self, bits: int, group_size: int, n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5,
                 duo_scaling: bool = True, max_tokens: int = 4096, pack: bool = True, sym: bool = False):
        self.pack, self.sym = pack, sym
        self.bits, self.group_size, self.n_grid = bits, group_size, n_grid
        self.clip, self.max_shrink, self.duo_scaling, self.max_tokens = clip, max_shrink, duo_scaling, max_tokens
        self.x: dict = {}
        self.n_tokens: int | None = None

    def begin_walk(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens  # the walker's token count: the inputs are reduced as they come (StreamingInputs)

    def begin_layer(self, index: int) -> None:
        self.x = {}

    def observe(self, group: LinearGroup, x: torch.Tensor) -> None:
        from pipeline.quant.awq_inputs import StreamingInputs

        if self.n_tokens is None:  # not driven by the layer walker: keep the inputs whole
            self.x.setdefault(group.prev, []).append(x)
            return
        if group.prev not in self.x:
            self.x[group.prev] = StreamingInputs(self.n_tokens, self.max_tokens)
        self.x[group.prev].add(x)

    def quantize(self, layer: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
        from pipeline.formats import awq_gemm
        from pipeline.quant.awq import search_clip, search_scales
        from pipeline.quant.awq_inputs import StreamingInputs, _subsample_tokens, input_channel_magnitude

        scaled_inputs: dict[str, torch.Tensor] = {}
        for group in spec.groups:  # phase 1: scales, searched and folded on the float layer
            inputs = self.x.pop(group.prev)
            if isinstance(inputs, StreamingInputs):  # the token sample, mean |x|, Gram matrix: as from all tokens
                x, magnitude, gram, n_tokens = inputs.finish()
            else:
                x = torch.cat(inputs)
                magnitude, gram, n_tokens = None, None, None
            del inputs
            linears = [get_module(layer, n) for n in group.linears]
            if group.needs_equal_width and not _can_fold(layer, group):
                scaled_inputs[group.prev] = _subsample_tokens(x, self.max_tokens)  # GQA v->o: nothing to fold into
                continue
            found = search_scales(x, [lin.weight for lin in linears], None, self.bits, self.group_size, self.n_grid,
                                  magnitude=input_channel_magnitude(x) if magnitude is None else magnitude,
                                  max_tokens=self.max_tokens, duo_scaling=self.duo_scaling, sym=self.sym,
                                  n_tokens=n_tokens, gram=gram)
            _fold_into(layer, group, linears, found.scales)
            # The fold divides this group's input by s: the clip search must see what the linears will see.
            # It samples at most a few thousand tokens, so only those are kept (bounds memory on big layers).
            x = _subsample_tokens(x, self.max_tokens)
            scaled_inputs[group.prev] = x / found.scales.to(device=x.device, dtype=x.dtype)
        out: dict[str, torch.Tensor] = {}
        for group in spec.groups:  # phase 2: clip and quantize
            x = scaled_inputs.pop(group.prev)
            for name in group.linears:
                linear = get_module(layer, name)
                # AutoAWQ skips clipping q/k: their errors multiply in the attention scores (quantizer.py).
                clip = self.clip and not name.endswith(("q_proj", "k_proj"))
                # Rows per einsum: 64 bounds CPU memory; a GPU has room for far more (1024: ~0.25 GB).
                rows = 1024 if linear.weight.is_cuda else 64
                ratio = (search_clip(x, linear.weight, self.bits, self.group_size, self.n_grid, self.max_shrink,
                                     sym=self.sym, out_batch=rows) if clip else 1.0)
                qw = quantize_fp16_scales(linear.weight, self.bits, self.group_size, self.sym, ratio)
                _set_weight(linear, qw.dequantize())
                _pack_into(out, name, linear, awq_gemm.pack(qw) if self.pack else None)
        return out


class SmoothQuantMethod:
    """SmoothQuant W8A8 (Xiao et al., 2022): migrate activation outliers into the weights, int8 per channel."""

    def __init__(self, alpha: float, layout: str = "lmdeploy", pack: bool = True, weight_stat: str = "mean"):
        self.alpha, self.layout, self.pack, self.weight_stat = alpha, layout, pack, weight_stat
        self.absmax: dict[str, torch.Tensor] = {}

    def begin_layer(self, index: int) -> None:
        self.absmax = {}

    def observe(self, group: LinearGroup, x: torch.Tensor) -> None:
        from pipeline.quant.smoothquant import update_act_absmax

        self.absmax[group.prev] = update_act_absmax(self.absmax.get(group.prev), x)

    def quantize(self, layer: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
        from pipeline.formats import w8a8
        from pipeline.quant.primitives import quantize_per_channel_int8
        from pipeline.quant.smoothquant import smooth_scales

        # Phase 1: every fold on the float layer (a later fold may rescale an earlier group's linear rows,
        # e.g. up_proj -> down_proj rescales up_proj), then phase 2: int8 per channel.
        for group in spec.groups:
            absmax = self.absmax.pop(group.prev)
            if group.needs_equal_width and not _can_fold(layer, group):
                continue
            linears = [get_module(layer, n) for n in group.linears]
            scales = smooth_scales(absmax, [lin.weight for lin in linears], self.alpha, self.weight_stat)
            _fold_into(layer, group, linears, scales)
        pack = w8a8.pack_lmdeploy if self.layout == "lmdeploy" else w8a8.pack_compressed_tensors
        out: dict[str, torch.Tensor] = {}
        for name in spec.linears:
            lin = get_module(layer, name)
            w_int8, scale = quantize_per_channel_int8(lin.weight)
            _set_weight(lin, w_int8.float() * scale)
            _pack_into(out, name, lin, pack(w_int8, scale) if self.pack else None)
        return out


class RTNMethod:
    """Round-to-nearest as a layer method (no statistics): the baseline for the quality bench at any bit width."""

    def __init__(self, bits: int, group_size: int, sym: bool = False, pack: bool = True):
        self.bits, self.group_size, self.sym, self.pack = bits, group_size, sym, pack

    def begin_layer(self, index: int) -> None:
        return None

    def observe(self, group: LinearGroup, x: torch.Tensor) -> None:
        return None

    def quantize(self, layer: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
        from pipeline.formats import awq_gemm

        out: dict[str, torch.Tensor] = {}
        for name in spec.linears:
            linear = get_module(layer, name)
            qw = quantize_fp16_scales(linear.weight, self.bits, self.group_size, self.sym)
            _set_weight(linear, qw.dequantize())
            _pack_into(out, name, linear, awq_gemm.pack(qw) if self.pack else None)
        return out
