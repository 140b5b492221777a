"""The Ray executor against the local one on a none + rtn matrix of the shipped tiny model (CPU).

Ray registers its node under the machine's own address even when told 127.0.0.1, and tests here send traffic to
loopback only, so the Ray part runs in a subprocess inside a network namespace that has only the loopback
interface (``unshare -rn``), with one local Ray cluster for the whole scenario: the local executor's run, the
Ray executor's run of the same plan (one worker killed mid-stage on its first attempt), then a forced rerun whose
compile stages fail (a typed error, a crash). The tests read what the scenario recorded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MANIFEST, RUN_LOG, TMP_PREFIX
from tests.conftest import ROOT, write_recipe

MATRIX = """\
name: matrix
model: {{source: {model}}}
quantize: {{method: rtn}}
compile: {{target: transformers, device: cpu}}
eval: {{text: {eval}, seq_len: 64, max_tokens: 512}}
matrix:
  quantize.method: [none, rtn]
"""

HAS_RAY = importlib.util.find_spec("ray") is not None


def _netns_works() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        res = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


# --- the scenario, run as `python tests/test_executor_ray.py WORK` inside the network namespace --------------


def _hook(marker: str, fail_flag: str, die_flag: str, pids: str):
    """Ray's worker_process_setup_hook: quantize@rtn's worker dies mid-stage on its first attempt (a half-written
    file left in its temporary folder), and on every attempt while ``die_flag`` exists; while ``fail_flag`` exists,
    compile@rtn raises a typed error and every other compile crashes. Every compile appends its run id and its
    worker's pid to ``pids``."""

    def hook() -> None:
        import os
        from pathlib import Path

        import pipeline.stages.compile as compile_stage
        import pipeline.stages.quantize as quantize_stage
        from pipeline.errors import TargetUnavailable

        quantize_run, compile_run = quantize_stage.run, compile_stage.run

        def quantize_dies_once(ctx):
            if ctx.run_id == "quantize@rtn" and (not Path(marker).exists() or Path(die_flag).exists()):
                (ctx.out / "model").mkdir(exist_ok=True)
                (ctx.out / "model" / "model.safetensors").write_bytes(b"half-written")
                Path(marker).write_text(str(os.getpid()))
                os._exit(1)
            return quantize_run(ctx)

        def compile_fails(ctx):
            with open(pids, "a") as f:
                f.write(f"{ctx.run_id} {os.getpid()} {os.environ.get('OMP_NUM_THREADS')}\n")
            if Path(fail_flag).exists():
                if ctx.run_id == "compile@rtn":
                    raise TargetUnavailable("compile@rtn: a stand-in typed error (what, why, how to fix).")
                raise ZeroDivisionError("a stand-in crash")
            return compile_run(ctx)

        quantize_stage.run, compile_stage.run = quantize_dies_once, compile_fails

    return hook


def _files(root: Path) -> dict[str, dict[str, str]]:
    """Artifact folder -> {file: sha256}, from the manifests (which checksum every file)."""
    out = {}
    for m in sorted(root.glob(f"*/{MANIFEST}")):
        out[m.parent.name] = {f["path"]: f["sha256"] for f in json.loads(m.read_text())["files"]}
    return out


def _scenario(work: Path) -> None:
    import ray

    from pipeline.executors.ray_executor import RayExecutor
    from pipeline.plan import make_plan
    from pipeline.recipe_load import load_recipe
    from pipeline.runner import execute

    recipe = load_recipe(work / "recipe.yaml")
    record: dict = {}

    t0 = time.perf_counter()
    local = execute(make_plan(recipe, work / "local"))
    record["local"] = {"statuses": local.statuses, "seconds": time.perf_counter() - t0,
                       "keys": {r.id: r.key for r in make_plan(recipe, work / "local").runs}}

    marker, fail_flag, die_flag = work / "worker-died", work / "compile-fails", work / "always-dies"
    pids = work / "compile-pids"
    t0 = time.perf_counter()
    # One GPU as a logical resource (no device behind it): the recipe's stages run on the CPU and ask for none,
    # except where the GPU-task step below makes compile ask for it.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _hook(str(marker), str(fail_flag), str(die_flag), str(pids))})
    record["ray_init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = make_plan(recipe, work / "ray")
    out = execute(plan, executor=RayExecutor())
    record["ray"] = {"statuses": out.statuses, "errors": {k: str(e) for k, e in out.errors.items()},
                     "seconds": time.perf_counter() - t0, "keys": {r.id: r.key for r in plan.runs},
                     "files": _files(plan.root), "worker_died": marker.exists(),
                     "leftovers": sorted(p.name for p in plan.root.iterdir()
                                         if p.name.startswith((TMP_PREFIX, ".probe")))}

    from pipeline.cli import main  # the command line, all cached: the flags reach the executor

    res = CliRunner().invoke(main, ["run", str(work / "recipe.yaml"), "-o", str(work / "ray"), "--executor", "ray"])
    record["cli"] = {"exit_code": res.exit_code, "output": res.output}

    import pipeline.executors.ray_executor as ray_executor

    pids.unlink(missing_ok=True)  # compile asks for the GPU: each run in a worker that exits when it returns
    real_gpus_for = ray_executor.gpus_for
    ray_executor.gpus_for = lambda plan, run, cluster_gpus: 1 if run.kind == "compile" else 0
    try:
        out = execute(make_plan(recipe, work / "ray"), force={"compile"}, executor=RayExecutor())
    finally:
        ray_executor.gpus_for = real_gpus_for
    ran = [line.split() for line in pids.read_text().splitlines()]
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and any(Path(f"/proc/{pid}").exists() for _, pid, _ in ran):
        time.sleep(0.2)
    record["gpu_tasks"] = {"statuses": out.statuses, "files": _files(plan.root), "ran": [r[:2] for r in ran],
                           "threads": [r[2] for r in ran],
                           "alive": [pid for _, pid, _ in ran if Path(f"/proc/{pid}").exists()]}

    marker.unlink()  # quantize@rtn asks for the GPU and its actor dies mid-stage once: Ray restarts it, the run retries
    ray_executor.gpus_for = lambda plan, run, cluster_gpus: 1 if run.id == "quantize@rtn" else 0
    try:
        out = execute(make_plan(recipe, work / "ray"), force={"quantize@rtn"}, executor=RayExecutor())
    finally:
        ray_executor.gpus_for = real_gpus_for
    died = int(marker.read_text()) if marker.exists() else None
    record["gpu_death"] = {"statuses": out.statuses, "errors": {k: str(e) for k, e in out.errors.items()},
                           "files": _files(plan.root), "died_pid": died,
                           "leftovers": sorted(p.name for p in plan.root.iterdir() if p.name.startswith(TMP_PREFIX))}

    fail_flag.write_text("1")
    out = execute(make_plan(recipe, work / "ray"), force={"compile"}, executor=RayExecutor())
    record["failing"] = {"statuses": out.statuses, "exit_code": out.exit_code,
                         "errors": {k: [type(e).__name__, str(e), e.exit_code] for k, e in out.errors.items()},
                         "files": _files(plan.root)}

    fail_flag.unlink()
    die_flag.write_text("1")
    out = execute(make_plan(recipe, work / "ray"), force={"quantize@rtn"}, executor=RayExecutor(max_retries=1))
    record["dying"] = {"statuses": out.statuses, "errors": {k: str(e) for k, e in out.errors.items()},
                       "files": _files(plan.root), "leftovers": sorted(p.name for p in plan.root.iterdir()
                                                                       if p.name.startswith(TMP_PREFIX))}
    from pipeline.errors import StageError

    real_probe = ray_executor.probe_storage  # a node that does not see the output root
    ray_executor.probe_storage = lambda probe, token, inputs: {"node": "elsewhere", "problem": f"cannot read {probe}"}
    try:
        execute(make_plan(recipe, work / "unseen"), executor=RayExecutor())
    except StageError as e:
        record["unseen"] = {"error": str(e), "left": sorted(p.name for p in (work / "unseen" / "matrix").iterdir())}
    ray_executor.probe_storage = real_probe
    record["ray_still_up"] = ray.is_initialized()  # the executor leaves a cluster it did not start alone
    ray.shutdown()
    (work / "record.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _scenario(Path(sys.argv[1]))
    sys.exit(0)


# --- the tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    if not HAS_RAY:
        pytest.skip("ray is not installed (pip install 'quantship[ray]')")
    if not _netns_works():
        pytest.skip("cannot make a loopback-only network namespace here (unshare -rn)")
    work = tmp_path_factory.mktemp("ray-executor")
    write_recipe(work, MATRIX)
    ray_tmp = tempfile.mkdtemp(prefix="qsray-", dir="/tmp")  # Ray's unix sockets need a short path
    env = {**os.environ, "HOME": str(work), "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT),
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} {work}"
    try:
        res = subprocess.run(["unshare", "-rn", "sh", "-c", cmd], cwd=work, env=env, capture_output=True, text=True,
                             timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    record = json.loads((work / "record.json").read_text())
    record["work"] = work
    return record


def test_both_executors_write_the_same_artifacts(scenario):
    local, ray = scenario["local"], scenario["ray"]
    assert ray["keys"] == local["keys"]
    assert set(local["statuses"].values()) == {"done"} and ray["statuses"] == local["statuses"]
    assert ray["errors"] == {}
    local_files = _files(scenario["work"] / "local" / "matrix")
    assert sorted(local_files) == sorted(f"{k.split('@')[0]}-{v[:12]}" for k, v in local["keys"].items())
    assert ray["files"] == local_files  # every file of every artifact, byte for byte (sha256)


def test_pipeline_run_executor_ray_reuses_what_the_ray_run_wrote(scenario):
    cli = scenario["cli"]
    assert cli["exit_code"] == 0, cli["output"]
    root = scenario["work"] / "ray" / "matrix"
    assert f"matrix: 0 stage run(s) executed, 7 cached; outputs in {root}\n" in cli["output"]


def test_a_worker_that_dies_mid_stage_leaves_nothing_and_the_retry_completes(scenario):
    ray = scenario["ray"]
    assert ray["worker_died"]  # quantize@rtn's first worker did exit mid-stage
    assert ray["statuses"]["quantize@rtn"] == "done"
    assert ray["leftovers"] == []  # no temporary folder of the dead attempt, no probe file
    log = (scenario["work"] / "ray" / "matrix" / RUN_LOG).read_text()
    assert "quantize@rtn: removed .tmp-quantize-" in log and "left by an attempt whose worker died" in log


def test_stage_errors_come_back_typed_and_crashes_keep_their_traceback(scenario):
    failing = scenario["failing"]
    assert failing["statuses"]["compile@rtn"] == failing["statuses"]["compile@none"] == "failed"
    assert failing["statuses"]["evaluate@rtn"] == failing["statuses"]["evaluate@none"] == "skipped"
    assert failing["statuses"]["quantize@rtn"] == "cached"
    name, message, code = failing["errors"]["compile@rtn"]
    assert (name, message, code) == ("TargetUnavailable", "compile@rtn: a stand-in typed error (what, why, how to "
                                     "fix).", 1)
    name, message, _ = failing["errors"]["compile@none"]
    root = scenario["work"] / "ray" / "matrix"
    assert name == "StageError"
    assert message == (f"compile@none failed unexpectedly: ZeroDivisionError: a stand-in crash. The traceback is in "
                       f"{root / RUN_LOG}.")
    log = (root / RUN_LOG).read_text()
    assert "Traceback (most recent call last)" in log and "ZeroDivisionError: a stand-in crash" in log
    assert failing["files"] == scenario["ray"]["files"]  # a failed rerun keeps the complete artifacts as they were
    assert scenario["ray_still_up"]


# --- without a cluster -------------------------------------------------------------------------------------


def test_without_ray_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    recipe = write_recipe(tmp_path, MATRIX)
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), "--executor", "ray"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: --executor ray needs Ray, which is not installed in this Python environment (")
    assert res.output.endswith("). Ray runs the plan's independent stage runs as tasks on a local or remote Ray "
                               "cluster; it is an optional extra. Install it with `pip install 'quantship[ray]'` (it "
                               "leaves torch alone), or leave --executor out to run the stages one after another "
                               "here.\n")
    assert not (tmp_path / "out").exists()  # nothing ran


def test_address_needs_the_ray_executor(tmp_path):
    from pipeline.cli import main

    recipe = write_recipe(tmp_path, MATRIX)
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), "--address", "10.0.0.1:6379"])
    assert res.exit_code == 2
    assert res.output == ("error: --address 10.0.0.1:6379: only the Ray executor uses a cluster address. Add "
                          "--executor ray, or leave --address out.\n")


GPU_RECIPE = """\
name: gpus
model: {{source: {model}}}
calibration: {{source: {calib}, samples: 4, seq_len: 64}}
quantize: {{method: awq, device: auto}}
compile: {{target: transformers, device: auto}}
eval: {{text: {eval}, seq_len: 64, max_tokens: 512}}
matrix:
  quantize.method: [rtn, awq]
"""


def test_a_stage_asks_for_a_gpu_when_its_device_is_cuda(tmp_path):
    from pipeline.executors.ray_executor import gpus_for
    from pipeline.plan import make_plan
    from pipeline.recipe_load import load_recipe

    auto = make_plan(load_recipe(write_recipe(tmp_path, GPU_RECIPE)), tmp_path / "out")
    asks = {r.id: (gpus_for(auto, r, 0), gpus_for(auto, r, 2)) for r in auto.runs}
    assert asks == {"download": (0, 0), "calibrate": (0, 0), "quantize@rtn": (0, 0), "quantize@awq": (0, 1),
                    "compile@rtn": (0, 1), "compile@awq": (0, 1), "evaluate@rtn": (0, 1), "evaluate@awq": (0, 1)}
    text = GPU_RECIPE.replace("device: auto}}\neval", "device: cuda, tp: 2}}\neval")
    text = text.replace("device: auto", "device: cpu")
    fixed = make_plan(load_recipe(write_recipe(tmp_path, text, "fixed.yaml")), tmp_path / "out")
    asks = {r.id: gpus_for(fixed, r, 0) for r in fixed.runs}
    assert asks == {"download": 0, "calibrate": 0, "quantize@rtn": 0, "quantize@awq": 0,
                    "compile@rtn": 2, "compile@awq": 2, "evaluate@rtn": 2, "evaluate@awq": 2}


def test_the_storage_probe_names_what_a_node_cannot_see(tmp_path):
    from pipeline.executors.ray_executor import probe_storage

    probe = tmp_path / ".probe-abc"
    assert probe_storage(str(probe), "abc", [])["problem"].startswith(f"cannot read {probe} (")
    probe.write_text("other")
    wrong = f"{probe} holds another file of that name (not the driver's)"
    assert probe_storage(str(probe), "abc", [])["problem"] == wrong
    probe.write_text("abc")
    missing = str(tmp_path / "model")
    assert probe_storage(str(probe), "abc", [missing])["problem"] == f"cannot see {missing}, which the recipe reads"
    assert probe_storage(str(probe), "abc", [str(probe)])["problem"] is None
    assert len(list(tmp_path.glob(".probe-abc-*"))) == 2  # the two answers that read the right token wrote back


def test_a_worker_that_dies_on_every_attempt_fails_its_run_and_leaves_nothing(scenario):
    dying = scenario["dying"]
    assert dying["statuses"]["quantize@rtn"] == "failed"
    assert dying["statuses"]["compile@rtn"] == dying["statuses"]["evaluate@rtn"] == "skipped"
    assert dying["statuses"]["evaluate@none"] == "cached"
    assert dying["errors"]["quantize@rtn"].startswith("quantize@rtn: its Ray worker died on every one of 2 attempts (")
    assert dying["leftovers"] == []
    assert dying["files"] == scenario["ray"]["files"]  # the complete artifact of the earlier run is untouched


def test_a_node_that_cannot_see_the_output_root_stops_the_run_before_any_work(scenario):
    unseen = scenario["unseen"]
    root = scenario["work"] / "unseen" / "matrix"
    assert unseen["left"] == ["plan.json"]  # no stage ran, no probe file left behind
    prefix = f"--executor ray: Ray node 127.0.0.1 (elsewhere) cannot read {root}/.probe-"
    assert unseen["error"].startswith(prefix)
    assert unseen["error"][len(prefix) + 32:] == (
        f". Every Ray worker writes its stage's artifact into the output root ({root}) and reads its inputs from the "
        "same paths, so on a cluster of several machines the output root (and the model, calibration and eval files) "
        "must be on a shared filesystem mounted at the same path on every node: pass -o /shared/path/outputs, and "
        "keep the inputs there too.")


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'quantship[ray]')")
def test_an_address_where_nothing_answers_fails_at_once(tmp_path):
    from pipeline.cli import main

    recipe = write_recipe(tmp_path, MATRIX)
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), "--executor", "ray",
                                    "--address", "127.0.0.1:1"])
    assert res.exit_code == 1
    assert res.output.rstrip("\n") == (  # the progress display ends with a blank line
        "error: --executor ray: nothing answers at 127.0.0.1:1 (Connection refused). Pass the address of a running "
        "Ray cluster's head node (`ray start --head` prints it; port 6379 by default), or leave --address out to "
        "start a local cluster.")
    assert time.perf_counter() - t0 < 30
    assert not list((tmp_path / "out" / "matrix").glob("*-*"))  # no stage ran


def test_gpu_runs_share_one_long_lived_worker_per_gpu_that_ends_with_the_run(scenario):
    """A GPU run goes to the actor that holds that GPU (``ray_pool.GpuPool``): one process per GPU for all of them,
    so imports and CUDA's start are paid once (a fresh process per GPU task made 2 GPUs slower than one); the
    actors end when the executor closes."""
    gpu = scenario["gpu_tasks"]
    assert {k: v for k, v in gpu["statuses"].items() if k.startswith("compile@")} == {"compile@none": "done",
                                                                                      "compile@rtn": "done"}
    assert sorted(run for run, _ in gpu["ran"]) == ["compile@none", "compile@rtn"]
    assert len({pid for _, pid in gpu["ran"]}) == 1  # one GPU in the cluster: one actor ran both
    assert gpu["alive"] == []
    # Ray would set OMP_NUM_THREADS to the task's num_cpus (1); a GPU run gets its node's CPUs per GPU (2 / 1)
    assert gpu["threads"] == ["2", "2"]
    assert gpu["files"] == scenario["ray"]["files"]  # the forced compiles wrote the same artifacts


def test_a_gpu_actor_that_dies_mid_stage_is_restarted_and_the_run_retried(scenario):
    death = scenario["gpu_death"]
    assert death["died_pid"] is not None  # it did die (the hook wrote its pid, then exited)
    assert death["statuses"]["quantize@rtn"] == "done", death["errors"]
    assert death["leftovers"] == []  # the dead attempt's half-written folder was removed
    assert death["files"] == scenario["ray"]["files"]  # the retried run wrote the same artifact
