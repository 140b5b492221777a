"""Hugging Face model folders: read tensors lazily (one at a time, all shards), write quantized folders.

Safetensors shards are read with positioned reads (``os.preadv``) into a buffer of the tensor's own size, not
memory-mapped: a mapped shard's pages stay in the process's resident set until it is unmapped, so walking a 16 GB
checkpoint through ``safe_open`` raised host RSS by 16 GB (issue 10); here host memory holds the tensors a caller
keeps, nothing more. ``get(name, device="cuda")`` reads into pinned memory and copies to the GPU without blocking.
The header layout (8-byte little-endian length, JSON ``{name: {dtype, shape, data_offsets}}``, then the data) is
the safetensors format (huggingface/safetensors, docs "Format"); ``write_safetensors_stream`` writes the same
layout one tensor at a time, for checkpoints that never exist whole in memory.

Reading follows what transformers reads: ``model.safetensors.index.json`` (its ``weight_map``) or
``model.safetensors``; pickled ``pytorch_model.bin`` / ``*.pt`` files only when the caller allows pickles, since
unpickling runs code from the file. Writing produces ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
shards with ``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``, the layout of
transformers' ``save_pretrained``), ``config.json`` with the ``quantization_config`` block, and the tokenizer and
generation files copied from the source. Writing into a temporary folder and renaming it is the runner's job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from pipeline.errors import ModelFolderError, QuantizationError

log = logging.getLogger(__name__)

CONFIG = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
DEFAULT_SHARD_BYTES = 2 * 1024**3
# Files a loader needs besides weights and config: tokenizer, chat template, generation defaults, remote code, license.
SIDE_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "*.py",
    "LICENSE*",
)


# safetensors dtype names (huggingface/safetensors, safetensors/src/tensor.rs ``Dtype``) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    **{k: getattr(torch, v) for k, v in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, v)},
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on the JSON header


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data offset, {name: {"dtype", "shape", "data_offsets"}})`` of a safetensors file, reading its header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if n is None or n > _MAX_HEADER:
                raise ValueError("no valid header length")
            raw = f.read(n)
            if len(raw) != n:
                raise ValueError("header cut short")
        header = json.loads(raw)
        header.pop("__metadata__", None)
        for name, e in header.items():
            if e["dtype"] not in SAFETENSORS_DTYPES or len(e["data_offsets"]) != 2:
                raise ValueError(f"tensor {name}: dtype {e['dtype']!r} unknown or bad offsets")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(
            f"{path} cannot be read as safetensors ({e}). It is truncated or corrupt; fetch the model again."
        ) from e
    return 8 + n, header


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            raise ModelFolderError(f"{path} ends inside a tensor's data: it is truncated; fetch the model again.")
        got += k


def write_safetensors_stream(path: Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                             produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor: ``specs`` (name, dtype, shape) fix the header first, then
    ``produce(name)`` is called once per tensor in that order and its bytes appended, so only one tensor is ever
    in host memory. Returns the file's size in bytes."""
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in specs:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, declared {dtype} {tuple(shape)}")
            t = t.detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return 8 + len(raw) + offset


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict."""
    path = Path(model_dir) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFolderError(
            f"{model_dir} has no config.json, so it is not a Hugging Face model folder. Point model.source at the "
            "folder that holds config.json and the weights (or at a hub id)."
        ) from None
    except ValueError as e:
        raise ModelFolderError(
            f"{path} is not valid JSON ({e}); the download may be incomplete: fetch it again."
        ) from e


def read_unquantized_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a folder a quantizer may start from; raises for one that is already quantized."""
    config = read_config(model_dir)
    if "quantization_config" in config:
        raise QuantizationError(
            f"{model_dir} is already quantized (config.json has quantization_config "
            f"{config['quantization_config'].get('quant_method')!r}), and quantizing it again would stack a second "
            "rounding on the first. Point model.source at the unquantized checkpoint, or set quantize.method: none "
            "to compile, evaluate and serve this one as it is."
        )
    return config


class CheckpointReader:
    """Lazy access to every tensor of a model folder; use as a context manager (``with open_checkpoint(d) as ck``)."""

    def __init__(self, model_dir: Path, allow_pickle: bool = False):
        self.model_dir = Path(model_dir)
        self.is_safetensors = True
        self._shard_of: dict[str, str] = {}  # tensor name -> shard file name
        self._handles: dict[str, tuple[int, int, dict[str, Any]]] = {}  # shard -> (fd, data offset, header)
        self._pickle_cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()  # a prefetch thread may open a shard while the caller reads another
        self._discover(allow_pickle)

    # -- discovery ------------------------------------------------------------------------------------------------
    def _discover(self, allow_pickle: bool) -> None:
        d = self.model_dir
        if not d.is_dir():
            raise ModelFolderError(f"model folder {d} does not exist. Check model.source in the recipe.")
        if (d / SAFE_INDEX).is_file():
            self._shard_of = self._read_index(d / SAFE_INDEX)
        elif (d / SAFE_SINGLE).is_file():
            self._shard_of = {name: SAFE_SINGLE for name in self._safe_keys(SAFE_SINGLE)}
        else:
            pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
            if not pickles:
                raise ModelFolderError(
                    f"{d} holds no weights: neither {SAFE_SINGLE}, {SAFE_INDEX}, nor pickled .bin/.pt files. "
                    "The download may be incomplete or filtered; fetch the model again."
                )
            if not allow_pickle:
                raise ModelFolderError(
                    f"{d} holds only pickled weights ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}) "
                    "and no safetensors. Loading a pickle runs code from the file, so it is refused by default. If "
                    "you trust the source, set allow_pickle: true in the recipe (model section); better, convert "
                    "the model to safetensors or pick a revision that has them."
                )
            self.is_safetensors = False
            if (d / PICKLE_INDEX).is_file():
                self._shard_of = self._read_index(d / PICKLE_INDEX)
            else:
                for name in pickles:
                    for key in self._load_pickle(name):
                        self._shard_of[key] = name

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelFolderError(f"{index} is not a valid shard index ({e}); fetch the model again.") from e
        missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
        if missing:
            raise ModelFolderError(
                f"{index.name} lists shard(s) that are not in {self.model_dir}: {', '.join(missing)}. The download "
                "is incomplete; fetch the model again."
            )
        return dict(weight_map)

    def _safe_keys(self, shard: str) -> list[str]:
        return list(self._handle(shard)[2])

    def _handle(self, shard: str) -> tuple[int, int, dict[str, Any]]:
        with self._lock:
            if shard not in self._handles:
                path = self.model_dir / shard
                base, header = read_safetensors_header(path)
                self._handles[shard] = (os.open(path, os.O_RDONLY), base, header)
            return self._handles[shard]

    def _read_safe(self, shard: str, name: str, device: torch.device | None) -> torch.Tensor:
        """One tensor by a positioned read into its own buffer (pinned when it goes on to a GPU; thread-safe)."""
        fd, base, header = self._handle(shard)
        try:
            entry = header[name]
        except KeyError:
            raise ModelFolderError(
                f"{self.model_dir / shard} has no tensor {name!r} although the shard index lists it there; "
                "fetch the model again."
            ) from None
        start, end = entry["data_offsets"]
        pin = device is not None and device.type == "cuda"
        buf = torch.empty(end - start, dtype=torch.uint8, pin_memory=pin)
        if end > start:
            _pread_into(fd, memoryview(buf.numpy()), base + start, self.model_dir / shard)
        t = buf.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if device is not None and device.type != "cpu":
            t = t.to(device, non_blocking=pin)
        return t

    def _load_pickle(self, shard: str) -> dict[str, torch.Tensor]:
        if self._pickle_cache is None or self._pickle_cache[0] != shard:
            path = self.model_dir / shard
            log.warning("loading pickled weights %s (allow_pickle is on)", path)
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
            self._pickle_cache = (shard, sd)
        return self._pickle_cache[1]

    # -- access ---------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def _shard(self, name: str) -> str:
        try:
            return self._shard_of[name]
        except KeyError:
            raise ModelFolderError(
                f"tensor {name!r} is not in the checkpoint {self.model_dir}. The folder does not match its "
                "config.json (another architecture or an incomplete download)."
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, without reading its data (safetensors)."""
        shard = self._shard(name)
        if self.is_safetensors:
            return tuple(self._handle(shard)[2][name]["shape"])
        return tuple(self._load_pickle(shard)[name].shape)

    def get(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, on ``device`` (default: the CPU). A fresh tensor each call."""
        shard = self._shard(name)
        device = None if device is None else torch.device(device)
        if self.is_safetensors:
            return self._read_safe(shard, name, device)
        t = self._load_pickle(shard)[name]
        return t if device is None else t.to(device)

    def get_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor named ``prefix + "." + suffix``, keyed by ``suffix`` (e.g. one linear's tensors)."""
        head = prefix + "."
        return {k[len(head):]: self.get(k) for k in self._shard_of if k.startswith(head)}

    def close(self) -> None:
        for fd, _, _ in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._pickle_cache = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(model_dir: Path, allow_pickle: bool = False) -> CheckpointReader:
    """A lazy reader over all tensors of ``model_dir`` (safetensors; pickles only with ``allow_pickle``)."""
    return CheckpointReader(Path(model_dir), allow_pickle=allow_pickle)


class CheckpointWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes`` (one tensor may exceed it alone)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []  # temporary shard file, its tensor names
        self.total_bytes = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")  # a bug in the caller, not user input
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger tensor: safetensors refuses shared storage
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        part = f".part-{len(self._parts):05d}.safetensors"
        save_file(self._pending, str(self.out_dir / part), metadata={"format": "pt"})  # transformers needs "pt"
        self._parts.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards, write the index when there are several. Returns file names."""
        if self._pending or not self._parts:
            self._flush()
        n = len(self._parts)
        if n == 1:
            os.replace(self.out_dir / self._parts[0][0], self.out_dir / SAFE_SINGLE)
            return [SAFE_SINGLE]
        weight_map, files = {}, []
        for i, (part, names) in enumerate(self._parts, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / part, self.out_dir / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [*files, SAFE_INDEX]


def write_config(src_dir: Path, out_dir: Path, quantization_config: dict[str, Any] | None) -> dict[str, Any]:
    """Copy ``config.json`` from ``src_dir`` with ``quantization_config`` set (or removed when None)."""
    config = read_config(src_dir)
    if quantization_config is None:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = quantization_config
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def copy_side_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, chat template, generation config, remote code and license files. Returns their names."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    copied = set()
    for pattern in SIDE_FILE_PATTERNS:
        for p in src_dir.glob(pattern):
            if p.is_file() and p.name not in copied and p.name != CONFIG:
                shutil.copy2(p, out_dir / p.name)
                copied.add(p.name)
    return sorted(copied)
