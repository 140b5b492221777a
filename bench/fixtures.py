"""Model fixtures for the quality bench: an outlier-injected copy of a Llama folder, and a larger trained one.

``inject_outliers`` makes the case AWQ and SmoothQuant exist for (Lin et al., 2023, §3.2; Xiao et al., 2022,
§3): a few hidden channels whose activations are much larger than the rest at the input of q/k/v and gate/up.
It does so without changing the function the model computes. For an RMSNorm followed by linears,

    y = W · (g ⊙ x̂)  with  x̂ = x / rms(x),

scaling the norm gain of channel c by f and the matching *input* column c of every linear that reads the
norm's output by 1/f leaves ``y`` unchanged, while the activation entering the linears carries channel c
multiplied by f. This is the same equivalence AWQ's and SmoothQuant's folds use, run backwards. Only the
fp16 rounding of the rescaled weights changes the logits (relative ~2^-11 per weight); the math is done in
fp32 and rounded once.

``larger_fixture`` trains a second, larger model with the same script as the shipped one
(``scripts/train_tiny.py``), so the bench has a second real, trained configuration.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
OUTLIERS_FILE = "outliers.json"  # which channels were scaled, by what: written beside the weights
LARGER_ARGS = ("--layers", "6", "--hidden", "384", "--intermediate", "1024", "--heads", "6", "--kv-heads", "2",
               "--steps", "200", "--threads", "1")
LARGER_DONE = "training_log.json"  # train_tiny.py writes it last

# norm -> the linears that read its output, in a Llama decoder layer (as pipeline/quant/arch.py groups them)
_NORM_READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def outlier_channels(hidden: int, n_layers: int, n_channels: int, seed: int) -> list[list[int]]:
    """Per decoder layer, ``n_channels`` distinct hidden channels drawn with a seeded generator."""
    if not 0 < n_channels <= hidden:
        raise ValueError(f"n_channels must be in 1..{hidden}, got {n_channels}")
    gen = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(hidden, generator=gen)[:n_channels].tolist()) for _ in range(n_layers)]


def scale_channels(norm_weight: torch.Tensor, reader_weights: list[torch.Tensor], channels: list[int],
                   factor: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Norm gain ×factor and reader input columns ÷factor on ``channels``: the same function, outlier inputs.

    Computed in fp32 and rounded once to each tensor's own dtype."""
    idx = torch.tensor(channels, dtype=torch.long)
    g = norm_weight.float().clone()
    g[idx] *= factor
    out = []
    for w in reader_weights:
        w32 = w.float().clone()
        w32[:, idx] /= factor  # nn.Linear weight is [out, in]: column c multiplies input channel c
        out.append(w32.to(w.dtype))
    return g.to(norm_weight.dtype), out


def inject_outliers(src_dir: Path, out_dir: Path, n_channels: int = 4, factor: float = 30.0, seed: int = 0) -> Path:
    """Write to ``out_dir`` a copy of the Llama folder ``src_dir`` whose norm outputs carry outlier channels.

    Per decoder layer, ``n_channels`` seeded channels of ``input_layernorm`` and ``post_attention_layernorm``
    are multiplied by ``factor`` and the matching input columns of q/k/v and gate/up divided by it, so the
    model computes the same function (up to fp16 rounding of the rescaled weights). The chosen channels go to
    ``out_dir/outliers.json``. Returns ``out_dir``."""
    from safetensors.torch import save_file

    from pipeline.formats.checkpoint import copy_side_files, open_checkpoint, read_config, write_config

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = read_config(src_dir)
    if config.get("quantization_config"):
        raise ValueError(f"{src_dir} is already quantized; inject outliers into a float model")
    n_layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    channels = outlier_channels(hidden, n_layers, n_channels, seed)
    tensors: dict[str, torch.Tensor] = {}
    with open_checkpoint(src_dir) as ck:
        for name in ck.keys():
            tensors[name] = ck.get(name).clone()
    for layer, chosen in enumerate(channels):
        prefix = f"model.layers.{layer}."
        for norm, readers in _NORM_READERS.items():
            names = [f"{prefix}{r}.weight" for r in readers]
            g, ws = scale_channels(tensors[f"{prefix}{norm}.weight"], [tensors[n] for n in names], chosen, factor)
            tensors[f"{prefix}{norm}.weight"] = g
            tensors.update(zip(names, ws))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_config(src_dir, tmp, None)
    copy_side_files(src_dir, tmp)
    meta = {"source": str(src_dir), "n_channels": n_channels, "factor": factor, "seed": seed, "channels": channels}
    (tmp / OUTLIERS_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("outlier-injected copy of %s in %s (%d channels x%g per layer)", src_dir, out_dir, n_channels, factor)
    return out_dir


def larger_fixture(out_dir: Path, extra_args: tuple[str, ...] = LARGER_ARGS, nice: int = 10) -> Path:
    """A second, larger model trained by ``scripts/train_tiny.py`` (defaults: 6 layers, hidden 384), unless
    ``out_dir`` already holds a finished one. Trains into ``out_dir.tmp`` and renames it when done."""
    out_dir = Path(out_dir)
    if (out_dir / LARGER_DONE).is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = ["nice", "-n", str(nice), sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--out", str(tmp),
           *extra_args]
    log.info("training the larger fixture: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
