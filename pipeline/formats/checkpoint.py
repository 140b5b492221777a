"""Hugging Face model folders: read tensors lazily (one at a time, all shards), write quantized folders.

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
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ModelFolderError

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


class CheckpointReader:
    """Lazy access to every tensor of a model folder; use as a context manager (``with open_checkpoint(d) as ck``)."""

    def __init__(self, model_dir: Path, allow_pickle: bool = False):
        self.model_dir = Path(model_dir)
        self.is_safetensors = True
        self._shard_of: dict[str, str] = {}  # tensor name -> shard file name
        self._handles: dict[str, Any] = {}
        self._pickle_cache: tuple[str, dict[str, torch.Tensor]] | None = None
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
        return list(self._handle(shard).keys())

    def _handle(self, shard: str):
        if shard not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[shard] = safe_open(str(self.model_dir / shard), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own SafetensorError for a truncated or corrupt header
                raise ModelFolderError(
                    f"{self.model_dir / shard} cannot be read as safetensors ({e}). It is truncated or corrupt; "
                    "fetch the model again."
                ) from e
        return self._handles[shard]

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
            return tuple(self._handle(shard).get_slice(name).get_shape())
        return tuple(self._load_pickle(shard)[name].shape)

    def get(self, name: str) -> torch.Tensor:
        shard = self._shard(name)
        if self.is_safetensors:
            return self._handle(shard).get_tensor(name)
        return self._load_pickle(shard)[name]

    def get_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor named ``prefix + "." + suffix``, keyed by ``suffix`` (e.g. one linear's tensors)."""
        head = prefix + "."
        return {k[len(head):]: self.get(k) for k in self._shard_of if k.startswith(head)}

    def close(self) -> None:
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
