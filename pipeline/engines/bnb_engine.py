"""The bitsandbytes engine: NF4 and LLM.int8 checkpoints quantized, serialized and loaded by transformers itself.

bitsandbytes is its own quantizer: the honest way to produce one of its checkpoints is its own path, so the
quantize step runs the runtime. ``quantize_checkpoint_bnb`` loads the source with a ``BitsAndBytesConfig`` (every
``nn.Linear`` but the output head becomes ``bnb.nn.Linear4bit`` / ``Linear8bitLt``, quantized as its weight is
materialized) and calls ``save_pretrained``; ``load_bnb_model`` reads such a folder back through transformers. What
the files hold is in ``pipeline.formats.bnb``. This lives with the runtimes, not in ``pipeline/quant/`` (torch-only
math, no vendor imports: tests/test_layout.py), because every step here is a call into bitsandbytes.

bitsandbytes >= 0.46 runs all of this on the CPU: NF4 quantize/dequantize/matmul and the int8 matmul through its
PyTorch "default" backend (plus native CPU kernels where the wheel has them), so the checkpoint written here is the
same one a GPU would write. The CPU matmul kernel it picks depends on the CPU: with AVX512-BF16, bitsandbytes 0.50
repacks each ``Linear4bit`` at its first eval forward and multiplies in bfloat16 whatever ``bnb_4bit_compute_dtype``
says (bitsandbytes/backends/cpu/ops.py, ``gemv_4bit``); tests/test_bnb.py says what that costs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Literal

from pipeline.engines.transformers_engine import load_tokenizer
from pipeline.errors import ModelFolderError, QuantizationError, TargetUnavailable
from pipeline.formats.bnb import QUANT_METHOD, is_bnb_checkpoint
from pipeline.formats.checkpoint import copy_side_files, open_checkpoint, read_config, read_unquantized_config

log = logging.getLogger(__name__)

Mode = Literal["nf4", "int8"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
Progress = Callable[..., None]

INSTALL_HINT = "pip install 'quantship[bnb]'  (bitsandbytes and accelerate; pip install --no-deps them to keep your torch)"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def bnb_config(mode: Mode, compute_dtype: ComputeDtype = "float32", double_quant: bool = False):
    """The ``transformers.BitsAndBytesConfig`` for a mode. ``compute_dtype`` is what NF4 matmuls run in."""
    import torch
    from transformers import BitsAndBytesConfig

    if compute_dtype not in ("float32", "bfloat16", "float16"):
        raise QuantizationError(
            f"bnb_4bit compute dtype {compute_dtype!r} is not one of float32, bfloat16, float16; pick one of those "
            "(float32 on a CPU, bfloat16 or float16 on a GPU)."
        )
    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
            bnb_4bit_use_double_quant=double_quant,
        )
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # threshold 6.0: LLM.int8's outlier decomposition
    raise QuantizationError(f"bitsandbytes mode {mode!r} is not one of nf4, int8. Use method bnb-nf4 or bnb-int8.")


def quantize_checkpoint_bnb(
    src_dir: Path,
    out_dir: Path,
    mode: Mode,
    compute_dtype: ComputeDtype = "float32",
    device: str = "auto",
    double_quant: bool = False,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Quantize every linear of ``src_dir`` but the output head with bitsandbytes and write the folder transformers
    would write (``save_pretrained``) to ``out_dir``, with the source's tokenizer and generation files.

    ``device``: ``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda``: where transformers materializes and
    quantizes the weights; the whole quantized model is held there at once. Returns ``{"quant_method", "mode",
    "quantized_linears", "bytes" (weight files written), "source_bytes", "seconds", "device", "compute_dtype",
    "double_quant", "bitsandbytes"}``. ``progress(done, total, what)`` is called before and after each step.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    progress = progress or (lambda done, total=None, what="": None)
    bnb = _require_bnb(QuantizationError)
    read_unquantized_config(src_dir)  # refuses a folder that is already quantized
    dev = _resolve_device(device, bnb, QuantizationError)
    open_checkpoint(src_dir, allow_pickle=allow_pickle).close()  # our error for a pickle-only or empty folder
    qconfig = bnb_config(mode, compute_dtype, double_quant)

    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    progress(0, 2, f"bitsandbytes {mode}: load and quantize")
    try:
        # dtype="auto" keeps the source dtype for what stays unquantized (embeddings, norms, lm_head), as a
        # checkpoint published from a plain from_pretrained(..., quantization_config=...) has it.
        model = AutoModelForCausalLM.from_pretrained(
            src_dir,
            quantization_config=qconfig,
            device_map={"": str(dev)},
            dtype="auto",
            use_safetensors=True if not allow_pickle else None,
            trust_remote_code=trust_remote_code,
        )
    except (ImportError, RuntimeError, NotImplementedError) as e:
        raise QuantizationError(
            f"transformers could not quantize {src_dir} with bitsandbytes {bnb.__version__} ({mode}) on {dev}: {e}. "
            f"If a package is missing or too old, run {INSTALL_HINT}; if the device is the problem, set "
            "quantize.device to the other device."
        ) from e
    n_quantized = sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    if n_quantized == 0:
        raise QuantizationError(
            f"no linear layer of {src_dir} ({type(model).__name__}) was replaced by a bitsandbytes layer, so the "
            "checkpoint would not be quantized. The architecture builds its projections from modules other than "
            "torch.nn.Linear; use method rtn/awq/gptq, or a model whose projections are nn.Linear."
        )
    progress(1, 2, f"bitsandbytes {mode}: save")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors, bnb tensors from Linear4bit/Linear8bitLt._save_to_state_dict
    copy_side_files(src_dir, out_dir)
    del model
    seconds = time.perf_counter() - started
    progress(2, 2, f"bitsandbytes {mode}: done")
    stats = {
        "quant_method": QUANT_METHOD,
        "mode": mode,
        "quantized_linears": n_quantized,
        "bytes": _weight_bytes(out_dir),
        "source_bytes": _weight_bytes(src_dir),
        "seconds": round(seconds, 3),
        "device": str(dev),
        "compute_dtype": compute_dtype if mode == "nf4" else None,
        "double_quant": double_quant if mode == "nf4" else None,
        "bitsandbytes": bnb.__version__,
    }
    log.info("bitsandbytes %s: %d linears quantized on %s in %.1fs, %d -> %d bytes", mode, n_quantized, dev,
             seconds, stats["source_bytes"], stats["bytes"])
    return stats


def load_bnb_model(model_dir: Path, device: str = "cpu", dtype=None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` for a bitsandbytes folder, loaded by transformers, in eval mode on ``device``.

    ``dtype`` (default float32) is what the unquantized tensors (embeddings, norms, lm_head, biases) are cast to;
    the quantized weights keep their own storage and scales, and NF4 matmuls run in the folder's
    ``bnb_4bit_compute_dtype``. ``tokenizer`` is None (with a warning) when the folder ships none.
    """
    import torch

    model_dir = Path(model_dir)
    dtype = torch.float32 if dtype is None else dtype
    qconfig = read_config(model_dir).get("quantization_config")
    if not is_bnb_checkpoint(qconfig):
        raise ModelFolderError(
            f"{model_dir} is not a bitsandbytes checkpoint (its config.json quantization_config is "
            f"{(qconfig or {}).get('quant_method')!r}, not {QUANT_METHOD!r}); load it with the engine for its format."
        )
    bnb = _require_bnb(TargetUnavailable)
    dev = _resolve_device(str(device), bnb, TargetUnavailable)
    from transformers import AutoModelForCausalLM

    open_checkpoint(model_dir).close()  # our error for a folder without safetensors
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map={"": str(dev)}, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    # transformers leaves a pre-quantized checkpoint's float tensors in their stored dtype (its quantizer's
    # get_new_dtype returns None for tensors a bnb deserializer may claim), and refuses model.to(dtype) on a bnb
    # model, so the plain parameters are cast one by one. Packed weights are uint8/int8 and are left alone.
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    _once_per_message(logging.getLogger("bitsandbytes.autograd._functions"))
    kinds = {"Linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
             "Linear8bitLt": sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())}
    model.quantization_info = {"quant_method": QUANT_METHOD, "kernels": {k: v for k, v in kinds.items() if v},
                               **qconfig}
    log.info("loaded %s (bitsandbytes) on %s: %s", model_dir.name, dev, model.quantization_info["kernels"])
    return model.eval(), load_tokenizer(model_dir, trust_remote_code)


def _require_bnb(error: type[Exception]):
    """``bitsandbytes`` (and ``accelerate``, which transformers' bnb quantizer demands), or ``error`` saying how to
    install them."""
    missing = []
    for name in ("bitsandbytes", "accelerate"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise error(
            f"bitsandbytes checkpoints need the {' and '.join(missing)} package(s), which are not installed. "
            f"Install them with {INSTALL_HINT}."
        )
    import bitsandbytes
    from transformers.utils import is_accelerate_available, is_bitsandbytes_available

    if not (is_bitsandbytes_available() and is_accelerate_available()):
        import accelerate
        from transformers.utils.import_utils import ACCELERATE_MIN_VERSION, BITSANDBYTES_MIN_VERSION

        raise error(
            f"this transformers needs bitsandbytes >= {BITSANDBYTES_MIN_VERSION} and accelerate >= "
            f"{ACCELERATE_MIN_VERSION}; installed: bitsandbytes {bitsandbytes.__version__}, accelerate "
            f"{accelerate.__version__}. Upgrade them with {INSTALL_HINT}."
        )
    return bitsandbytes


def _resolve_device(device: str, bnb, error: type[Exception]):
    """``auto`` -> cuda if present else cpu; a device bitsandbytes has no backend for, or an absent GPU, -> ``error``."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(
            f"device {device!r} was asked for bitsandbytes but this machine has no CUDA device (torch "
            f"{torch.__version__}). Use device auto or cpu: bitsandbytes {bnb.__version__} runs NF4 and int8 on the CPU."
        )
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})
    if dev.type not in supported:
        raise error(
            f"bitsandbytes {bnb.__version__} has no backend for device {dev.type!r} (it supports "
            f"{', '.join(sorted(supported))}). Use one of those devices, or another quantization method."
        )
    # device_map wants an explicit index for an accelerator ("cuda:0"), a bare "cpu" for the CPU
    return dev if dev.type == "cpu" or dev.index is not None else torch.device(dev.type, 0)


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


class _OncePerMessage(logging.Filter):
    """Let each distinct message through once: LLM.int8 warns "inputs will be cast to float16" on every forward."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _once_per_message(logger: logging.Logger) -> None:
    if not any(isinstance(f, _OncePerMessage) for f in logger.filters):
        logger.addFilter(_OncePerMessage())


__all__ = ["bnb_config", "load_bnb_model", "quantize_checkpoint_bnb"]
