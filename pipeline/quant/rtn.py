"""Round-to-nearest (RTN) group-wise weight quantization of a whole checkpoint, written in the AWQ GEMM layout.

The checkpoint is streamed tensor by tensor: a decoder layer's tensors are read, its linears quantized and packed,
and the result written before the next layer is read, so peak memory is about one layer plus one output shard,
never the model. Embeddings, norms and ``lm_head`` keep their source dtype.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import ModelFolderError, QuantizationError
from pipeline.formats import awq_gemm
from pipeline.formats.checkpoint import (
    DEFAULT_SHARD_BYTES,
    CheckpointWriter,
    copy_side_files,
    open_checkpoint,
    read_config,
    write_config,
)
from pipeline.quant.arch import arch_spec
from pipeline.quant.primitives import QuantizedWeight, quantize_groupwise, quantize_with_qparams

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


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


def _num_layers(config: dict) -> int:
    n = config.get("num_hidden_layers")
    if not isinstance(n, int):
        raise ModelFolderError(
            "config.json has no integer num_hidden_layers, so the decoder layers cannot be walked. Is this a "
            "text-only causal LM folder?"
        )
    return n


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
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    awq_gemm.check_bits(bits)
    config = read_config(src_dir)
    if "quantization_config" in config:
        raise QuantizationError(
            f"{src_dir} is already quantized (config.json has quantization_config "
            f"{config['quantization_config'].get('quant_method')!r}); quantize the unquantized model instead."
        )
    spec = arch_spec((config.get("architectures") or [None])[0])
    n_layers = _num_layers(config)
    progress = progress or (lambda done, total, what: None)
    started = time.perf_counter()
    layer_re = re.compile(rf"^{re.escape(spec.layers)}\.(\d+)\.")

    with open_checkpoint(src_dir, allow_pickle=allow_pickle) as ck:
        names = ck.keys()
        by_layer: dict[int, list[str]] = {i: [] for i in range(n_layers)}
        other = []
        for name in names:
            m = layer_re.match(name)
            if m and int(m.group(1)) in by_layer:
                by_layer[int(m.group(1))].append(name)
            else:
                other.append(name)
        # Validate every width before any work (shapes come from the safetensors headers, no data read).
        shapes = {}
        for i in range(n_layers):
            for linear in spec.linears:
                key = f"{spec.layers}.{i}.{linear}.weight"
                if key not in ck:
                    raise QuantizationError(
                        f"{key} is missing from {src_dir}: the {config['architectures'][0]} layer map expects it. "
                        "The checkpoint does not match its config.json."
                    )
                shapes[key[: -len(".weight")]] = ck.shape(key)
        check_group_size(shapes, group_size)

        writer = CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes)
        source_bytes = 0
        for name in other:  # embeddings, final norm, lm_head: kept as they are
            t = ck.get(name)
            source_bytes += t.numel() * t.element_size()
            writer.add(name, t)
        quantized = 0
        for i in range(n_layers):
            prefix = f"{spec.layers}.{i}."
            linears = {f"{prefix}{linear}" for linear in spec.linears}
            for name in by_layer[i]:
                t = ck.get(name)
                source_bytes += t.numel() * t.element_size()
                module, _, leaf = name.rpartition(".")
                if module in linears and leaf == "weight":
                    qw = rtn_quantize_weight(t, bits, group_size, sym)
                    for suffix, packed in awq_gemm.pack(qw).items():
                        writer.add(f"{module}.{suffix}", packed)
                    quantized += 1
                elif module in linears and leaf == "bias":
                    writer.add(name, t.to(torch.float16))  # AutoAWQ gemm.py: bias.half()
                else:
                    writer.add(name, t)
            progress(i + 1, n_layers, f"layer {i + 1}/{n_layers}")
        files = writer.close()

    write_config(src_dir, out_dir, awq_gemm.quantization_config(bits, group_size, sym=sym))
    side = copy_side_files(src_dir, out_dir)
    weight_bytes = sum((out_dir / f).stat().st_size for f in files)
    written = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    seconds = time.perf_counter() - started
    log.info(
        "RTN w%d g%d%s: %d linears in %d layers, %.1f MB -> %.1f MB in %.1fs (copied %s)",
        bits, group_size, " sym" if sym else "", quantized, n_layers, source_bytes / 1e6, weight_bytes / 1e6, seconds,
        ", ".join(side) or "no side files",
    )
    return {
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "quantized_linears": quantized,
        "layers": n_layers,
        "bytes": written,
        "weight_bytes": weight_bytes,
        "source_bytes": source_bytes,
        "seconds": round(seconds, 3),
    }
