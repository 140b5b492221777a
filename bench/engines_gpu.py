"""The lmdeploy-pytorch target for real on a GPU: quantize, compile (check_run), perplexity, serve, decode speed.

One script for the lent GPU machine (lmdeploy from ../shared/gpu/lmdeploy-carry.sh on PYTHONPATH):

1. ``pipeline run`` (in process) on a recipe over ``models/tiny-llama-pydocs-gpu``: the reference, AWQ
   W4A16 g128, SmoothQuant W8A8 (lmdeploy layout) and, when the fp8 method exists, FP8 128x128 blocks, each
   compiled for ``lmdeploy-pytorch`` with ``require_run: true``, so the compile stage's ``check_run`` loads
   the artifact in lmdeploy's PyTorch engine and generates;
2. per artifact: perplexity on the same held-out windows by lmdeploy (``pipeline.get_ppl``, the artifact's
   engine config) and by quantship's runtime (``transformers_engine.load_model``, ``pipeline.eval``);
3. the artifact's own ``lmdeploy serve api_server`` command (the target's ``serve_command``, started as the
   serve stage starts it: ``engine_server`` + ``ExternalServer``), a chat smoke test with the official ``openai`` client, and
   decode tokens/s at batch 1 (128 new tokens, ``ignore_eos``; median of 3 after a warm-up).

    python3 bench/engines_gpu.py --out $OUT        # prints a table, writes $OUT/results_engines_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_WINDOWS, SEQ_LEN, NEW_TOKENS = 8, 256, 128
RECIPE = """\
name: engines-gpu
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 32, seq_len: 256}}
quantize: {{method: none, device: cuda, fp8: {{block: true}}}}
compile: {{target: lmdeploy-pytorch, device: cuda, session_len: 1024, kv_cache_fraction: 0.05, max_batch_size: 4,
          require_run: true}}
serve: {{enabled: false}}
matrix: {{quantize.method: [{methods}]}}
"""


def fp8_method_exists() -> bool:
    import inspect

    from pipeline.stages import quantize

    return '"fp8":' in inspect.getsource(quantize)  # the method table of the quantize stage


def run_pipeline(work: Path, methods: list[str]) -> dict[str, Path]:
    """Quantize + compile with the real pipeline; {variant: compile artifact}."""
    from pipeline.cli import main

    recipe = work / "engines-gpu.yaml"
    recipe.write_text(RECIPE.format(model=ROOT / "models" / "tiny-llama-pydocs-gpu",
                                    calib=ROOT / "calibration" / "pydocs-calib.txt", methods=", ".join(methods)))
    try:
        main(["run", str(recipe), "-o", str(work / "out")], standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    artifacts = {}
    for manifest in (work / "out" / "engines-gpu").glob("compile-*/manifest.json"):
        artifacts[json.loads(manifest.read_text())["variants"][0]] = manifest.parent
    return artifacts


def windows(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from pipeline.eval.perplexity import tokenize_documents

    ids = tokenize_documents(AutoTokenizer.from_pretrained(model_dir), (ROOT / "data/eval/pydocs-heldout.txt").read_text())
    return [ids[i * SEQ_LEN:(i + 1) * SEQ_LEN].tolist() for i in range(N_WINDOWS)]


def ours_ppl(artifact: Path, wins: list[list[int]]) -> float:
    import torch

    from pipeline.engines.transformers_engine import load_model
    from pipeline.eval.perplexity import model_logits

    model, _ = load_model(artifact / "model", device="cuda", dtype=torch.float16)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w], device="cuda")
            logits = model_logits(model, ids)[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += len(w) - 1
    del model
    torch.cuda.empty_cache()
    return math.exp(nll / n)


def lmdeploy_ppl(artifact: Path, wins: list[list[int]]) -> float:
    from pipeline.engines.lmdeploy_common import open_pipeline

    pipe = open_pipeline(artifact)
    try:
        losses = pipe.get_ppl(wins)  # mean NLL per sequence; the windows have equal length
        return math.exp(sum(float(x) for x in losses) / len(losses))
    finally:
        pipe.close()


def launch_server(artifact: Path, port: int, log_path: Path):
    """Start the target's serve command the way the serve stage does (``engine_server`` + ``ExternalServer``),
    without waiting for health. Returns ``(command, wait_healthy, stop, how)``."""
    from pipeline.serve.external import ExternalServer
    from pipeline.stages.serve import engine_server

    command, why = engine_server(artifact, "127.0.0.1", port, None)
    if command is None:
        raise RuntimeError(f"the serve stage would not serve it: {why}")
    server = ExternalServer(command, log_path).start()
    return (command, lambda: server.wait_healthy(240), server.stop,
            "pipeline.stages.serve.engine_server + pipeline.serve.external.ExternalServer")


def smoke_and_decode(command) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=command.base_url + "/v1", api_key="none")
    name = client.models.list().data[0].id
    smoke = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is Python?"}],
                                           max_tokens=16, temperature=0)
    rates = []
    for _ in range(4):  # the first is a warm-up
        t0 = time.perf_counter()
        first, usage = None, None
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Write about Python lists."}], max_tokens=NEW_TOKENS,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        end = time.perf_counter()
        rates.append({"tokens": usage, "decode_tok_s": (usage - 1) / (end - first), "ttft_s": first - t0})
    measured = rates[1:]
    return {"model_name": name, "smoke_reply": smoke.choices[0].message.content,
            "smoke_finish": smoke.choices[0].finish_reason,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in measured),
            "ttft_s": statistics.median(r["ttft_s"] for r in measured),
            "new_tokens": [r["tokens"] for r in measured]}


def served(command, wait, how: str) -> dict:
    if command is None:
        return {}
    wait()
    return {"served_by": how, "serve_argv": command.argv, **smoke_and_decode(command)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    methods = ["none", "awq", "smoothquant"] + (["fp8"] if fp8_method_exists() else [])
    work = Path(tempfile.mkdtemp(prefix="engines-gpu-"))
    t0 = time.time()
    try:
        artifacts, pipeline_error = run_pipeline(work, methods), None
    except Exception as e:  # a failed stage (e.g. check_run): measure what was built
        traceback.print_exc()
        pipeline_error = f"{type(e).__name__}: {e}"[:1000]
        artifacts = {json.loads(m.read_text())["variants"][0]: m.parent
                     for m in (work / "out" / "engines-gpu").glob("compile-*/manifest.json")}
    result = {"pipeline_error": pipeline_error, "card": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "methods": methods,
              "pipeline_seconds": round(time.time() - t0, 1), "rows": []}
    try:
        import lmdeploy

        result["lmdeploy"] = lmdeploy.__version__
    except ImportError as e:
        result["lmdeploy"] = f"not importable: {e}"
    wins = windows(ROOT / "models" / "tiny-llama-pydocs-gpu")  # the tokenizer every variant keeps
    for i, variant in enumerate(methods):
        artifact = artifacts.get(variant)
        row: dict = {"variant": variant}
        if artifact is None:
            row["error"] = "no compile artifact (the pipeline did not build it)"
            result["rows"].append(row)
            continue
        engine = json.loads((artifact / "engine.json").read_text())
        row.update(format=engine["format"]["fmt"], status=engine["status"], check_run=engine["check_run"])
        command = wait = stop = how = None
        try:  # the server starts while both perplexities are computed
            command, wait, stop, how = launch_server(artifact, 23400 + i, out / f"server_{variant}.log")
        except Exception as e:
            traceback.print_exc()
            command, row["serve_error"] = None, f"{type(e).__name__}: {e}"[:600]
        try:
            for key, fn in (("ours_ppl", lambda: ours_ppl(artifact, wins)),
                            ("lmdeploy_ppl", lambda: lmdeploy_ppl(artifact, wins)),
                            ("serve", lambda: served(command, wait, how))):
                try:
                    value = fn()
                    row.update(value) if isinstance(value, dict) else row.__setitem__(key, value)
                except Exception as e:
                    traceback.print_exc()
                    row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:600]
        finally:
            if command:
                stop()
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        (out / "results_engines_gpu.json").write_text(json.dumps(result, indent=1))  # kept if a later row hangs
    ref = next((r.get("decode_tok_s") for r in result["rows"] if r["variant"] == "none"), None)
    print(f"\n{result['card']}; torch {result['torch']}; lmdeploy {result['lmdeploy']}; "
          f"{N_WINDOWS} x {SEQ_LEN} held-out tokens; decode batch 1, {NEW_TOKENS} new tokens (ignore_eos)")
    print("| variant | format | compile check_run | ppl lmdeploy | ppl quantship | decode tok/s | vs reference | smoke reply |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        fmt = lambda k: f"{r[k]:.2f}" if isinstance(r.get(k), float) else ("error" if f"{k}_error" in r else "—")  # noqa: E731
        speed = r.get("decode_tok_s")
        rel = f"{speed / ref:.2f}x" if speed and ref else "—"
        cr = r.get("check_run") or {}
        print(f"| {r['variant']} | {r.get('format', '')} | {cr.get('reply', r.get('status', ''))!r} | {fmt('lmdeploy_ppl')} | "
              f"{fmt('ours_ppl')} | {f'{speed:.1f}' if speed else 'error'} | {rel} | {r.get('smoke_reply', '')!r} |")
    (out / "results_engines_gpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
