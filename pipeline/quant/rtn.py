"""Round-to-nearest (RTN) group-wise weight quantization of a whole checkpoint, written in the AWQ GEMM layout.

The checkpoint is streamed tensor by tensor: a decoder layer's tensors are read, its linears quantized and packed,
and the result written before the next layer is read, so peak memory is about one layer plus one output shard,
never the model. Embeddings, norms and ``lm_head`` keep their source dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.errors import QuantizationError
from pipeline.formats import awq_gemm
from pipeline.formats.checkpoint import DEFAULT_SHARD_BYTES
from pipeline.quant.primitives import QuantizedWeight, quantize_groupwise, quantize_with_qparams
from pipeline.quant.rewrite import Progress, plan_walk, rewrite_checkpoint

log = logging.getLogger(__name__)


def rtn_quantize_weight(w: torch.Tensor, bits: int, group_size: int, sym: bool = False, clip_ratio=1.0) -> QuantizedWeight:
    """RTN of one weight [out, in], with the integer codes computed against the fp16-rounded scales.

    AWQ stores scales in fp16, so the codes are chosen for the scale the loader will actually multiply by: AutoAWQ
    does the same (``awq/modules/linear/gemm.py``, ``from_linear``: ``scales.half()`` before ``round(w / scales)``).
    """
    qw = quantize_groupwise(w, bits, group_size, sym, clip_ratio)
    # Smallest positive fp16 (a subnormal): a scale that rounds to 0 would divide by zero below.
    scales = qw.scales.to(torch.float16).float().clamp(min=2.0**-24)
    out_features, in_features = w.shape
    g = w.float().reshape(out_features, in_features // group_size, group_size)
    w_int = quantize_with_qparams(g, scales.unsqueeze(-1), qw.zeros.unsqueeze(-1), bits).reshape(w.shape)
    return QuantizedWeight(w_int=w_int, scales=scales, zeros=qw.zeros, bits=bits, group_size=group_size)


def check_group_size(shapes: dict[str, tuple[int, ...]], group_size: int) -> None:
    """Raise a QuantizationError naming every linear whose widths the AWQ GEMM layout cannot hold."""
    if group_size <= 0:
        raise QuantizationError(f"group size must be a positive integer, got {group_size}.")
    bad = []
    for name, shape in shapes.items():
        out_features, in_features = shape
        if in_features % group_size:
            bad.append(f"{name} (in {in_features} not divisible by group size {group_size})")
        elif out_features % awq_gemm.PACK:
            bad.append(f"{name} (out {out_features} not a multiple of 8)")
    if bad:
        widths = sorted({s[1] for s in shapes.values()})
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        raise QuantizationError(
            f"group size {group_size} does not fit {len(bad)} linear(s): {'; '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}. Each group spans consecutive input columns, so the group size must "
            f"divide every linear's input width (here {', '.join(map(str, widths))}) and AWQ packs 8 outputs per "
            f"int32. Group sizes that fit: {', '.join(map(str, fits)) or 'none of 32/64/128/256'}."
        )


def quantize_checkpoint_rtn(
    src_dir: Path,
    out_dir: Path,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Quantize every decoder linear of ``src_dir`` with RTN and write an AWQ GEMM model folder to ``out_dir``.

    Returns ``{"bits", "group_size", "sym", "quantized_linears", "layers", "bytes" (every file written),
    "weight_bytes" (the safetensors files), "source_bytes" (tensor bytes read), "seconds"}``.
    ``progress(done, total, what)`` is called after each decoder layer.
    """
    awq_gemm.check_bits(bits)
    walk = plan_walk(Path(src_dir))

    def rewrite(module: str, leaf: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if leaf == "weight":
            return awq_gemm.pack(rtn_quantize_weight(t, bits, group_size, sym))
        if leaf == "bias":
            return {"bias": t.to(torch.float16)}  # AutoAWQ gemm.py: bias.half()
        return None

    # Every width is validated before any work (shapes come from the safetensors headers, no data read).
    stats = rewrite_checkpoint(walk, out_dir, rewrite, awq_gemm.quantization_config(bits, group_size, sym=sym),
                               check_shapes=lambda shapes: check_group_size(shapes, group_size), progress=progress,
                               allow_pickle=allow_pickle, max_shard_bytes=max_shard_bytes)
    side = stats.pop("side_files")
    log.info(
        "RTN w%d g%d%s: %d linears in %d layers, %.1f MB -> %.1f MB in %.1fs (copied %s)",
        bits, group_size, " sym" if sym else "", stats["quantized_linears"], stats["layers"],
        stats["source_bytes"] / 1e6, stats["weight_bytes"] / 1e6, stats["seconds"], ", ".join(side) or "no side files",
    )
    return {"bits": bits, "group_size": group_size, "sym": sym, **stats}
