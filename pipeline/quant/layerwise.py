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

Peak memory is one layer, the method's statistics for it, one copy of the hidden states (updated in place) and one
calibration batch's activations, whatever the number of layers. The calibration pass stops each batch at its last
observing hook (the rest of the layer's output is not used: on Llama, down_proj's GEMM is skipped). The weight source is anything with ``keys()`` and ``get(name)`` (a checkpoint reader, or a
generator of random weights for benchmarks), so a model never has to exist in full anywhere.

Overlap (``overlap=True``, the default; ``QUANTSHIP_LAYERWISE_OVERLAP=0`` turns it off): while the device works
on layer i, a reader thread reads layer i+1's tensors into host memory (one layer ahead at most) and copies them
to the GPU on a side stream once layer i's method has quantized (its memory peak), so the copy overlaps layer i's
second forward pass without adding to the peak; a writer thread hands layer i-1's tensors to ``write`` (the copy
to host memory and the shard writes), in the same order as without overlap, so the checkpoint is byte-identical.
Peak host memory grows by one layer's tensors; GPU memory (outside the quantize peak) by one layer ahead and the
packed tensors in flight.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import threading
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

    # Optional: ``begin_walk(n_tokens)``, called once before the first layer with the number of calibration tokens
    # every layer will see (lets a method reduce its inputs batch by batch: awq_inputs.StreamingInputs).

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
    """A decoder layer and the model's rotary embedding, built from the config alone. The layer is built on the meta
    device (no memory, no random init: at 70B width the init alone would take 3.2 GiB of fp32 and a bf16 copy)
    when it has no buffers, and gets its tensors from ``_load_layer``; otherwise it is built on ``device``."""
    layer_cls, rotary_cls = classes
    with torch.device("meta"):
        layer = layer_cls(config, index)
    if any(True for _ in layer.buffers()):  # buffers are not in the checkpoint: they need a real init
        with torch.device(device):
            layer = layer_cls(config, index).to(dtype)
    with torch.device(device):
        rotary = rotary_cls(config=config)
    return layer, rotary


def _sdpa(config):
    # The causal mask comes from SDPA's is_causal when no mask is given; the eager path would need one built.
    config._attn_implementation = "sdpa"
    return config


def _read(source: WeightSource, name: str, device: torch.device) -> torch.Tensor:
    """``source.get(name)``, on ``device`` directly when the source can read there (``CheckpointReader``); a
    source without a ``device`` argument returns its tensors wherever it keeps them (moved by the caller)."""
    try:
        if "device" in inspect.signature(source.get).parameters:
            return source.get(name, device=device)
        return source.get(name)
    except KeyError:
        raise QuantizationError(f"{name} is missing from the checkpoint: its layer does not match its config.json.") from None


def _read_layer(source: WeightSource, names: list[str], prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: _read(source, prefix + name, device) for name in names}


def _load_layer(layer: nn.Module, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """The checkpoint's tensors into ``layer``: assigned (no copy when already on ``device`` in ``dtype``) if the
    layer was built on the meta device, else copied into its parameters."""
    meta = any(p.is_meta for p in layer.parameters())
    layer.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=meta)


def overlap_default() -> bool:
    return os.environ.get("QUANTSHIP_LAYERWISE_OVERLAP", "1").strip().lower() not in ("0", "false", "no", "off")


class _Prefetch:
    """Layer by layer ``{name: tensor}`` dicts, read by a background thread at most ``ahead`` layers in advance.

    The thread reads a layer into host memory as soon as there is room in the queue, but copies it to the device
    only once ``release()`` says the device has room (the walker calls it when the current layer's method has
    quantized, the layer's memory peak: GPTQ's Cholesky buffers, AWQ's searches): the copy then overlaps the
    quantized layer's forward pass instead of adding a layer's weights to the peak. On CUDA the copies run on a
    side stream; ``next()`` makes the caller's stream wait for them."""

    def __init__(self, read: Callable[[int], dict[str, torch.Tensor]], n: int, device: torch.device, ahead: int = 1,
                 to_device: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 stage: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None):
        self._read, self._n, self._device = read, n, device
        self._to_device = to_device or (lambda item: item)
        self._stage = stage or (lambda item: item)  # host-side preparation before the wait (pinning)
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._released = threading.Semaphore(1)  # the first layer may go to the device at once
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="layerwise-read", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """The device has room for the next layer's weights."""
        self._released.release()

    def _wait_release(self) -> bool:
        while not self._stop.is_set():
            if self._released.acquire(timeout=0.1):
                return True
        return False

    def _run(self) -> None:
        try:
            for i in range(self._n):
                host = self._stage(self._read(i))
                if not self._wait_release():
                    return
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        item = self._to_device(host)
                        event = torch.cuda.Event()
                        event.record(self._stream)
                else:
                    item, event = self._to_device(host), None
                del host
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread by next()
            self._queue.put((e, None))

    def next(self) -> dict[str, torch.Tensor]:
        item, event = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            for t in item.values():
                if t.is_cuda:
                    t.record_stream(current)  # allocated on the side stream, used and freed on this one
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


class _Sequential:
    """The same interface without a thread: each layer is read when it is needed."""

    def __init__(self, read: Callable[[int], dict[str, torch.Tensor]], n: int):
        self._read, self._i = read, 0

    def next(self) -> dict[str, torch.Tensor]:
        self._i += 1
        return self._read(self._i - 1)

    def release(self) -> None:
        return None

    def close(self) -> None:
        return None


class _Writer:
    """Hands batches of ``(name, tensor)`` to ``write`` in order, in a background thread (at most ``depth``
    batches queued); ``close()`` waits for the last and re-raises the first error."""

    def __init__(self, write: Callable[[str, torch.Tensor], None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="layerwise-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._error is None:
                try:
                    for name, tensor in batch:
                        self._write(name, tensor)
                except BaseException as e:  # noqa: BLE001 -- re-raised by put()/close() in the caller's thread
                    self._error = e

    def put(self, batch: list[tuple[str, torch.Tensor]]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _layer_forward(layer: nn.Module, h: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
    cos_sin = rotary(h, positions)
    out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
    return out[0] if isinstance(out, tuple) else out


class _ObservedAll(Exception):
    """Raised by the last observing hook of a calibration batch: the rest of the layer's forward is not needed."""


def _observe_layer(layer: nn.Module, rotary: nn.Module, hidden: torch.Tensor, batch_size: int, spec: ArchSpec,
                   method: LayerMethod, early_stop: bool = True) -> None:
    """Run the calibration batches through ``layer`` with hooks that hand each group's input to ``method.observe``.

    The output of this pass is not used, so each batch stops at the last hook (before down_proj on Llama: its GEMM
    and the residual add are skipped). Which hook is last is counted on the first batch, which runs whole; later
    batches stop after that many hook calls, so a module called twice in one forward is still observed twice."""
    calls = [0]
    stop_after: list[int | None] = [None]

    def hook(group: LinearGroup, x: torch.Tensor) -> None:
        method.observe(group, x.reshape(-1, x.shape[-1]))
        calls[0] += 1
        if calls[0] == stop_after[0]:
            raise _ObservedAll

    hooks = [get_module(layer, group.linears[0]).register_forward_pre_hook(lambda mod, args, g=group: hook(g, args[0]))
             for group in spec.groups]
    try:
        for i in range(0, len(hidden), batch_size):
            calls[0] = 0
            try:
                _layer_forward(layer, hidden[i : i + batch_size], rotary)
            except _ObservedAll:
                pass
            if stop_after[0] is None and early_stop:
                stop_after[0] = calls[0]
    finally:
        for h in hooks:
            h.remove()


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
    overlap: bool | None = None,
) -> dict[str, Any]:
    """Quantize every decoder layer of ``source`` with ``method``; ``write(name, tensor)`` receives the
    checkpoint's tensors (quantized linears packed by the method, everything else as read).

    ``emit_dequantized`` writes the quantized layer's float weights instead of packed tensors: a fake-quant
    checkpoint any transformers loader reads, for measuring settings no packed format holds (3-bit AWQ).
    ``overlap`` (default: on unless ``QUANTSHIP_LAYERWISE_OVERLAP=0``) reads the next layer and writes the previous
    one in background threads while the device works (module docstring); the output is the same either way."""
    device = torch.device(device)
    overlap = overlap_default() if overlap is None else overlap
    progress = progress or (lambda *a, **k: None)
    n_layers = config.num_hidden_layers
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    embed = source.get(spec.embed + ".weight").to(device=device, dtype=dtype)
    ids = calib_ids.to(device)
    # One buffer, filled batch by batch (a cat of the batches would hold the hidden states twice).
    hidden = torch.empty(*ids.shape, embed.shape[1], device=device, dtype=dtype)
    for i in range(0, len(ids), batch_size):
        hidden[i : i + batch_size] = nn.functional.embedding(ids[i : i + batch_size], embed)
    del embed
    layer_prefix = spec.layers + "."
    writer = _Writer(write) if overlap else None
    emit = writer.put if writer else (lambda batch: [write(n, t) for n, t in batch])
    # everything outside the decoder layers is written unchanged
    emit([(name, source.get(name)) for name in source.keys() if not name.startswith(layer_prefix)])

    config = _sdpa(config)
    classes = _layer_classes(config)
    if callable(getattr(method, "begin_walk", None)):
        method.begin_walk(int(calib_ids.numel()))
    with torch.device("meta"):
        layer_names = list(classes[0](config, 0).state_dict())
    timings: list[float] = []
    phases = {"observe": 0.0, "quantize": 0.0, "forward": 0.0}  # summed over layers, device work included

    def mark(phase: str, since: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        phases[phase] += now - since
        return now
    read_wait = 0.0
    if overlap:  # read to host memory in the thread, copied to the device once release() lets it (_Prefetch)
        def pin(st: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # pinned while waiting, so the copy after release() is one asynchronous transfer per tensor
            return {k: v.pin_memory() if v.device.type == "cpu" and not v.is_pinned() else v for k, v in st.items()}

        layers = _Prefetch(lambda i: _read_layer(source, layer_names, f"{spec.layers}.{i}.", torch.device("cpu")),
                           n_layers, device, to_device=lambda st: {k: v.to(device, non_blocking=True) for k, v in st.items()},
                           stage=pin if device.type == "cuda" else None)
    else:
        layers = _Sequential(lambda i: _read_layer(source, layer_names, f"{spec.layers}.{i}.", device), n_layers)
    try:
        for index in range(n_layers):
            t0 = time.perf_counter()
            layer, rotary = _decoder_layer(config, classes, index, device, dtype)
            prefix = f"{spec.layers}.{index}."
            tr = time.perf_counter()
            state = layers.next()
            read_wait += time.perf_counter() - tr
            _load_layer(layer, state, device, dtype)
            del state
            method.begin_layer(index)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the layer's copies and loads are not the calibration pass's
            tp = time.perf_counter()
            _observe_layer(layer, rotary, hidden, batch_size, spec, method)
            tp = mark("observe", tp)
            packed = method.quantize(layer, spec)
            tp = mark("quantize", tp)
            layers.release()  # past this layer's peak: the next layer's weights may go to the device
            for i in range(0, len(hidden), batch_size):  # in place: the next layer's input, through the quantized layer
                hidden[i : i + batch_size] = _layer_forward(layer, hidden[i : i + batch_size], rotary)
            mark("forward", tp)
            linear_params = set() if emit_dequantized else {f"{n}.{p}" for n in spec.linears for p in ("weight", "bias")}
            batch = [(prefix + name, tensor) for name, tensor in layer.state_dict().items() if name not in linear_params]
            batch += [(prefix + name, tensor) for name, tensor in ({} if emit_dequantized else packed).items()]
            emit(batch)
            del layer, packed, batch
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.append(time.perf_counter() - t0)
            progress(index + 1, n_layers, f"layer {index + 1}/{n_layers}")
    finally:
        layers.close()
        if writer is not None:
            tw = time.perf_counter()
            writer.close()
            write_tail = time.perf_counter() - tw
        stats = {
        "layers": n_layers,
        "calib_tokens": int(calib_ids.numel()),
        "seconds_per_layer": round(sum(timings) / max(1, len(timings)), 4),
        "quantize_seconds": round(time.perf_counter() - started, 3),
        "overlap": overlap,
        "read_wait_seconds": round(read_wait, 3),  # time the walk waited for layer weights
        # per layer, on average: the calibration pass, the method's quantize, the quantized layer's forward pass
        **{f"{k}_seconds_per_layer": round(v / max(1, len(timings)), 4) for k, v in phases.items()},
    }
    if writer is not None:
        stats["write_tail_seconds"] = round(write_tail, 3)  # writes still queued when the last layer was done
    if device.type == "cuda":
        stats["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return stats
