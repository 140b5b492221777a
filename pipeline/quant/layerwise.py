"""Layer-by-layer calibrated quantization: one decoder layer and its calibration activations at a time.

The walk (the "sequential" pipeline of GPTQ, AutoAWQ and llm-compressor, written here because each of them
ties it to its own model wrappers):

1. embed the calibration tokens -> hidden states [samples, seq_len, hidden] on the device;
2. for each decoder layer: materialise only that layer from the weight source, run the hidden states through
   it with hooks that hand each linear group's input to the method (``observe``), let the method quantize the
   layer (``quantize``: it folds scales, replaces the layer's weights by their dequantized values and returns
   the tensors to write), run the hidden states through the *quantized* layer to get the next layer's input
   (so later layers calibrate against the errors of earlier ones), write the layer, free it;
3. copy the embeddings, final norm and lm_head unchanged.

Peak memory is one layer, the method's statistics for it, and two copies of the hidden states, whatever the
number of layers. The weight source is anything with ``keys()`` and ``get(name)`` (a checkpoint reader, or a
generator of random weights for benchmarks), so a model never has to exist in full anywhere.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

import torch
from torch import nn

from pipeline.errors import QuantizationError
from pipeline.quant.arch import ArchSpec, LinearGroup

log = logging.getLogger(__name__)


class WeightSource(Protocol):
    def keys(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class LayerMethod(Protocol):
    """A calibrated method, seen by the walker."""

    def begin_layer(self, index: int) -> None: ...

    def observe(self, group: LinearGroup, x: torch.Tensor) -> None:
        """The input [tokens, in] of ``group``'s linears for one calibration batch."""

    def quantize(self, layer: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
        """Quantize ``layer`` in place (weights replaced by what the checkpoint will compute, norms folded) and
        return the checkpoint tensors of its linears, named relative to the layer (``self_attn.q_proj.qweight``)."""


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _layer_classes(config) -> tuple[type, type]:
    """The decoder-layer and rotary-embedding classes of the config's architecture (from a meta skeleton)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return type(skeleton.model.layers[0]), type(skeleton.model.rotary_emb)


def _decoder_layer(config, classes, index: int, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """A real (not meta) decoder layer and the model's rotary embedding, built from the config alone."""
    layer_cls, rotary_cls = classes
    with torch.device(device):
        layer = layer_cls(config, index).to(dtype)
        rotary = rotary_cls(config=config)
    return layer, rotary


def _sdpa(config):
    # The causal mask comes from SDPA's is_causal when no mask is given; the eager path would need one built.
    config._attn_implementation = "sdpa"
    return config


def _load_layer(layer: nn.Module, source: WeightSource, prefix: str, dtype: torch.dtype) -> None:
    state = {}
    for name, param in layer.state_dict().items():
        full = prefix + name
        try:
            state[name] = source.get(full).to(device=param.device, dtype=dtype)
        except KeyError:
            raise QuantizationError(
                f"{full} is missing from the checkpoint: its layer does not match its config.json."
            ) from None
    layer.load_state_dict(state, strict=True)


def _layer_forward(layer: nn.Module, h: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
    cos_sin = rotary(h, positions)
    out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_layerwise(
    source: WeightSource,
    config,
    spec: ArchSpec,
    calib_ids: torch.Tensor,
    method: LayerMethod,
    write: Callable[[str, torch.Tensor], None],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: Callable[..., None] | None = None,
    emit_dequantized: bool = False,
) -> dict[str, Any]:
    """Quantize every decoder layer of ``source`` with ``method``; ``write(name, tensor)`` receives the
    checkpoint's tensors (quantized linears packed by the method, everything else as read).

    ``emit_dequantized`` writes the quantized layer's float weights instead of packed tensors: a fake-quant
    checkpoint any transformers loader reads, for measuring settings no packed format holds (3-bit AWQ)."""
    device = torch.device(device)
    progress = progress or (lambda *a, **k: None)
    n_layers = config.num_hidden_layers
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    embed = source.get(spec.embed + ".weight").to(device=device, dtype=dtype)
    ids = calib_ids.to(device)
    hidden = torch.cat([nn.functional.embedding(ids[i : i + batch_size], embed) for i in range(0, len(ids), batch_size)])
    del embed
    layer_prefix = spec.layers + "."
    for name in source.keys():  # everything outside the decoder layers is written unchanged
        if not name.startswith(layer_prefix):
            write(name, source.get(name))

    config = _sdpa(config)
    classes = _layer_classes(config)
    timings: list[float] = []
    for index in range(n_layers):
        t0 = time.perf_counter()
        layer, rotary = _decoder_layer(config, classes, index, device, dtype)
        prefix = f"{spec.layers}.{index}."
        _load_layer(layer, source, prefix, dtype)
        method.begin_layer(index)
        hooks = [
            get_module(layer, group.linears[0]).register_forward_pre_hook(
                lambda mod, args, g=group: method.observe(g, args[0].reshape(-1, args[0].shape[-1]))
            )
            for group in spec.groups
        ]
        for i in range(0, len(hidden), batch_size):
            _layer_forward(layer, hidden[i : i + batch_size], rotary)
        for hook in hooks:
            hook.remove()
        packed = method.quantize(layer, spec)
        for i in range(0, len(hidden), batch_size):  # in place: the next layer's input, through the quantized layer
            hidden[i : i + batch_size] = _layer_forward(layer, hidden[i : i + batch_size], rotary)
        linear_params = set() if emit_dequantized else {f"{n}.{p}" for n in spec.linears for p in ("weight", "bias")}
        for name, tensor in layer.state_dict().items():
            if name not in linear_params:
                write(prefix + name, tensor)
        for name, tensor in ({} if emit_dequantized else packed).items():
            write(prefix + name, tensor)
        del layer, packed
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - t0)
        progress(index + 1, n_layers, f"layer {index + 1}/{n_layers}")
    stats = {
        "layers": n_layers,
        "calib_tokens": int(calib_ids.numel()),
        "seconds_per_layer": round(sum(timings) / max(1, len(timings)), 4),
        "quantize_seconds": round(time.perf_counter() - started, 3),
    }
    if device.type == "cuda":
        stats["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return stats
