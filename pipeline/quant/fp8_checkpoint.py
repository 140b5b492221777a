"""FP8 quantization of a whole checkpoint (no calibration: weight scales from the weights, activations at run time).

The checkpoint is streamed as in ``pipeline/quant/rtn.py``: a decoder layer's tensors are read, its linears
quantized and written before the next layer is read, so peak memory is about one layer plus one output shard.
The decoder layers' linears (the architecture map in ``pipeline/quant/arch.py``) are quantized unless named in
``ignore``; embeddings, norms and ``lm_head`` keep their dtype (vLLM's ``ParallelLMHead`` and lmdeploy's head are
not FP8 linears, so ``lm_head`` is always declared ignored).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import QuantizationError
from pipeline.formats import fp8 as fp8_format
from pipeline.formats.checkpoint import (
    DEFAULT_SHARD_BYTES,
    CheckpointWriter,
    copy_side_files,
    open_checkpoint,
    read_config,
    write_config,
)
from pipeline.quant.arch import arch_spec
from pipeline.quant.fp8 import BLOCK, quantize_fp8_block, quantize_fp8_per_channel

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


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
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    ignore = list(ignore) if ignore is not None else ["lm_head"]
    fp8_format.scale_name(layout)  # a typed error for an unknown layout before any work
    config = read_config(src_dir)
    if "quantization_config" in config:
        raise QuantizationError(
            f"{src_dir} is already quantized (config.json has quantization_config "
            f"{config['quantization_config'].get('quant_method')!r}); quantize the unquantized model instead."
        )
    spec = arch_spec((config.get("architectures") or [None])[0])
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int):
        raise QuantizationError(f"{src_dir}/config.json has no integer num_hidden_layers; is it a causal LM folder?")
    progress = progress or (lambda done, total, what: None)
    started = time.perf_counter()
    layer_re = re.compile(rf"^{re.escape(spec.layers)}\.(\d+)\.")
    linears = {f"{spec.layers}.{i}.{name}" for i in range(n_layers) for name in spec.linears}
    kept = sorted(m for m in linears if is_ignored(m, ignore))
    used = {is_ignored(m, ignore) for m in kept}

    with open_checkpoint(src_dir, allow_pickle=allow_pickle) as ck:
        missing = sorted(m for m in linears if f"{m}.weight" not in ck)
        if missing:
            raise QuantizationError(
                f"{src_dir} lacks {missing[0]}.weight{' and others' if len(missing) > 1 else ''}: the "
                f"{config['architectures'][0]} layer map expects it. The checkpoint does not match its config.json."
            )
        if block:
            odd = sorted({d for m in linears if m not in kept for d in ck.shape(f"{m}.weight") if d % BLOCK[0]})
            if odd:
                log.warning("FP8 blocks: widths %s are not multiples of 128; partial blocks are padded, but vLLM "
                            "refuses fused q/k/v or gate/up outputs that are not multiples of 128", odd)
        by_layer: dict[int, list[str]] = {i: [] for i in range(n_layers)}
        other = []
        for name in ck.keys():
            m = layer_re.match(name)
            (by_layer[int(m.group(1))] if m and int(m.group(1)) in by_layer else other).append(name)

        writer = CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes)
        source_bytes = quantized = 0
        for name in other:  # embeddings, final norm, lm_head: kept as they are
            t = ck.get(name)
            source_bytes += t.numel() * t.element_size()
            writer.add(name, t)
        for i in range(n_layers):
            for name in by_layer[i]:
                t = ck.get(name)
                source_bytes += t.numel() * t.element_size()
                module, _, leaf = name.rpartition(".")
                if module in linears and module not in kept and leaf == "weight":
                    w_fp8, scale = quantize_linear_fp8(t, block)
                    for suffix, packed in fp8_format.pack(w_fp8, scale, layout, BLOCK if block else None).items():
                        writer.add(f"{module}.{suffix}", packed)
                    quantized += 1
                else:
                    writer.add(name, t)
            progress(i + 1, n_layers, f"layer {i + 1}/{n_layers}")
        files = writer.close()

    declared = list(dict.fromkeys(["lm_head", *(e for e in ignore if e not in used), *kept]))
    write_config(src_dir, out_dir, fp8_format.quantization_config(block, layout, declared))
    side = copy_side_files(src_dir, out_dir)
    weight_bytes = sum((out_dir / f).stat().st_size for f in files)
    written = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    seconds = time.perf_counter() - started
    log.info("FP8 %s (%s layout): %d linears quantized, %d kept, %.1f MB -> %.1f MB in %.1fs (copied %s)",
             "128x128 blocks" if block else "per-channel", layout, quantized, len(kept), source_bytes / 1e6,
             weight_bytes / 1e6, seconds, ", ".join(side) or "no side files")
    return {"block": block, "layout": layout, "quantized_linears": quantized, "kept_linears": len(kept),
            "layers": n_layers, "bytes": written, "weight_bytes": weight_bytes, "source_bytes": source_bytes,
            "seconds": round(seconds, 3)}
