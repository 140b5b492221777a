"""Quality on the CPU: ours vs the reference implementations, on the same calibration tokens, ranked by KL.

For each fixture (the shipped tiny model; its outlier-injected copy, ``bench/fixtures.py``; with ``--larger`` a
larger model trained by the same script), each bit width and each method, one quantization run per row, each
in its own subprocess so that its peak memory (``ru_maxrss``, the RSS high-water mark) and wall time are its
own. Every row is then scored against its fixture's fp16 reference on the same held-out tokens
(``pipeline/eval/divergence.py``: KL first, top-1 agreement, perplexity). One Markdown table goes to stdout,
the rows, setup and goal checks to ``--json``.

Implementations and how each row is produced and evaluated:

- **quantship** ("ours"), with the quantize stage's defaults: ``fake-quant`` rows run the layer walker with
  ``pack=False`` + ``emit_dequantized`` and write a float checkpoint of the dequantized weights (any bit width);
  ``packed`` rows (4-bit, W8A8, NF4, FP8) write the real checkpoint the quantize stage writes and load it through
  our runtime (``pipeline.engines.transformers_engine.load_model``: int4 / int8 / fp8 modules, bitsandbytes for NF4).
  The defaults are AWQ duo scaling and GPTQ static act-order (llm-compressor's defaults too). ``--old-defaults``
  (alias ``--matched``) adds ``fake-quant`` rows with the settings the stage used before, labelled
  ``awq (paper scales)`` (the paper's ``mag_x^a``, no duo scaling) and ``gptq (no act-order)`` (``desc_act`` and
  ``static_groups`` off).
- **llm-compressor 0.14** (``oneshot``, its defaults otherwise): GPTQModifier; AWQModifier +
  QuantizationModifier; SmoothQuantModifier + QuantizationModifier(W8A8). Evaluated in memory right after
  ``oneshot``: its modules run compressed-tensors' quantized forward (weights fake-quantized with the scales and
  zero points it found, W8A8 activations quantized per token), i.e. exactly what it computed; our runtime loads
  no W4A16 compressed-tensors checkpoint. The compressed checkpoint is then saved in fp16, only for its size.
  One shim: its AWQ pins cached activations (``pipelines/cache.py`` ``pin_memory``), which a CPU-only torch
  refuses; pinning only speeds host-to-GPU copies, so it is a no-op here.
- **lmdeploy 0.18 lite** (``auto_awq`` with its CLI default ``search_scale=False``, ``smooth_quant``): run on the
  CPU in its fp16 with our calibration tokens in place of its hub datasets, written to a folder and loaded
  through our runtime. One shim: its log line calls ``torch.cuda.max_memory_allocated``, 0 on a CPU-only torch.

Quantization time is the wall time from the float folder on disk to the quantized model (in memory for
llm-compressor, written for the others), after each library's imports. Peak RSS includes the interpreter,
torch and the library (the baseline after imports is in the JSON as ``rss_after_import_mib``).

Setup of the reference implementations (never let pip touch torch)::

    pip install --no-deps llmcompressor==0.14.0.1 requests urllib3 charset-normalizer  # + compressed-tensors,
    #   datasets, loguru, accelerate (in the venv already; it ran with compressed-tensors 0.20, it pins 0.19)
    pip download --no-deps lmdeploy==0.18.0 -d /tmp/lmd && pip install --no-deps --target /tmp/lmd/site \
        /tmp/lmd/lmdeploy-0.18.0-*.whl mmengine-lite==0.10.7 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0 \
        fire==0.7.1 platformdirs==4.14.8 pillow pybase64
    python bench/quality.py --lmdeploy-path /tmp/lmd/site --json outputs/bench/quality/quality.json  # ~17 min, 2 cores
    python bench/quality.py --larger --old-defaults --group 64 --impls quantship,llm-compressor
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.quality")

TINY = ROOT / "models" / "tiny-llama-pydocs"
# The better-trained fixture: the same config trained on the lent GPU on the extended corpus (models/README.md).
TINY_GPU = ROOT / "models" / "tiny-llama-pydocs-gpu"
BASES = {"tiny": TINY, "gpu": TINY_GPU}
CALIB_TEXT = ROOT / "calibration" / "pydocs-calib.txt"
EVAL_TEXT = ROOT / "data" / "eval" / "pydocs-heldout.txt"
IMPLS = ("quantship", "llm-compressor", "lmdeploy")


# -- the plan: one spec per row ------------------------------------------------------------------------------------
# The stage's defaults are llm-compressor 0.14's (AWQModifier duo_scaling=True, GPTQModifier actorder="static"),
# chosen because they measured best (bench/RESULTS.md). These variants are ours with the settings it used before:
# AWQ with the paper's scales mag_x^a (duo_scaling off), GPTQ in column order (desc_act and static_groups off).
OLD_DEFAULTS = {"awq": "paper scales", "gptq": "no act-order"}
# FP8 rows: the quant_method fp8 checkpoint the stage writes, loaded by our runtime (Fp8Linear, CPU: dequantized
# weights and per-token (block: per 1x128 group) activations quantized and dequantized, the engines' rounding).
FP8_VARIANTS = ("per-channel", "128x128 blocks")


def plan_rows(fixtures: list[str], bits: list[int], impls: list[str], old_defaults: bool = False) -> list[dict]:
    rows = []
    for fx in fixtures:
        for b in bits:
            if "quantship" in impls:
                for m in ("rtn", "awq", "gptq"):
                    rows.append(dict(fixture=fx, impl="quantship", method=m, bits=b, path="fake-quant"))
                    if b == 4:
                        rows.append(dict(fixture=fx, impl="quantship", method=m, bits=b, path="packed"))
                if old_defaults:
                    for m, variant in OLD_DEFAULTS.items():
                        rows.append(dict(fixture=fx, impl="quantship", method=m, bits=b, path="fake-quant",
                                         variant=variant))
                if b == 4:
                    rows.append(dict(fixture=fx, impl="quantship", method="bnb-nf4", bits=4, path="packed"))
            if "llm-compressor" in impls:
                for m in ("gptq", "awq"):
                    rows.append(dict(fixture=fx, impl="llm-compressor", method=m, bits=b, path="in-memory"))
            if "lmdeploy" in impls:
                rows.append(dict(fixture=fx, impl="lmdeploy", method="awq", bits=b, path="packed"))
        for impl in impls:  # W8A8 does not depend on --bits
            path = {"quantship": "packed", "llm-compressor": "in-memory", "lmdeploy": "packed"}[impl]
            rows.append(dict(fixture=fx, impl=impl, method="smoothquant", bits="8/8", path=path))
        if "quantship" in impls:  # FP8 e4m3 weights, dynamic per-token activations (emulated on the CPU)
            for variant in FP8_VARIANTS:
                rows.append(dict(fixture=fx, impl="quantship", method="fp8", bits="fp8", path="packed",
                                 variant=variant))
    return rows


# -- quantizers (run in the worker) ---------------------------------------------------------------------------------
def _section(method: str, bits: int, group: int, n_grid: int):
    """The quantize stage's own typed section (its defaults: GPTQ sym, damp 0.01, static act-order; AWQ clip, duo
    scaling)."""
    from pipeline.recipe import QuantizeSection

    return QuantizeSection(method=method, w_bits=bits, w_group_size=group, device="cpu", awq={"n_grid": n_grid})


def _walk(spec: dict, method, qconfig, emit_dequantized: bool) -> Path:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from pipeline.formats.checkpoint import CheckpointWriter, copy_side_files, open_checkpoint, write_config
    from pipeline.quant.arch import arch_spec
    from pipeline.quant.layerwise import quantize_layerwise

    src, out = Path(spec["fixture_dir"]), Path(spec["out_dir"])
    config = AutoConfig.from_pretrained(src)
    calib = load_file(spec["calib_path"])["input_ids"]
    if spec["method"] == "rtn":  # RTN reads no statistics: one window keeps the walk from running the others
        calib = calib[:1]
    writer = CheckpointWriter(out)
    with open_checkpoint(src) as ck:
        quantize_layerwise(ck, config, arch_spec(config.architectures[0]), calib, method, writer.add, device="cpu",
                           dtype=torch.float32, batch_size=8, emit_dequantized=emit_dequantized)
    writer.close()
    write_config(src, out, qconfig)
    copy_side_files(src, out)
    return out


def ours(spec: dict):
    from pipeline.quant.methods import AWQMethod, GPTQMethod, RTNMethod
    from pipeline.stages.quantize import make_method

    def run():
        m, b, g = spec["method"], spec["bits"], spec["group_size"]
        src, out = Path(spec["fixture_dir"]), Path(spec["out_dir"])
        if m == "bnb-nf4":
            from pipeline.engines.bnb_engine import quantize_checkpoint_bnb

            quantize_checkpoint_bnb(src, out, "nf4", device="cpu")
            return out
        if m == "fp8":
            from pipeline.quant.fp8_checkpoint import quantize_checkpoint_fp8

            quantize_checkpoint_fp8(src, out, block=spec["variant"] == FP8_VARIANTS[1])
            return out
        if m == "rtn" and spec["path"] == "packed":
            from pipeline.quant.rtn import quantize_checkpoint_rtn

            quantize_checkpoint_rtn(src, out, bits=b, group_size=g, sym=False)
            return out
        cfg = _section(m, 8 if m == "smoothquant" else b, g, spec["n_grid"])
        if spec["path"] == "packed":  # what the quantize stage writes
            method, qconfig = make_method(cfg)
            return _walk(spec, method, qconfig, emit_dequantized=False)
        variant = spec.get("variant")
        if m == "rtn":
            method = RTNMethod(b, g, cfg.w_sym, pack=False)
        elif m == "awq":
            o = cfg.awq
            duo = False if variant == OLD_DEFAULTS["awq"] else o.duo_scaling
            method = AWQMethod(b, g, o.n_grid, o.clip, o.max_shrink, duo, pack=False)
        else:
            o = cfg.gptq
            # Defaults: act-order with static groups, llm-compressor's ActivationOrdering.STATIC (groups fixed up
            # front on the column order); the old-defaults row turns both off.
            old = variant == OLD_DEFAULTS["gptq"]
            desc_act, static_groups = (False, False) if old else (o.desc_act, o.static_groups)
            method = GPTQMethod(b, g, cfg.w_sym, desc_act, o.damp, o.block_size, static_groups, pack=False)
        return _walk(spec, method, None, emit_dequantized=True)

    return run


def llm_compressor(spec: dict):
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        # 0.14's AWQ pins its cached activations (awq/base.py _apply_smoothing -> cache.py pin_memory), which a
        # CPU-only torch refuses ("Cannot access accelerator device"); pinning only speeds host-to-GPU copies.
        IntermediatesCache.pin_memory = lambda self, *a, **k: None

    def weight_scheme(sym: bool) -> dict:
        # At 4 bits these equal its W4A16 (sym, GPTQ) and W4A16_ASYM (AWQ) presets; spelled out for 3 bits.
        args = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=sym, strategy="group",
                                group_size=spec["group_size"])
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}

    def run():
        src = spec["fixture_dir"]
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src)  # oneshot wants one even for pre-tokenized data
        ids = load_file(spec["calib_path"])["input_ids"]
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        m = spec["method"]
        if m == "gptq":  # its defaults otherwise (actorder static, dampening 0.01, block 128)
            recipe = [GPTQModifier(config_groups=weight_scheme(True), ignore=["lm_head"])]
        elif m == "awq":  # 0.14's AWQModifier takes no scheme: the quantization step carries it
            recipe = [AWQModifier(n_grid=spec["n_grid"]),
                      QuantizationModifier(config_groups=weight_scheme(False), ignore=["lm_head"])]
        else:
            recipe = [SmoothQuantModifier(smoothing_strength=spec["alpha"]),
                      QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
        oneshot(model=model, dataset=ds, recipe=recipe, tokenizer=tokenizer, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1])
        return model

    return run


def lmdeploy(spec: dict):
    import torch
    from safetensors.torch import load_file

    import lmdeploy.lite.apis.calibrate as lmd_calibrate
    from lmdeploy.lite.apis.auto_awq import auto_awq
    from lmdeploy.lite.apis.smooth_quant import smooth_quant

    calib = load_file(spec["calib_path"])["input_ids"]
    # Our tokens instead of its hub datasets: calibrate() reads get_calib_loaders from its own namespace
    # (lmdeploy/lite/apis/calibrate.py) and concatenates the [1, seq_len] batches it returns.
    lmd_calibrate.get_calib_loaders = lambda *a, **k: [calib[i : i + 1] for i in range(len(calib))]
    if not torch.cuda.is_available():  # its log line "max gpu memory" only; no effect on the math
        torch.cuda.max_memory_allocated = lambda *a, **k: 0

    def run():
        common = dict(work_dir=spec["out_dir"], calib_samples=calib.shape[0], calib_seqlen=calib.shape[1],
                      device="cpu", batch_size=1)
        if spec["method"] == "awq":  # its CLI default: search_scale False (smoothing with ratio 0.5, no search)
            auto_awq(spec["fixture_dir"], w_bits=spec["bits"], w_group_size=spec["group_size"],
                     search_scale=spec["lmdeploy_search_scale"], **common)
        else:
            smooth_quant(spec["fixture_dir"], w_bits=8, **common)
        return Path(spec["out_dir"])

    return run


QUANTIZERS = {"quantship": ours, "llm-compressor": llm_compressor, "lmdeploy": lmdeploy}


def _warm_imports(src: str) -> None:
    """Import what every implementation uses lazily (transformers' model classes), before the clock starts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import pipeline.formats.awq_gemm, pipeline.formats.gptq, pipeline.formats.w8a8  # noqa: F401, E401
    import pipeline.quant.awq, pipeline.quant.gptq, pipeline.quant.smoothquant  # noqa: F401, E401

    config = AutoConfig.from_pretrained(src)
    with __import__("torch").device("meta"):
        AutoModelForCausalLM.from_config(config)
    AutoTokenizer.from_pretrained(src)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    frame = tb[-1] if tb else None
    at = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}{at}"


def worker(spec: dict) -> dict:
    """Quantize one row, measure it, score it against the reference log-probs."""
    import torch

    torch.set_num_threads(spec["threads"])
    from pipeline.engines.transformers_engine import load_model
    from pipeline.eval.divergence import ReferenceLogprobs, compare_to_reference_logprobs

    result: dict = {}
    try:
        _warm_imports(spec["fixture_dir"])
        run = QUANTIZERS[spec["impl"]](spec)  # imports happen here, before the clock
        result["rss_after_import_mib"] = round(_rss_mib(), 1)
        t0 = time.perf_counter()
        made = run()
        result["quantize_s"] = round(time.perf_counter() - t0, 2)
        result["peak_rss_mib"] = round(_rss_mib(), 1)
    except Exception as e:  # a failing implementation is a row that says why, never a number
        traceback.print_exc()
        return {"error": f"not run: {_where(e)}"}
    if isinstance(made, Path):
        model, _ = load_model(made, device="cpu", dtype=torch.float32)
        if spec["path"] != "fake-quant":
            result["size_bytes"] = weight_bytes(made)
    else:
        model = made
    reference = ReferenceLogprobs.load(spec["ref_dir"])
    result.update(compare_to_reference_logprobs(reference, model, batch_size=4))
    if spec["impl"] == "llm-compressor":  # size of its compressed checkpoint, after the clock
        try:
            # In the fixture's fp16 (it ran in fp32), as the other rows' checkpoints store their float tensors.
            model.to(torch.float16).save_pretrained(spec["out_dir"], save_compressed=True)
            result["size_bytes"] = weight_bytes(Path(spec["out_dir"]))
        except Exception as e:
            result["size_note"] = f"save failed: {_where(e)}"
    return result


# -- the driver -----------------------------------------------------------------------------------------------------
def prepare_fixture(name: str, src: Path, work: Path, args) -> dict:
    """Calibration windows, evaluation tokens and the reference's log-probs of one fixture (cached in ``work``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from pipeline.engines.transformers_engine import load_model
    from pipeline.eval.divergence import ReferenceLogprobs
    from pipeline.eval.perplexity import tokenize_documents
    from pipeline.stages.calibrate import sample_windows

    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src)
    calib_path = d / f"calib-{args.calib_samples}x{args.calib_seq_len}.safetensors"
    if not calib_path.is_file():  # as the calibrate stage samples them
        ids = torch.tensor(tok(CALIB_TEXT.read_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)
        save_file({"input_ids": sample_windows(ids, args.calib_samples, args.calib_seq_len, 0).contiguous()},
                  str(calib_path))
    ref_dir = d / f"reference-{args.eval_tokens}x{args.eval_seq_len}"
    if not (ref_dir / "reference.json").is_file():
        ids = tokenize_documents(tok, EVAL_TEXT.read_text())[: args.eval_tokens]
        model, _ = load_model(src, device="cpu", dtype=torch.float32)
        ReferenceLogprobs.compute(model, ids, args.eval_seq_len, batch_size=4, folder=ref_dir)
    ref = ReferenceLogprobs.load(ref_dir)
    return {"calib_path": str(calib_path), "ref_dir": str(ref_dir), "ref_ppl": ref.ppl, "tokens": ref.tokens,
            "size_bytes": weight_bytes(src)}


def run_row(spec: dict, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    if spec["impl"] == "lmdeploy" and args.lmdeploy_path:
        env["PYTHONPATH"] = os.pathsep.join([args.lmdeploy_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        spec = dict(spec, out_dir=str(Path(tmp) / "model"))
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(result_path)]
        name = "-".join(str(spec.get(k) or "") for k in ("fixture", "impl", "method", "variant", "bits", "path"))
        logf = Path(args.workdir) / "logs" / (name.replace("/", "") + ".log")
        logf.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            with open(logf, "w") as f:
                subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"not run: timed out after {args.timeout} s"}
        if not result_path.is_file():
            tail = logf.read_text().strip().splitlines()[-1:] or ["no output"]
            return {"error": f"not run: worker died ({tail[0][:200]})"}
        out = json.loads(result_path.read_text())
        out["process_s"] = round(time.perf_counter() - started, 1)
        return out


BITS_ORDER = {4: 0, 3: 1, "8/8": 2, "fp8": 3, "16": -1}


def sort_key(fixture_order: list[str], r: dict):
    kl = r.get("kl_mean")
    return (fixture_order.index(r["fixture"]), BITS_ORDER.get(r["bits"], 9), kl if kl is not None else float("inf"))


def table(rows: list[dict], fixture_order: list[str]) -> str:
    head = ("| fixture | bits | implementation | method | path | KL (nats/tok) | top-1 | ppl (Δ%) | size MB "
            "| quantize s | peak RSS MiB |")
    lines = [head, "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: sort_key(fixture_order, r)):
        size = f"{r['size_bytes'] / 1e6:.2f}" if r.get("size_bytes") else "—"
        if "error" in r:
            metrics = f"{r['error']} | | | {size} | | "
        else:
            ppl = f"{r['ppl']:.2f} ({r['ppl_increase_pct']:+.2f})"
            q = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "—"
            rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "—"
            metrics = f"{r['kl_mean']:.2e} | {r['top1_agreement']:.4f} | {ppl} | {size} | {q} | {rss}"
        method = _label(r["method"], r.get("variant"))
        lines.append(f"| {r['fixture']} | {r['bits']} | {r['impl']} | {method} | {r['path']} | {metrics} |")
    return "\n".join(lines)


def _label(method: str, variant: str | None) -> str:
    return method if variant is None else f"{method} ({variant})"


def check_goals(rows: list[dict], fixture_order: list[str]) -> list[dict]:
    """The issue's goals, figure by figure: calibrated beats RTN; ours >= the same method elsewhere; ours faster."""
    ok = [r for r in rows if "kl_mean" in r and r["impl"] != "reference (fp16)"]

    def find(fx, bits, impl, method, path=None, variant=None):
        for r in ok:
            if ((r["fixture"], r["bits"], r["impl"], r["method"], r.get("variant")) == (fx, bits, impl, method, variant)
                    and path in (None, r["path"])):
                return r
        return None

    goals = []
    for fx in fixture_order:
        for bits in (4, 3):
            rtn = find(fx, bits, "quantship", "rtn", "fake-quant")
            for m, variant in [(m, v) for m in ("awq", "gptq") for v in (None, OLD_DEFAULTS[m])]:
                r = find(fx, bits, "quantship", m, "fake-quant", variant)
                if rtn and r:  # "clearly": at least 20% less KL, and more top-1
                    goals.append(dict(goal="beats RTN", fixture=fx, bits=bits, method=_label(m, variant),
                                      met=r["kl_mean"] <= 0.8 * rtn["kl_mean"]
                                      and r["top1_agreement"] > rtn["top1_agreement"],
                                      kl_ratio=round(r["kl_mean"] / rtn["kl_mean"], 3),
                                      top1_delta=round(r["top1_agreement"] - rtn["top1_agreement"], 4)))
        for bits, m in [(b, m) for b in (4, 3) for m in ("awq", "gptq")] + [("8/8", "smoothquant")]:
            for variant in (None, OLD_DEFAULTS.get(m)) if m in OLD_DEFAULTS else (None,):
                mine = find(fx, bits, "quantship", m, "packed" if bits == "8/8" else "fake-quant", variant)
                for impl in ("llm-compressor", "lmdeploy"):
                    theirs = find(fx, bits, impl, m)
                    if not (mine and theirs):
                        continue
                    where = dict(fixture=fx, bits=bits, method=_label(m, variant), vs=impl)
                    goals.append(dict(goal="no worse than reference impl", **where,
                                      met=mine["kl_mean"] <= 1.05 * theirs["kl_mean"],  # 5%: run-to-run noise
                                      kl_ratio=round(mine["kl_mean"] / theirs["kl_mean"], 3),
                                      top1_delta=round(mine["top1_agreement"] - theirs["top1_agreement"], 4)))
                    goals.append(dict(goal="faster than reference impl", **where,
                                      met=mine["quantize_s"] < theirs["quantize_s"],
                                      ours_s=mine["quantize_s"], theirs_s=theirs["quantize_s"]))
    return goals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--larger", action="store_true",
                   help="also the larger model (trained once by scripts/train_tiny.py)")
    p.add_argument("--larger-path", help="the larger fixture's folder, if trained already (e.g. on a GPU: RESULTS.md)")
    p.add_argument("--bits", default="4,3", help="weight bit widths of the weight-only rows")
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128), help="group size")
    p.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(IMPLS))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192, help="first N tokens of data/eval/pydocs-heldout.txt")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--n-grid", type=int, default=20, help="AWQ scale-search grid (ours and llm-compressor)")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (ours and llm-compressor)")
    p.add_argument("--lmdeploy-search-scale", action="store_true", help="lmdeploy auto_awq --search-scale (slow)")
    p.add_argument("--lmdeploy-path", default=os.environ.get("LMDEPLOY_PATH"),
                   help="a --target folder holding lmdeploy 0.18 and its pure-python deps, if not in the venv")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (same for every implementation)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per quantization run")
    p.add_argument("--workdir", default=str(ROOT / "outputs" / "bench" / "quality"))
    p.add_argument("--fixtures", default="tiny,tiny+outliers",
                   help="of tiny, gpu (the better-trained one), each optionally +outliers (larger: --larger)")
    p.add_argument("--methods", default="rtn,awq,gptq,smoothquant,bnb-nf4,fp8", help="run only these methods")
    p.add_argument("--old-defaults", "--matched", dest="old_defaults", action="store_true",
                   help="also ours with the stage's previous defaults: 'awq (paper scales)' without duo scaling, "
                   "'gptq (no act-order)' without desc_act/static_groups (--matched: the earlier name)")
    p.add_argument("--json", help="write the rows and the setup here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(worker(spec)))
        return

    import torch

    from bench.fixtures import inject_outliers, larger_fixture

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    fixtures = {}
    for name in args.fixtures.split(","):
        base, _, variant = name.partition("+")
        if base not in BASES or variant not in ("", "outliers"):
            sys.exit(f"--fixtures: unknown fixture {name!r}; valid: {', '.join(f'{b}, {b}+outliers' for b in BASES)}")
        fixtures[name] = BASES[base]
        if variant:  # the same function, with outlier channels in its activations (bench/fixtures.py)
            fixtures[name] = work / "fixtures" / f"{BASES[base].name}-outliers"
            if not (fixtures[name] / "outliers.json").is_file():
                inject_outliers(BASES[base], fixtures[name])
    if args.larger_path:
        fixtures["larger"] = Path(args.larger_path)
    elif args.larger:
        fixtures["larger"] = larger_fixture(work / "fixtures" / "tiny-llama-pydocs-large")
    prepared = {name: prepare_fixture(name, src, work, args) for name, src in fixtures.items()}
    impls = [i for i in args.impls.split(",") if i]
    bits = [int(b) for b in args.bits.split(",")]
    common = dict(group_size=args.group, n_grid=args.n_grid, alpha=args.alpha, threads=args.threads,
                  lmdeploy_search_scale=args.lmdeploy_search_scale)
    rows = []
    for name, fx in prepared.items():
        rows.append(dict(fixture=name, impl="reference (fp16)", method="—", bits="16", path="folder", kl_mean=0.0,
                         top1_agreement=1.0, ppl=fx["ref_ppl"], ppl_increase_pct=0.0, size_bytes=fx["size_bytes"]))
    methods = args.methods.split(",")
    specs = [s for s in plan_rows(list(fixtures), bits, impls, args.old_defaults) if s["method"] in methods]
    for spec in specs:
        if args.lmdeploy_search_scale and spec["impl"] == "lmdeploy" and spec["method"] == "awq":
            spec["variant"] = "search_scale"
    t_all = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        fx = prepared[spec["fixture"]]
        spec.update(common, fixture_dir=str(fixtures[spec["fixture"]]), calib_path=fx["calib_path"],
                    ref_dir=fx["ref_dir"])
        res = run_row(spec, args)
        rows.append({k: spec.get(k) for k in ("fixture", "impl", "method", "variant", "bits", "path")} | res)
        log.info("[%d/%d] %s %s %s %s %s %s: %s", i, len(specs), spec["fixture"], spec["impl"], spec["method"],
                 spec.get("variant") or "", spec["bits"], spec["path"],
                 res.get("error") or f"KL {res['kl_mean']:.3e} top-1 {res['top1_agreement']:.4f}")
    print(table(rows, list(fixtures)))
    goals = check_goals(rows, list(fixtures))
    for g in goals:
        log.info("goal %s: %s", "MET" if g["met"] else "NOT MET", {k: v for k, v in g.items() if k != "met"})
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k not in ("worker", "json")}
        setup.update(torch=torch.__version__, python=sys.version.split()[0], cpu_count=os.cpu_count(),
                     fixtures={k: str(v) for k, v in fixtures.items()}, total_s=round(time.perf_counter() - t_all, 1),
                     eval_tokens_scored={k: v["tokens"] for k, v in prepared.items()})
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows, "goals": goals}, indent=1) + "\n")


if __name__ == "__main__":
    main()
