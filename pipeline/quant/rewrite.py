"""Rewrite a checkpoint tensor by tensor, one decoder layer at a time: the streaming walk that the methods
quantizing each weight on its own (RTN, FP8) share. Shards are read lazily, so host memory holds one tensor at
a time plus the writer's current shard; the calibrated methods walk layers in ``layerwise.py`` instead.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.errors import ModelFolderError, QuantizationError
from pipeline.formats.checkpoint import (
    DEFAULT_SHARD_BYTES,
    CheckpointWriter,
    copy_side_files,
    open_checkpoint,
    read_unquantized_config,
    write_config,
)
from pipeline.quant.arch import ArchSpec, arch_spec

Progress = Callable[[int, int, str], None]
# (module, leaf, tensor) -> {suffix: tensor} written under ``module.``, or None to keep the tensor as it is
Rewrite = Callable[[str, str, torch.Tensor], "dict[str, torch.Tensor] | None"]


@dataclass(frozen=True)
class Walk:
    """What a rewrite knows before it reads any tensor data."""

    src_dir: Path
    config: dict[str, Any]
    spec: ArchSpec
    n_layers: int
    linears: tuple[str, ...]  # every decoder linear's module name, layer by layer in the layer map's order


def plan_walk(src_dir: Path) -> Walk:
    """The walk over an unquantized model folder; raises for a quantized folder or an unknown layout."""
    src_dir = Path(src_dir)
    config = read_unquantized_config(src_dir)
    spec = arch_spec((config.get("architectures") or [None])[0])
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int):
        raise ModelFolderError(
            "config.json has no integer num_hidden_layers, so the decoder layers cannot be walked. Is this a "
            "text-only causal LM folder?"
        )
    linears = tuple(f"{spec.layers}.{i}.{name}" for i in range(n_layers) for name in spec.linears)
    return Walk(src_dir, config, spec, n_layers, linears)


def rewrite_checkpoint(
    walk: Walk,
    out_dir: Path,
    rewrite: Rewrite,
    quantization_config: dict[str, Any],
    *,
    check_shapes: Callable[[dict[str, tuple[int, ...]]], None] | None = None,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Write ``out_dir``: every tensor of ``walk.src_dir`` through ``rewrite``, decoder layer by decoder layer,
    then ``config.json`` with ``quantization_config`` and the side files. ``check_shapes`` sees every decoder
    linear's weight shape (from the headers, no data read) before any work.

    Returns ``{"quantized_linears", "layers", "bytes" (every file written), "weight_bytes" (the safetensors
    files), "source_bytes" (tensor bytes read), "side_files", "seconds"}``.
    """
    out_dir = Path(out_dir)
    progress = progress or (lambda done, total, what: None)
    started = time.perf_counter()
    layer_re = re.compile(rf"^{re.escape(walk.spec.layers)}\.(\d+)\.")
    with open_checkpoint(walk.src_dir, allow_pickle=allow_pickle) as ck:
        linears = set(walk.linears)
        missing = [m for m in walk.linears if f"{m}.weight" not in ck]
        if missing:
            raise QuantizationError(
                f"{missing[0]}.weight{' and others' if len(missing) > 1 else ''} missing from {walk.src_dir}: the "
                f"{walk.config['architectures'][0]} layer map expects it. The checkpoint does not match its "
                "config.json."
            )
        if check_shapes is not None:
            check_shapes({m: ck.shape(f"{m}.weight") for m in walk.linears})
        by_layer: dict[int, list[str]] = {i: [] for i in range(walk.n_layers)}
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
        for i in range(walk.n_layers):
            for name in by_layer[i]:
                t = ck.get(name)
                source_bytes += t.numel() * t.element_size()
                module, _, leaf = name.rpartition(".")
                written = rewrite(module, leaf, t) if module in linears else None
                if written is None:
                    writer.add(name, t)
                    continue
                for suffix, packed in written.items():
                    writer.add(f"{module}.{suffix}", packed)
                quantized += leaf == "weight"
            progress(i + 1, walk.n_layers, f"layer {i + 1}/{walk.n_layers}")
        files = writer.close()

    write_config(walk.src_dir, out_dir, quantization_config)
    side = copy_side_files(walk.src_dir, out_dir)
    return {
        "quantized_linears": quantized,
        "layers": walk.n_layers,
        "bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
        "weight_bytes": sum((out_dir / f).stat().st_size for f in files),
        "source_bytes": source_bytes,
        "side_files": side,
        "seconds": round(time.perf_counter() - started, 3),
    }
