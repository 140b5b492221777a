"""GPU quantization speed and memory: quantship's layer-by-layer AWQ and GPTQ against llm-compressor's.

A Llama-3-8B-shaped model with random bf16 weights (timing does not depend on the values) and the methods'
usual calibration sizes: GPTQ 128 x 2048 tokens, AWQ 128 x 512. Ours reads weights layer by layer from a
generator on the GPU (a real run reads them from safetensors) and copies every packed tensor back to host
memory as a checkpoint writer would; llm-compressor gets the whole model on the GPU, as it is used.

    python bench/gpu_quant.py --methods ours-gptq,ours-awq,llmc-gptq --json out.json
    python bench/gpu_quant.py --layers 2 --methods ours-gptq      # quick check

Prints one table (wall time, peak GPU memory) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def llama3_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
    )


class RandomWeights:
    """Deterministic random weights, made on demand per tensor name (a stand-in for a checkpoint on disk)."""

    def __init__(self, config, device: str, dtype: torch.dtype, seed: int = 0):
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.device, self.dtype, self.seed = device, dtype, seed

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        g = torch.Generator(device=self.device).manual_seed(self.seed + zlib.crc32(name.encode()))
        # Drawn in the model's dtype: a checkpoint reader hands over bf16 tensors, never an fp32 copy (for the
        # 128256 x 4096 embeddings an fp32 draw alone would add 2 GiB to the peak that no real run has).
        return torch.randn(shape, generator=g, device=self.device, dtype=self.dtype).mul_(0.02)


@contextlib.contextmanager
def _profiler(enabled: bool):
    if not enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield prof


def column_loop_bench() -> list[dict]:
    """The GPTQ column loop alone (Triton kernel + lazy-update GEMMs) on the 8B shapes, median of 3."""
    from pipeline.quant import gptq_triton
    from pipeline.quant.gptq import _group_qparams, _inverse_hessian_cholesky

    rows = []
    for name, (n_out, n_in) in {"qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}.items():
        x = torch.randn(8192, n_in, device="cuda")
        U = _inverse_hessian_cholesky(x.t() @ x / 8192, 0.01)
        W0 = torch.randn(n_out, n_in, device="cuda") * 0.02
        gptq_triton.gptq_columns(W0.clone(), U, 4, True, 128, _group_qparams)  # warm-up: Triton compiles
        times = []
        for _ in range(3):
            W = W0.clone()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gptq_triton.gptq_columns(W, U, 4, True, 128, _group_qparams)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append({"linear": name, "shape": [n_out, n_in], "triton_s": sorted(times)[1]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_ours(method_name: str, config, ids: torch.Tensor, profile: bool = False) -> dict:
    from pipeline.quant.arch import arch_spec
    from pipeline.quant.layerwise import quantize_layerwise
    from pipeline.quant.methods import AWQMethod, GPTQMethod

    # The quantize stage's defaults: GPTQ with static act-order (llm-compressor's default too), AWQ with duo scaling
    # and the clip search.
    method = (GPTQMethod(4, 128, True, desc_act=True, damp=0.01, block_size=128, static_groups=True)
              if method_name == "gptq" else AWQMethod(4, 128, duo_scaling=True))
    written = [0]

    def write(name: str, t: torch.Tensor) -> None:
        written[0] += t.to("cpu").numel() * t.element_size()

    source = RandomWeights(config, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with _profiler(profile) as prof:
        stats = quantize_layerwise(source, config, arch_spec("LlamaForCausalLM"), ids, method, write,
                                   device="cuda", dtype=torch.bfloat16, batch_size=4)
        torch.cuda.synchronize()
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
    return {"seconds": time.perf_counter() - t0, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "seconds_per_layer": stats["seconds_per_layer"], "written_gib": written[0] / 2**30}


def run_llmc(method_name: str, config, ids: torch.Tensor) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer, LlamaForCausalLM

    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    cfg_dir = Path(tempfile.mkdtemp())
    model.config.save_pretrained(cfg_dir)  # oneshot rereads the config from name_or_path
    model.config.name_or_path = str(cfg_dir)
    model.name_or_path = str(cfg_dir)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama-pydocs")  # oneshot wants one
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    if method_name == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # llm-compressor 0.14: AWQModifier takes no scheme/targets/ignore (they belong to the quantization step).
        recipe = [AWQModifier(), QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, tokenizer=tokenizer, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ours-gptq,ours-awq,llmc-gptq,llmc-awq")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--json", default="gpu_quant.json")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of ours (use with --layers 2)")
    p.add_argument("--column-loop", action="store_true", help="also time the GPTQ column loop implementations")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_quant.py needs a CUDA GPU")
    loop_rows = column_loop_bench() if args.column_loop else []
    config = llama3_8b_config(args.layers)
    calib = {"gptq": (128, 2048), "awq": (128, 512)}
    rows = []
    for entry in args.methods.split(","):
        impl, method = entry.split("-")
        n, L = calib[method]
        ids = torch.randint(0, config.vocab_size, (n, L), generator=torch.Generator().manual_seed(0))
        row = {"impl": "quantship" if impl == "ours" else "llm-compressor", "method": method, "calib": f"{n}x{L}"}
        try:
            row.update(run_ours(method, config, ids, args.profile) if impl == "ours" else run_llmc(method, config, ids))
        except Exception as e:  # one failing implementation must not hide the others' figures
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name(0)
    print(f"\n{device}, torch {torch.__version__}, Llama-3-8B shape x {args.layers} layers, random bf16 weights")
    print("| implementation | method | calibration | wall s | s/layer | peak GPU GiB | peak GB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['method']} | {r['calib']} | error: {r['error'][:80]} | | | |")
        else:
            print(f"| {r['impl']} | {r['method']} | {r['calib']} | {r['seconds']:.1f} | "
                  f"{r.get('seconds_per_layer', float('nan')):.2f} | {r['peak_gib']:.2f} | {r['peak_gib'] * 2**30 / 1e9:.2f} |")
    Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "layers": args.layers,
                                           "rows": rows, "column_loop": loop_rows}, indent=1))


if __name__ == "__main__":
    main()
