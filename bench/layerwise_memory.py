"""Peak host memory of layer-by-layer quantization as the model gets deeper (CPU).

Random Llama models of 2 and 16 layers (hidden 512, intermediate 1536) are saved as safetensors and quantized
with GPTQ through ``pipeline.quant.layerwise`` in a fresh subprocess each; the table shows each child's peak
RSS next to the size of the model. Layer by layer, 8x the layers should cost about the same peak memory.

    python bench/layerwise_memory.py --json layerwise_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from transformers import AutoConfig
from pipeline.formats.checkpoint import CheckpointWriter, open_checkpoint
from pipeline.quant.arch import arch_spec
from pipeline.quant.layerwise import quantize_layerwise
from pipeline.quant.methods import GPTQMethod
torch.set_num_threads(2)
src, out = {src!r}, {out!r}
config = AutoConfig.from_pretrained(src)
ids = torch.randint(0, config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
writer = CheckpointWriter(out)
t0 = time.perf_counter()
with open_checkpoint(src) as ck:
    method = GPTQMethod(4, 128, True, desc_act=True, damp=0.01, block_size=128, static_groups=True)  # stage defaults
    quantize_layerwise(ck, config, arch_spec("LlamaForCausalLM"), ids, method, writer.add)
writer.close()
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_model(folder: Path, layers: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,16")
    p.add_argument("--json", default="layerwise_memory.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.layers.split(",")):
            src, out = Path(tmp, f"src{n}"), Path(tmp, f"out{n}")
            size = make_model(src, n)
            res = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), src=str(src), out=str(out))],
                                 capture_output=True, text=True, check=True)
            row = {"layers": n, "model_fp32_mib": size / 2**20, **json.loads(res.stdout.strip().splitlines()[-1])}
            rows.append(row)
    print("| layers | model fp32 MiB | peak RSS MiB | wall s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['model_fp32_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |")
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
