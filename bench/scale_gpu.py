"""Real sizes on one GPU (issue 10): an 8B-shaped checkpoint through the whole pipeline, overlap on/off, 70B-wide layers.

One script, one run (``python3 bench/scale_gpu.py --out $OUT``; ``--small`` runs the same steps at CPU size, a
few minutes on 2 cores). On the lent GPU machine the pipeline's pydantic/fastapi/uvicorn/openai (+ jiter, distro,
sniffio, annotated_types, pydantic_core, typing_inspection, typing_extensions, opentelemetry_api) travel as wheels
(the ``.lmdcarry/whl`` folder of ../shared/gpu/lmdeploy-carry.sh), installed with ``pip install --target /tmp/site``
and ``PYTHONPATH=/tmp/site:$PWD``; results in bench/RESULTS.md ("Real sizes on one GPU").

1. **Checkpoint.** A Llama-3-8B-shaped folder (hidden 4096, intermediate 14336, 32 layers, GQA 32/8) written to disk
   as 4 safetensors shards of random bf16 weights, generated tensor by tensor on the GPU and appended to the shard
   file (``formats.checkpoint.write_safetensors_stream``), so host memory holds one tensor, never the model; the
   shipped tokenizer (``models/tiny-llama-pydocs``) with the vocabulary cut to its 2,048 tokens.
2. **Pipeline.** ``pipeline run recipes/llama3-8b-scale.yaml`` in a child process: none / awq / gptq / smoothquant,
   compile (transformers, cuda), evaluate (4,096 tokens), serve's smoke test. The child wraps every stage
   function with ``pipeline.resources.measure`` (peak RSS: VmHWM reset per stage; peak GPU: torch's allocator),
   so each stage run's wall time, peak host RSS and peak GPU memory are its own.
3. **Overlap.** The AWQ walk again from the same checkpoint, in process, page cache dropped before each run
   (root only), with the layer walker's read/write threads off and on (``quantize_layerwise(overlap=...)``).
4. **70B width.** Llama-3-70B-shaped layers (hidden 8192, intermediate 28672, GQA 64/8), as many as ``--big-layers``,
   written to disk and quantized from it (GPTQ 128 x 2048, AWQ 128 x 512): per-layer time and peak GPU memory,
   extrapolated to 80 layers as ``T80 = T_fixed + 80 * t_layer`` (``t_layer``: median per-layer time), with the walk's
   own split of a layer's time (calibration pass / the method's quantize / the quantized forward pass). Only this
   step: ``--skip pipeline,overlap`` (the 8B checkpoint is then not written); ``--big-methods gptq`` for one method.

Prints the tables last and writes ``results_scale_gpu.json`` (after every step) and the run's ``run.log`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER_DIR = ROOT / "models" / "tiny-llama-pydocs"
RECIPE = ROOT / "recipes" / "llama3-8b-scale.yaml"
GiB = 2**30

SHAPES = {  # name: (hidden, intermediate, heads, kv_heads, layers)
    "8b": (4096, 14336, 32, 8, 32),
    "70b": (8192, 28672, 64, 8, 80),
    "8b-small": (256, 768, 4, 2, 2),
    "70b-small": (512, 1536, 8, 2, 2),
}


def llama_config(shape: str, layers: int | None = None, vocab: int = 2048) -> dict:
    hidden, inter, heads, kv, n = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
        "num_hidden_layers": layers or n, "head_dim": hidden // heads, "vocab_size": vocab,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 3, "pad_token_id": 1, "initializer_range": 0.02, "use_cache": True,
    }


def tensor_specs(config: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return [(n, torch.bfloat16, tuple(t.shape)) for n, t in model.state_dict().items()]


def write_checkpoint(out: Path, config: dict, shards: int, device: str) -> dict:
    """Random bf16 weights (norms 1, the rest N(0, 0.02)), generated per tensor on ``device``, streamed to
    ``shards`` safetensors files with an index, plus config.json and the tokenizer files."""
    import torch

    from pipeline.formats.checkpoint import copy_side_files, write_safetensors_stream

    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    specs = tensor_specs(config)
    sizes = [torch.Size(s).numel() * 2 for _, _, s in specs]
    per_shard = sum(sizes) / shards
    groups: list[list] = [[]]
    acc = 0
    for spec, size in zip(specs, sizes):
        if groups[-1] and acc + size > per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(spec)
        acc += size

    def produce(name: str) -> torch.Tensor:
        shape = next(s for n, _, s in specs if n == name)
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).mul_(0.02)

    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors_stream(out / fname, group, produce)
        weight_map.update({n: fname for n, _, _ in group})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    copy_side_files(TOKENIZER_DIR, out)
    if hasattr(os, "sync"):
        os.sync()
    return {"seconds": round(time.perf_counter() - t0, 2), "bytes": total, "shards": len(groups),
            "params": sum(sizes) // 2}


def drop_page_cache() -> bool:
    """Drop the page cache so the next read comes from disk (root only); False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ the pipeline child


def child(stats_path: str, cli_args: list[str]) -> None:
    """``pipeline`` CLI with every stage function wrapped by ``pipeline.resources.measure``; one JSON line per
    stage run to ``stats_path``."""
    from pipeline import runner
    from pipeline.resources import measure

    original = runner.stage_function

    def stage_function(kind: str):
        fn = original(kind)

        def wrapped(ctx):
            row = {"run_id": ctx.run_id, "kind": kind}
            try:
                with measure() as m:
                    metrics = fn(ctx)
                row["metrics"] = {k: v for k, v in (metrics or {}).items()
                                  if isinstance(v, (int, float, str, bool)) and len(str(v)) < 300}
                return metrics
            except BaseException as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                raise
            finally:
                row.update(m.figures)
                with open(stats_path, "a") as f:
                    f.write(json.dumps(row) + "\n")

        return wrapped

    runner.stage_function = stage_function
    from pipeline.cli import main

    main(cli_args, standalone_mode=True)


def run_pipeline(work: Path, model_dir: Path, small: bool, timeout: float) -> dict:
    outputs = work / "outputs"
    shutil.rmtree(outputs, ignore_errors=True)
    stats = work / "stage_stats.jsonl"
    stats.unlink(missing_ok=True)
    env = dict(os.environ, QUANTSHIP_SCALE_MODEL=str(model_dir), PYTHONUNBUFFERED="1")
    if small:
        env.update(QUANTSHIP_SCALE_DEVICE="cuda" if _cuda() else "cpu", QUANTSHIP_SCALE_SAMPLES="8",
                   QUANTSHIP_SCALE_SEQ_LEN="64", QUANTSHIP_SCALE_EVAL_SEQ_LEN="128", QUANTSHIP_SCALE_EVAL_TOKENS="512")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(stats), "--",
           "run", str(RECIPE), "-o", str(outputs)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_rss = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak_rss = max(peak_rss, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in stats.read_text().splitlines()] if stats.is_file() else []
    run_log = next(outputs.glob("*/run.log"), None)
    kernels = []
    if run_log:
        kernels = [ln.strip()[-220:] for ln in run_log.read_text().splitlines() if "int4 linears by kernel" in ln]
    return {"wall_s": round(wall, 1), "returncode": proc.returncode, "rss_sampled_peak_bytes": peak_rss,
            "stages": rows, "output_tail": out[-4000:], "kernel_lines": kernels,
            "run_log": str(run_log) if run_log else None}


# ------------------------------------------------------------------------------------------ direct layer walks


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def walk(model_dir: Path, method_name: str, calib: tuple[int, int], overlap: bool, out_dir: Path,
         drop: bool = True) -> dict:
    """quantize_layerwise from the checkpoint on disk to a checkpoint on disk, as the quantize stage does."""
    import torch
    from transformers import AutoConfig

    from pipeline.formats.checkpoint import CheckpointWriter, open_checkpoint
    from pipeline.quant.arch import arch_spec
    from pipeline.quant.layerwise import quantize_layerwise
    from pipeline.quant.methods import AWQMethod, GPTQMethod, SmoothQuantMethod
    from pipeline.resources import measure

    device = "cuda" if _cuda() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    method = {"gptq": lambda: GPTQMethod(4, 128, True, desc_act=True, damp=0.01, block_size=128, static_groups=True),
              "awq": lambda: AWQMethod(4, 128, duo_scaling=True),
              "smoothquant": lambda: SmoothQuantMethod(0.5, "lmdeploy")}[method_name]()
    config = AutoConfig.from_pretrained(model_dir)
    ids = torch.randint(0, config.vocab_size, calib, generator=torch.Generator().manual_seed(0))
    shutil.rmtree(out_dir, ignore_errors=True)
    dropped = drop_page_cache() if drop else False
    stamps: list[float] = []
    with measure() as m:
        writer = CheckpointWriter(out_dir)
        with open_checkpoint(model_dir) as ck:
            stats = quantize_layerwise(ck, config, arch_spec("LlamaForCausalLM"), ids, method, writer.add,
                                       device=device, dtype=dtype, batch_size=4, overlap=overlap,
                                       progress=lambda *a, **k: stamps.append(time.perf_counter()))
        writer.close()
    per_layer = [b - a for a, b in zip(stamps, stamps[1:])]  # layer 2 on (layer 1 carries warm-up and setup)
    row = {"method": method_name, "calib": f"{calib[0]}x{calib[1]}", "overlap": overlap, "page_cache_dropped": dropped,
           "wall_s": m.figures["seconds"], "peak_gpu_gib": round(m.figures.get("peak_gpu_bytes", 0) / GiB, 2),
           "peak_rss_gib": round(m.figures["peak_rss_bytes"] / GiB, 2), "read_wait_s": stats.get("read_wait_seconds"),
           "write_tail_s": stats.get("write_tail_seconds"), "layers": stats["layers"],
           "peak_gpu_reserved_gib": round(m.figures.get("peak_gpu_reserved_bytes", 0) / GiB, 2),
           "phases_s_per_layer": {k.removesuffix("_seconds_per_layer"): v for k, v in stats.items()
                                  if k.endswith("_seconds_per_layer")},
           "per_layer_s": [round(x, 3) for x in per_layer]}
    if per_layer:
        t_layer = statistics.median(per_layer)
        row["t_layer_median_s"] = round(t_layer, 3)
        row["t_fixed_s"] = round(row["wall_s"] - t_layer * stats["layers"], 2)
        row["t80_s"] = round(row["t_fixed_s"] + 80 * t_layer, 1)
    shutil.rmtree(out_dir, ignore_errors=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------ tables


def print_tables(res: dict) -> None:
    p = res.get("pipeline")
    print(f"\n{res.get('device')}, torch {res.get('torch')}; checkpoint {res.get('checkpoint')}")
    if p:
        print(f"\npipeline run: {p['wall_s']} s wall (rc {p['returncode']}), child peak RSS (sampled) "
              f"{p['rss_sampled_peak_bytes'] / GiB:.2f} GiB")
        print("| stage run | wall s | peak GPU GiB (alloc / reserved) | peak host RSS GiB | note |\n|---|---|---|---|---|")
        for r in p["stages"]:
            mt = r.get("metrics", {})
            note = r.get("error") or ", ".join(f"{k} {mt[k]}" for k in ("seconds_per_layer", "read_wait_seconds", "ppl",
                                                                          "kl", "runtime", "latency_s") if k in mt)
            gpu = (f"{r.get('peak_gpu_bytes', 0) / GiB:.2f} / {r.get('peak_gpu_reserved_bytes', 0) / GiB:.2f}"
                   if "peak_gpu_bytes" in r else "—")
            print(f"| {r['run_id']} | {r['seconds']:.1f} | {gpu} | {r['peak_rss_bytes'] / GiB:.2f} | {note[:120]} |")
        for k in p.get("kernel_lines", []):
            print("  ", k)
    if res.get("overlap"):
        print("\n| walk | overlap | cache dropped | wall s | s/layer (median) | read wait s | write tail s | peak GPU GiB | peak RSS GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in res["overlap"]:
            print(f"| {r['method']} {r['calib']} | {'on' if r['overlap'] else 'off'} | {r['page_cache_dropped']} | "
                  f"{r['wall_s']:.1f} | {r.get('t_layer_median_s')} | {r['read_wait_s']} | {r['write_tail_s']} | "
                  f"{r['peak_gpu_gib']} | {r['peak_rss_gib']} |")
    if res.get("big"):
        print(f"\n70B-wide layers ({res.get('big_checkpoint')}): T80 = T_fixed + 80 * t_layer")
        print("| method | calib | layers | wall s | t_layer s | T_fixed s | T80 = T_fixed + 80 t_layer | peak GPU GiB "
              "(alloc / reserved) | peak RSS GiB | observe / quantize / forward s per layer |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in res["big"]:
            t80 = r.get("t_fixed_s", 0) + 80 * r.get("t_layer_median_s", 0)
            ph = r.get("phases_s_per_layer", {})
            print(f"| {r['method']} | {r['calib']} | {r['layers']} | {r['wall_s']:.1f} | {r.get('t_layer_median_s')} | "
                  f"{r.get('t_fixed_s')} | {r.get('t_fixed_s')} + 80 · {r.get('t_layer_median_s')} = {t80:.0f} s = "
                  f"{t80 / 60:.2f} min | {r['peak_gpu_gib']} / {r.get('peak_gpu_reserved_gib')} | {r['peak_rss_gib']} | "
                  f"{ph.get('observe')} / {ph.get('quantize')} / {ph.get('forward')} |")


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        return child(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default="/tmp/quantship-scale")
    ap.add_argument("--small", action="store_true", help="CPU-size shapes and calibration (a check of the script)")
    ap.add_argument("--budget", type=float, default=400, help="seconds; later steps are skipped when short")
    ap.add_argument("--big-layers", type=int, default=None,
                    help="70B-wide layers to write and quantize (default 4, 2 with --small; 0: skip)")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: pipeline,overlap,big (the 8B checkpoint "
                    "is not written when both pipeline and overlap are skipped)")
    ap.add_argument("--big-methods", default="awq,gptq", help="comma list of the 70B-width walks to run, in order")
    args = ap.parse_args()
    if args.big_layers is None:
        args.big_layers = 2 if args.small else 4
    import torch

    started = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - started)  # noqa: E731
    skip = set(filter(None, args.skip.split(",")))
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                 "small": args.small}
    json_path = out / "results_scale_gpu.json"
    save = lambda: json_path.write_text(json.dumps(res, indent=1))  # noqa: E731
    s8, s70 = ("8b-small", "70b-small") if args.small else ("8b", "70b")
    model_dir = work / "llama3-8b-shape"
    if not {"pipeline", "overlap"} <= skip:  # only those two steps read the 8B-shaped checkpoint
        res["checkpoint"] = write_checkpoint(model_dir, llama_config(s8), 4, device)
        print("checkpoint:", res["checkpoint"], flush=True)
        save()
    if "pipeline" not in skip:
        res["pipeline"] = run_pipeline(work, model_dir, args.small, timeout=max(60.0, left() - 30))
        print(res["pipeline"]["output_tail"][-3000:], flush=True)
        if res["pipeline"]["run_log"]:
            shutil.copy(res["pipeline"]["run_log"], out / "run.log")
        save()
    shutil.rmtree(work / "outputs", ignore_errors=True)
    calib_awq = (8, 64) if args.small else (128, 512)
    if "overlap" not in skip and left() > (20 if args.small else 90):
        res["overlap"] = []
        for overlap in (False, True):
            res["overlap"].append(walk(model_dir, "awq", calib_awq, overlap, work / "walk-out", drop=not args.small))
            print(json.dumps(res["overlap"][-1]), flush=True)
            save()
    shutil.rmtree(model_dir, ignore_errors=True)
    if "big" not in skip and args.big_layers and left() > (10 if args.small else 75):
        big_dir = work / "llama3-70b-shape"
        res["big_checkpoint"] = write_checkpoint(big_dir, llama_config(s70, args.big_layers), 2, device)
        save()
        res["big"] = []
        calibs = {"awq": calib_awq, "gptq": (8, 128) if args.small else (128, 2048), "smoothquant": calib_awq}
        for method in filter(None, args.big_methods.split(",")):
            calib = calibs[method]
            if left() < (5 if args.small else 40):
                break
            res["big"].append(walk(big_dir, method, calib, True, work / "walk-out", drop=not args.small))
            print(json.dumps(res["big"][-1]), flush=True)
            save()
        shutil.rmtree(big_dir, ignore_errors=True)
    res["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print_tables(res)


if __name__ == "__main__":
    main()
