"""The Ray executor over the GPUs of one machine against the local executor on one GPU (issue 10 point 5).

One script, one run (``python3 bench/ray_gpu.py --out $OUT``, on the lent 2-GPU machine): the Llama-3-8B-shaped
checkpoint of ``bench/scale_gpu.py`` (its writer, imported: 4 safetensors shards of random bf16 weights, the
shipped tokenizer) written once, then ``pipeline run recipes/llama3-8b-scale.yaml`` (none / awq / gptq /
smoothquant, compile transformers cuda, evaluate 4,096 tokens, serve's smoke test) twice, each in a child process
and into its own output root:

- **ray**: ``--executor ray`` on a local Ray cluster that sees every GPU (each GPU stage asks for one);
- **local**: the local executor with ``CUDA_VISIBLE_DEVICES=0`` (one GPU, stages one after another).

The Ray run goes first (it is the new part: if it cannot start, the script stops at once). Every stage run is
measured where it runs (the child's process for local, the Ray worker for ray; a ``worker_process_setup_hook``
wraps the stage functions there): the stage function's wall time, ``runner.run_stage``'s (which adds the
artifact's hashing and manifest), peak host RSS, peak GPU memory, and the GPU it ran on (``CUDA_VISIBLE_DEVICES``,
Ray's GPU ids, and the PCI bus id of the device torch used, mapped to nvidia-smi's index). Then: the speed-up
(local wall / ray wall: the children's whole walls, Ray's start included, and the stage spans), whether both runs
wrote the same artifact folders (kind-key), and which folders hold identical files (the manifests' sha256).

``--small``: the same steps at CPU size (2 layers of width 256; Ray on the CPU, no GPUs: a check of the plumbing,
a few minutes on 2 cores). ``--no-serve``: the recipe without its serve stage (a copy in --work). JSON is written to
``--out/results_ray_gpu.json`` after every step; the runs' run.log files are copied there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale_gpu import RECIPE, llama_config, write_checkpoint  # noqa: E402

GiB = 2**30
RESULTS = "results_ray_gpu.json"


# ------------------------------------------------------------------------------------------ in the measured processes


def instrument(stats_path: str, executor: str) -> None:
    """Wrap ``runner.run_stage`` and every stage function of this process: one JSON line per stage run to
    ``stats_path`` (appended; Ray workers and the driver write to the same file)."""
    import json as _json
    import os as _os
    import sys as _sys
    import time as _time

    from pipeline import runner
    from pipeline.resources import measure

    def write(row: dict) -> None:
        with open(stats_path, "a") as f:
            f.write(_json.dumps(row) + "\n")

    def gpu_seen() -> dict:
        seen: dict = {"cuda_visible_devices": _os.environ.get("CUDA_VISIBLE_DEVICES")}
        ray = _sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            try:
                seen["ray_gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
            except Exception as e:  # noqa: BLE001 - a figure, never a failure of the stage
                seen["ray_gpu_ids"] = f"{type(e).__name__}: {e}"[:200]
        torch = _sys.modules.get("torch")
        if torch is not None:
            seen["torch_threads"] = torch.get_num_threads()  # Ray sets OMP_NUM_THREADS to a task's num_cpus
        if torch is not None and torch.cuda.is_initialized():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            seen["pci_bus_id"] = getattr(props, "pci_bus_id", None)
            seen["uuid"] = str(getattr(props, "uuid", ""))
            seen["allocated_after_bytes"] = torch.cuda.memory_allocated()
        return seen

    stage_function, run_stage = runner.stage_function, runner.run_stage

    def measured_stage_function(kind: str):
        fn = stage_function(kind)

        def wrapped(ctx):
            row = {"event": "stage", "executor": executor, "run_id": ctx.run_id, "kind": kind, "pid": _os.getpid(),
                   "start": _time.time()}
            try:
                with measure() as m:
                    return fn(ctx)
            except BaseException as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                raise
            finally:
                row.update(m.figures, end=_time.time(), **gpu_seen())
                write(row)

        return wrapped

    def measured_run_stage(plan, run, *args, **kwargs):
        t0 = _time.time()
        result = run_stage(plan, run, *args, **kwargs)
        write({"event": "run_stage", "executor": executor, "run_id": run.id, "folder": run.dir.name,
               "pid": _os.getpid(), "start": t0, "end": _time.time(), "status": result.status})
        return result

    runner.stage_function, runner.run_stage = measured_stage_function, measured_run_stage


def child(stats_path: str, executor: str, cli_args: list[str]) -> None:
    """``pipeline run`` measured; for ray, a local cluster started here first, with the same wrapping in every
    worker (``worker_process_setup_hook``), so ``RayExecutor`` uses it."""
    instrument(stats_path, executor)
    if executor == "ray":
        import logging

        import ray

        t0 = time.time()
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 object_store_memory=1 * GiB,
                 runtime_env={"worker_process_setup_hook": lambda: instrument(stats_path, "ray")})
        with open(stats_path, "a") as f:
            f.write(json.dumps({"event": "ray_init", "start": t0, "end": time.time(),
                                "resources": ray.cluster_resources(),
                                "node_ip": ray.util.get_node_ip_address()}) + "\n")
        cli_args = [*cli_args, "--executor", "ray"]
    from pipeline.cli import main

    main(cli_args, standalone_mode=True)


# ------------------------------------------------------------------------------------------ the driver


def recipe_without_serve(work: Path) -> Path:
    """A copy of the recipe without its serve stage, its relative paths made absolute."""
    text = RECIPE.read_text()
    text = re.sub(r"(?m)^serve:\n(?:[ \t]+.*\n)+", "", text)
    text = text.replace(": ../", f": {ROOT}/")
    out = work / "llama3-8b-scale-noserve.yaml"
    out.write_text(text)
    return out


def run_child(executor: str, recipe: Path, model_dir: Path, work: Path, small: bool, timeout: float) -> dict:
    root = work / f"out-{executor}"
    shutil.rmtree(root, ignore_errors=True)
    stats = work / f"stats-{executor}.jsonl"
    stats.unlink(missing_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="qsray-", dir="/tmp")  # short: Ray's unix sockets live there
    env = dict(os.environ, QUANTSHIP_SCALE_MODEL=str(model_dir), PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp,
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.pathsep.join(
                   [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]),
               # The lent machine's memory starts small and grows as it is used (KINDS.md): Ray's memory monitor
               # would read the small figure and kill workers.
               RAY_memory_monitor_refresh_ms="0")
    if small:
        env.update(QUANTSHIP_SCALE_DEVICE="cuda" if _cuda_count() else "cpu", QUANTSHIP_SCALE_SAMPLES="8",
                   QUANTSHIP_SCALE_SEQ_LEN="64", QUANTSHIP_SCALE_EVAL_SEQ_LEN="128", QUANTSHIP_SCALE_EVAL_TOKENS="512")
    if executor == "local":
        env["CUDA_VISIBLE_DEVICES"] = "0"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(stats), executor, "--",
           "run", str(recipe), "-o", str(root)]
    t0 = time.perf_counter()
    # Its own process group: at the timeout the child and what it started there (Ray's processes) are killed.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, timed_out = proc.communicate(timeout=timeout)[0], False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, timed_out = proc.communicate()[0], True
    rc = None if timed_out else proc.returncode
    wall = time.perf_counter() - t0
    shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = [json.loads(line) for line in stats.read_text().splitlines()] if stats.is_file() else []
    plan_root = next((p.parent for p in root.glob("*/plan.json")), None)
    res = {"executor": executor, "wall_s": round(wall, 1), "returncode": rc, "timed_out": timed_out,
           "timeout_s": round(timeout), "rows": rows, "output_tail": out[-4000:],
           "plan_root": str(plan_root) if plan_root else None}
    stages = [r for r in rows if r.get("event") == "stage"]
    if stages:
        res["span_s"] = round(max(r["end"] for r in rows if "end" in r) - min(r["start"] for r in stages), 1)
    init = next((r for r in rows if r.get("event") == "ray_init"), None)
    if init:
        res["ray_init_s"] = round(init["end"] - init["start"], 1)
    return res


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_indexes() -> dict[str, int]:
    """nvidia-smi's index (physical, whatever CUDA_VISIBLE_DEVICES says) by 'uuid:<uuid>' and 'bus:<PCI bus>'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,pci.bus_id", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            found[f"uuid:{_uuid(parts[1])}"] = int(parts[0])
            found[f"bus:{int(parts[2].split(':')[-2], 16)}"] = int(parts[0])
    return found


def _uuid(u: str) -> str:
    return u.lower().removeprefix("gpu-")


def gpu_of(row: dict, indexes: dict[str, int]) -> object:
    """The physical GPU a stage ran on: by the uuid torch reported, else its PCI bus number; '-' without CUDA."""
    if row.get("uuid"):
        found = indexes.get(f"uuid:{_uuid(row['uuid'])}")
        if found is not None:
            return found
    if row.get("pci_bus_id") is not None:
        return indexes.get(f"bus:{row['pci_bus_id']}", f"bus {row['pci_bus_id']}")
    return "-"


def artifacts(plan_root: str | None) -> dict[str, dict[str, str]]:
    """Artifact folder (kind-key) -> {file: sha256}, from each folder's manifest."""
    from pipeline.artifacts import MANIFEST

    if not plan_root:
        return {}
    return {m.parent.name: {f["path"]: f["sha256"] for f in json.loads(m.read_text())["files"]}
            for m in sorted(Path(plan_root).glob(f"*/{MANIFEST}"))}


def compare(local: dict, ray: dict) -> dict:
    """Both runs' artifact folders (kind-key: the cache keys) and which hold byte-identical files."""
    names = {x["folder"]: x["run_id"] for r in (local, ray) for x in r["rows"] if x.get("event") == "run_stage"}
    a, b = artifacts(local.get("plan_root")), artifacts(ray.get("plan_root"))
    both = sorted(set(a) & set(b))
    identical = [k for k in both if a[k] == b[k]]
    differ = {k: sorted(f for f in set(a[k]) | set(b[k]) if a[k].get(f) != b[k].get(f)) for k in both
              if a[k] != b[k]}
    return {"same_keys": set(a) == set(b), "local_only": sorted(set(a) - set(b)), "ray_only": sorted(set(b) - set(a)),
            "identical": [names.get(k, k) for k in identical],
            "differ": {names.get(k, k): v for k, v in differ.items()}, "artifacts": len(both)}


def table(res: dict, indexes: dict[str, int]) -> list[dict]:
    """One row per stage run and executor: wall (stage function; run_stage with hashing), GPU, memory."""
    rows = []
    for executor in ("ray", "local"):
        r = res.get(executor)
        if not r:
            continue
        t0 = min((x["start"] for x in r["rows"] if x.get("event") == "stage"), default=0)
        run_walls = {x["run_id"]: x["end"] - x["start"] for x in r["rows"] if x.get("event") == "run_stage"}
        for x in sorted((x for x in r["rows"] if x.get("event") == "stage"), key=lambda x: x["start"]):
            gpu = gpu_of(x, indexes)
            rows.append({"executor": executor, "run_id": x["run_id"], "start_s": round(x["start"] - t0, 1),
                         "stage_s": round(x["end"] - x["start"], 1),
                         "run_stage_s": round(run_walls.get(x["run_id"], 0), 1),
                         "gpu": gpu, "cuda_visible_devices": x.get("cuda_visible_devices"),
                         "torch_threads": x.get("torch_threads"),
                         "ray_gpu_ids": x.get("ray_gpu_ids"), "pid": x["pid"],
                         "peak_gpu_gib": round(x.get("peak_gpu_bytes", 0) / GiB, 2),
                         "left_allocated_gib": round(x.get("allocated_after_bytes", 0) / GiB, 2),
                         "peak_rss_gib": round(x.get("peak_rss_bytes", 0) / GiB, 2), "error": x.get("error")})
    return rows


def print_report(res: dict) -> None:
    print(f"\n{res.get('device')}; torch {res.get('torch')}, ray {res.get('ray_version')}; "
          f"checkpoint {res.get('checkpoint')}")
    print("\n| executor | stage run | starts at s | stage s | run_stage s | GPU | CUDA_VISIBLE_DEVICES | Ray GPU ids "
          "| torch threads | pid | peak GPU GiB | left allocated GiB | peak RSS GiB | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res.get("table", []):
        print(f"| {r['executor']} | {r['run_id']} | {r['start_s']} | {r['stage_s']} | {r['run_stage_s']} | "
              f"{r['gpu']} | {r['cuda_visible_devices']} | {r['ray_gpu_ids']} | {r['torch_threads']} | {r['pid']} | "
              f"{r['peak_gpu_gib']} | "
              f"{r['left_allocated_gib']} | {r['peak_rss_gib']} | {(r['error'] or '')[:100]} |")
    for e in ("ray", "local"):
        r = res.get(e)
        if r:
            print(f"{e}: wall {r['wall_s']} s (rc {r['returncode']}{', TIMED OUT' if r['timed_out'] else ''}), "
                  f"stage span {r.get('span_s')} s" + (f", ray.init {r['ray_init_s']} s" if "ray_init_s" in r else ""))
    if "speedup" in res:
        print(f"speed-up local/ray: {res['speedup']}")
    if "compare" in res:
        c = res["compare"]
        print(f"same artifact keys: {c['same_keys']} ({c['artifacts']} in both; local only {c['local_only']}, "
              f"ray only {c['ray_only']}); identical files: {c['identical']}; differ: {c['differ']}")


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        return child(sys.argv[i + 1], sys.argv[i + 2], sys.argv[sys.argv.index("--") + 1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default="/tmp/quantship-ray")
    ap.add_argument("--small", action="store_true", help="CPU-size shapes and calibration (a check of the plumbing)")
    ap.add_argument("--budget", type=float, default=400, help="seconds for the whole script; the runs' timeouts")
    ap.add_argument("--ray-timeout", type=float, default=None, help="seconds for the Ray run (default: budget / 2)")
    ap.add_argument("--no-serve", action="store_true", help="leave serve's smoke test out of the recipe")
    ap.add_argument("--order", default="ray,local", help="which run first (default: ray, the new part, fails fast)")
    args = ap.parse_args()
    started = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - started)  # noqa: E731
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"small": args.small, "serve": not args.no_serve, "budget_s": args.budget}
    save = lambda: (out / RESULTS).write_text(json.dumps(res, indent=1, default=str))  # noqa: E731

    # Preflight: what the runs need, in seconds, before the checkpoint's minute.
    import torch

    res["torch"] = torch.__version__
    gpus = _cuda_count()
    res["device"] = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "cpu"
    try:
        import ray

        res["ray_version"] = ray.__version__
        import importlib

        for name in ("pydantic", "fastapi", "uvicorn", "openai"):  # the serve and evaluate stages' imports
            importlib.import_module(name)
    except ImportError as e:
        res["error"] = f"preflight: {type(e).__name__}: {e}"
        save()
        sys.exit(f"ray_gpu: {res['error']}")
    if not args.small and gpus < 2:
        res["error"] = f"preflight: {gpus} GPU(s) visible; the comparison needs 2 (or --small)"
        save()
        sys.exit(f"ray_gpu: {res['error']}")
    indexes = gpu_indexes() if gpus else {}
    res["gpu_indexes"] = indexes
    save()

    model_dir = work / "llama3-8b-shape"
    res["checkpoint"] = write_checkpoint(model_dir, llama_config("8b-small" if args.small else "8b"), 4,
                                         "cuda" if gpus else "cpu")
    if gpus:
        torch.cuda.empty_cache()
    print("checkpoint:", res["checkpoint"], flush=True)
    save()
    recipe = recipe_without_serve(work) if args.no_serve else RECIPE
    order = [e.strip() for e in args.order.split(",") if e.strip()]
    for i, executor in enumerate(order):
        if executor == "ray" and i < len(order) - 1:
            timeout = args.ray_timeout or max(60.0, left() / 2)
        else:
            timeout = max(30.0, left() - 5)
        res[executor] = run_child(executor, recipe, model_dir, work, args.small, timeout)
        r = res[executor]
        print(f"{executor}: wall {r['wall_s']} s, rc {r['returncode']}, timed out {r['timed_out']}", flush=True)
        print(r["output_tail"][-2500:], flush=True)
        if r["plan_root"] and (Path(r["plan_root"]) / "run.log").is_file():
            shutil.copy(Path(r["plan_root"]) / "run.log", out / f"run-{executor}.log")
        save()
        if r["returncode"] != 0 and i < len(order) - 1:
            res["stopped"] = f"the {executor} run failed (rc {r['returncode']}); the other run was not started"
            print(res["stopped"], flush=True)
            break
    if "ray" in res and "local" in res:
        res["compare"] = compare(res["local"], res["ray"])
        lw, rw = res["local"]["wall_s"], res["ray"]["wall_s"]
        res["speedup"] = {"wall": round(lw / rw, 2),
                          "stage_span": round(res["local"].get("span_s", 0) / res["ray"]["span_s"], 2)
                          if res["ray"].get("span_s") else None,
                          "local_timed_out": res["local"]["timed_out"], "ray_timed_out": res["ray"]["timed_out"]}
    res["table"] = table(res, indexes)
    res["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print_report(res)
    shutil.rmtree(model_dir, ignore_errors=True)
    for e in ("ray", "local"):
        shutil.rmtree(work / f"out-{e}", ignore_errors=True)
    ok = all(res.get(e, {}).get("returncode") == 0 for e in order)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
