"""The embedded engine: a Hugging Face model folder (unquantized, or quantized in a format of ``RUNTIME_FORMATS``)
loaded into PyTorch through transformers, with the quantized linears running on PyTorch's packed int4 kernels.

A quantized folder is loaded without transformers' own quantizers (they would demand autoawq / gptqmodel): the
model skeleton is built from its config with ``quantization_config`` removed and its parameters on the meta device,
each quantized linear is replaced by the runtime module its format builds, and every other tensor is read from the
checkpoint into place. Buffers are built for real (see ``_parameters_on_meta``), so rotary ``inv_freq`` is correct.
An unquantized safetensors folder is loaded the same way (``_load_plain``): tensor by tensor from the shards straight
to the device (pinned memory on a GPU), never the whole model in host memory first (issue 10: an 8B model's load
held 2x the model in host RAM through ``from_pretrained`` + ``.to(device)``); quantized tensors are read onto the
device before they are unpacked, so the unpacking runs there.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ModelFolderError, QuantizationError
from pipeline.formats.bnb import is_bnb_checkpoint
from pipeline.formats.checkpoint import open_checkpoint, read_config

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_model(
    model_dir: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    int4_kernel: str = "auto",
):
    """``(model, tokenizer)`` for a model folder, in eval mode on ``device``. ``tokenizer`` is None (with a warning)
    when the folder has no tokenizer files. Non-quantized tensors are cast to ``dtype``.

    ``int4_kernel`` ("auto", "cpu-int4pack", "cuda-int4pack", "dequantize") picks how 4-bit linears run; "auto"
    uses PyTorch's packed int4 kernel on CUDA and on CPU in bfloat16, and exact dequantize-on-the-fly for CPU
    float32 (where that kernel is scalar and slow): see ``pipeline.engines.qlinear``."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    quant_config = config.get("quantization_config")
    if is_bnb_checkpoint(quant_config):
        from pipeline.engines.bnb_engine import load_bnb_model  # bitsandbytes' own modules, as transformers loads them

        return load_bnb_model(model_dir, device, dtype, trust_remote_code)
    if quant_config:
        model = _load_quantized(
            model_dir, quant_config, torch.device(device), dtype, allow_pickle, trust_remote_code, int4_kernel
        )
    else:
        model = _load_plain(model_dir, torch.device(device), dtype, allow_pickle, trust_remote_code)
    return model.eval(), load_tokenizer(model_dir, trust_remote_code)


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, or None when it ships none."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        log.warning("%s has no tokenizer files; returning the model without a tokenizer", model_dir)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelFolderError(
            f"the tokenizer in {model_dir} cannot be loaded ({e}). Copy the tokenizer files from the source model, "
            "or set trust_remote_code if it uses custom code."
        ) from e


def _load_plain(model_dir: Path, device: torch.device, dtype, allow_pickle: bool, trust_remote_code: bool):
    """An unquantized folder, streamed: the skeleton is built with its parameters on the meta device and each
    checkpoint tensor is read on its own and put straight on ``device`` (through pinned memory on a GPU), so host
    memory never holds the model (issue 10: ``from_pretrained`` + ``.to(device)`` held all of it, 2x with the
    mapped shards). Pickled folders and checkpoints whose names are not the model's own (renamed keys that
    transformers converts on load) go through ``from_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with open_checkpoint(model_dir, allow_pickle=allow_pickle) as ck:  # our error for a pickle-only folder
        names = ck.keys() if ck.is_safetensors else None
        if names is not None:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            with _parameters_on_meta():
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            if _streamable(model, config, names):
                for name in names:
                    t = ck.get(name, device)
                    _set_tensor(model, name, t.to(dtype) if t.is_floating_point() else t)
                _tie_output_embeddings(model, config)
                model.to(device)
                model.config.dtype = dtype
                if (model_dir / "generation_config.json").is_file():
                    model.generation_config = GenerationConfig.from_pretrained(model_dir)
                return model
            log.info("%s: checkpoint names differ from the model's; loading through from_pretrained", model_dir)
    # use_safetensors=True refuses pickles; None (with allow_pickle) prefers safetensors and falls back to .bin.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, use_safetensors=True if not allow_pickle else None, trust_remote_code=trust_remote_code
    )
    return model.to(device)


def _streamable(model: nn.Module, config, names: list[str]) -> bool:
    """Every checkpoint name is a parameter or buffer of ``model`` and every parameter is in the checkpoint (the
    output embedding may be tied instead)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in model.named_buffers()}
    have = set(names)
    if have - params - buffers:
        return False
    missing = params - have
    out = model.get_output_embeddings()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False)
    if tied and out is not None:
        missing = {n for n in missing if model.get_submodule(n.rpartition(".")[0]) is not out}
    return not missing


@contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device but buffers for real while a model is constructed.

    Under ``with torch.device("meta")`` the non-persistent buffers (rotary ``inv_freq``, computed in ``__init__``
    and absent from checkpoints) would be meta too and never loaded. Only parameters are moved here, as accelerate's
    ``init_empty_weights(include_buffers=False)`` does, so every buffer keeps its computed value.
    """
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _is_plain_linear(tensors: dict[str, torch.Tensor]) -> bool:
    """A linear stored unquantized: a float ``weight`` and maybe a ``bias``, nothing else."""
    return set(tensors) <= {"weight", "bias"} and "weight" in tensors and tensors["weight"].is_floating_point()


def _load_quantized(
    model_dir: Path, quant_config: dict, device: torch.device, dtype, allow_pickle, trust_remote_code, int4_kernel
):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from pipeline.engines.qlinear import RUNTIME_FORMATS, build_linear, kernel_summary

    method = quant_config.get("quant_method")
    if method not in RUNTIME_FORMATS:
        raise QuantizationError(
            f"{model_dir} is quantized with quant_method {method!r}, which the transformers engine cannot run. "
            f"Supported: {', '.join(sorted(RUNTIME_FORMATS))}. Compile for an engine that reads {method!r}, or "
            "quantize with a method that writes a supported format."
        )
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # or from_config would hand the model to transformers' own AWQ quantizer
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)

    with open_checkpoint(model_dir, allow_pickle=allow_pickle) as ck:
        by_module: dict[str, list[str]] = defaultdict(list)
        for name in ck.keys():
            by_module[name.rpartition(".")[0]].append(name)
        unexpected = []
        for module_name, names in by_module.items():
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                unexpected.extend(names)
                continue
            tensors = {n.rpartition(".")[2]: ck.get(n, device) for n in names}  # unpacked on device
            if isinstance(module, nn.Linear) and not _is_plain_linear(tensors):
                parent, _, child = module_name.rpartition(".")
                runtime = build_linear(method, tensors, quant_config, device, dtype, int4_kernel=int4_kernel)
                setattr(model.get_submodule(parent), child, runtime)
                continue
            for leaf, t in tensors.items():
                if leaf not in module._parameters and leaf not in module._buffers:
                    unexpected.append(f"{module_name}.{leaf}")
                    continue
                value = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                _set_tensor(model, f"{module_name}.{leaf}", value)
    if unexpected:
        log.warning("%d checkpoint tensor(s) have no place in the model and were not loaded: %s",
                    len(unexpected), ", ".join(unexpected[:5]))
    _tie_output_embeddings(model, config)
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelFolderError(
            f"{model_dir} lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}. The checkpoint is incomplete or does not match config.json; "
            "re-run the quantize stage."
        )
    model.to(device)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    kernels = kernel_summary(model)
    model.quantization_info = {"quant_method": method, "kernels": kernels, **quant_config}
    log.info("loaded %s (%s) on %s: int4 linears by kernel %s", model_dir.name, method, device, kernels)
    return model


def _tie_output_embeddings(model: nn.Module, config) -> None:
    """Share the input embedding with ``lm_head`` when the config ties them and the checkpoint omits ``lm_head``."""
    out = model.get_output_embeddings()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False)
    if out is not None and out.weight.is_meta and tied:
        out.weight = model.get_input_embeddings().weight


# ------------------------------------------------------------------ the compile-target contract (engines/base.py)


def available(device: str):
    """The embedded engine runs wherever torch does; CUDA only where torch sees a GPU."""
    from pipeline.engines.base import Availability, cuda_devices

    if device == "cuda":
        gpus = cuda_devices()
        return Availability(bool(gpus), f"CUDA {', '.join(gpus)}" if gpus else "torch sees no CUDA device")
    return Availability(True, "CPU")


def build(ctx) -> dict:
    """The embedded target reads the quantized folder in place: no copy, the artifact points at it."""
    return {"model_dir": str(ctx.src)}


def load(artifact: Path, device: str):
    """``(model, tokenizer)`` for a compile artifact of this target."""
    from pipeline.stages.compile import engine_model_dir, read_engine

    return load_folder(engine_model_dir(artifact), device, read_engine(artifact))


def load_folder(model_dir: Path, device: str, engine: dict):
    """``(model, tokenizer)`` for a model folder with a compile artifact's safety settings (``allow_pickle``,
    ``trust_remote_code``): float32 on the CPU, float16 on a GPU."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    return load_model(model_dir, device=device, dtype=dtype,
                      allow_pickle=engine["allow_pickle"], trust_remote_code=engine["trust_remote_code"])
