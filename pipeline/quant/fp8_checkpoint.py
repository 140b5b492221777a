"""FP8 quantization of a whole checkpoint (no calibration: weight scales from the weights, activations at run time).

The checkpoint is streamed by ``pipeline/quant/rewrite.py`` (as RTN's is): a decoder layer's tensors are read, its linears
quantized and written before the next layer is read, so peak memory is about one layer plus one output shard.
The decoder layers' linears (the architecture map in ``pipeline/quant/arch.py``) are quantized unless named in
``ignore``; embeddings, norms and ``lm_head`` keep their dtype (vLLM's ``ParallelLMHead`` and lmdeploy's head are
not FP8 linears, so ``lm_head`` is always declared ignored).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.formats import fp8 as fp8_format
from pipeline.formats.checkpoint import DEFAULT_SHARD_BYTES
from pipeline.quant.fp8 import BLOCK, quantize_fp8_block, quantize_fp8_per_channel
from pipeline.quant.rewrite import Progress, plan_walk, rewrite_checkpoint

log = logging.getLogger(__name__)


def is_ignored(module: str, ignore: list[str]) -> str | None:
    """The ``ignore`` entry naming ``module`` (the full name, or a suffix after a dot), or None."""
    for entry in ignore:
        if module == entry or module.endswith("." + entry):
            return entry
    return None


def quantize_linear_fp8(w: torch.Tensor, block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_fp8, scale)`` of one weight: 128x128 blocks or one scale per output channel."""
    return quantize_fp8_block(w, BLOCK) if block else quantize_fp8_per_channel(w)


def quantize_checkpoint_fp8(
    src_dir: Path,
    out_dir: Path,
    block: bool = False,
    layout: str = "fp8",
    ignore: list[str] | None = None,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Write an FP8 model folder (``layout`` "fp8" or "compressed-tensors", see ``pipeline/formats/fp8.py``).

    Returns ``{"block", "layout", "quantized_linears", "kept_linears", "layers", "bytes", "weight_bytes",
    "source_bytes", "seconds"}``; ``progress(done, total, what)`` is called after each decoder layer.
    """
    ignore = list(ignore) if ignore is not None else ["lm_head"]
    fp8_format.scale_name(layout)  # a typed error for an unknown layout before any work
    walk = plan_walk(Path(src_dir))
    kept = sorted(m for m in walk.linears if is_ignored(m, ignore))
    used = {is_ignored(m, ignore) for m in kept}
    quantize = set(walk.linears) - set(kept)

    def warn_partial_blocks(shapes: dict[str, tuple[int, ...]]) -> None:
        odd = sorted({d for m, shape in shapes.items() if m in quantize for d in shape if d % BLOCK[0]})
        if odd:
            log.warning("FP8 blocks: widths %s are not multiples of 128; partial blocks are padded, but vLLM "
                        "refuses fused q/k/v or gate/up outputs that are not multiples of 128", odd)

    def rewrite(module: str, leaf: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if module not in quantize or leaf != "weight":
            return None
        w_fp8, scale = quantize_linear_fp8(t, block)
        return fp8_format.pack(w_fp8, scale, layout, BLOCK if block else None)

    declared = list(dict.fromkeys(["lm_head", *(e for e in ignore if e not in used), *kept]))
    stats = rewrite_checkpoint(walk, out_dir, rewrite, fp8_format.quantization_config(block, layout, declared),
                               check_shapes=warn_partial_blocks if block else None, progress=progress,
                               allow_pickle=allow_pickle, max_shard_bytes=max_shard_bytes)
    side = stats.pop("side_files")
    log.info("FP8 %s (%s layout): %d linears quantized, %d kept, %.1f MB -> %.1f MB in %.1fs (copied %s)",
             "128x128 blocks" if block else "per-channel", layout, stats["quantized_linears"], len(kept),
             stats["source_bytes"] / 1e6, stats["weight_bytes"] / 1e6, stats["seconds"],
             ", ".join(side) or "no side files")
    return {"block": block, "layout": layout, "kept_linears": len(kept), **stats}
