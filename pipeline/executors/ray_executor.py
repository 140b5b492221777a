"""The Ray executor: the plan's independent stage runs (matrix variants, their evaluations) as Ray tasks.

``pipeline run recipe.yaml --executor ray [--address ADDRESS]``. The runner's walk is the local one
(``runner.execute``); this executor only decides where a ready run runs: a Ray task that calls the same
``runner.run_stage`` in a worker process, so the cache keys, the temporary folder renamed into place and the
manifest are the local executor's. Each task asks for what its stage uses: one GPU (``compile.tp`` GPUs for the
engine stages) when the stage's device is CUDA (calibrated quantization, bitsandbytes, compile, evaluate and
serve on a CUDA target; ``auto`` counts as CUDA when the cluster has GPUs, as it resolves on a GPU worker),
one CPU otherwise. Ray hides the GPUs from a task that asks for none, so a stage that would pick CUDA must ask.
On a cluster without GPUs no task asks for one, and each stage does what it does on a machine without one.

Storage: every worker writes its artifact into the output root and reads its inputs (upstream artifacts, the
model folder, calibration and eval text) from the same absolute paths. On one machine that holds as is; on a
cluster of several machines the output root and the inputs must be on a shared filesystem mounted at the same
path on every node. ``start`` checks it before any work: a task on every live node reads a probe file the
driver wrote and writes one back; a node that cannot gets a clear error.

A worker that dies mid-stage (killed, out of memory, its node lost) leaves only its temporary folder, never a
folder with a manifest; Ray runs the task again (``max_retries``), and the new attempt first removes the
temporary folders that earlier attempts of the same run left. Typed errors (``QuantshipError``) come back as
their class name and message; a crash's traceback is in ``<root>/run.log``, which workers append to.

GPU runs: a run that asks for one GPU runs on a long-lived actor that holds one GPU (``ray_pool.GpuPool``: one
per GPU of the cluster, at most one per such run), so the imports, CUDA's start and warm caches are paid once per
GPU, not once per stage; between runs the actor frees what the stage left. Where a run asks for several GPUs
(``compile.tp``) actors holding single GPUs could starve it, so such a plan runs every GPU run as a task in a fresh
worker process that exits when it returns (``max_calls=1``). CPU tasks reuse workers.

Read against ray 2.60.0 (``ray.init``, ``ray.remote(max_calls=...)``, ``.options(num_cpus, num_gpus, max_retries)``,
``ray.wait``, ``ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy``, ``ray.nodes``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from pipeline.artifacts import RUN_LOG, tmp_dirs_of
from pipeline.errors import QuantshipError, RecipeError, StageError
from pipeline.plan import Plan, StageRun, variant_recipe

log = logging.getLogger("pipeline")

INSTALL_HINT = "pip install 'quantship[ray]'"
MAX_RETRIES = 3  # attempts after a worker dies mid-stage (Ray's max_retries; a stage's own error is not retried)
PROBE_TIMEOUT_S = 120


def import_ray() -> Any:
    """``ray``, or the error that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RecipeError(
            f"--executor ray needs Ray, which is not installed in this Python environment ({e}). Ray runs the "
            f"plan's independent stage runs as tasks on a local or remote Ray cluster; it is an optional extra. "
            f"Install it with `{INSTALL_HINT}` (it leaves torch alone), or leave --executor out to run the stages "
            "one after another here."
        ) from None
    return ray


def gpus_for(plan: Plan, run: StageRun, cluster_gpus: float) -> int:
    """GPUs a stage run's task asks for: its stage's device is CUDA (``auto``: when the cluster has GPUs, or the
    target runs on CUDA only)."""
    from pipeline.targets import METHODS_NEEDING_CALIBRATION, TARGETS

    recipe = variant_recipe(plan, run)
    if run.kind == "quantize":
        q = recipe.quantize
        if q.method not in METHODS_NEEDING_CALIBRATION and not q.method.startswith("bnb-"):
            return 0  # none, rtn, fp8: a streaming rewrite on the CPU
        return 1 if q.device == "cuda" or (q.device == "auto" and cluster_gpus > 0) else 0
    if run.kind in ("compile", "evaluate", "serve"):
        c = recipe.compile
        devices = TARGETS[c.target].devices
        cuda = c.device == "cuda" or (c.device == "auto" and "cuda" in devices
                                      and (cluster_gpus > 0 or devices[0] == "cuda"))
        return c.tp if cuda else 0
    return 0


def _inputs_to_see(plan: Plan) -> list[str]:
    """Local files and folders the recipe reads (model folders, calibration and eval text): workers need them."""
    paths: set[str] = set()
    for r in plan.recipe.variants.values():
        sources = [r.model.source, r.calibration.source if r.calibration else None, r.eval.text if r.eval else None]
        for s in sources:
            if s and plan.recipe.resolve(s).exists():
                paths.add(str(plan.recipe.resolve(s)))
    return sorted(paths)


# --- in the worker -----------------------------------------------------------------------------------------


_worker_log: list[logging.FileHandler] = []  # this worker process's handler (Ray reuses a worker across runs)


def _log_to(run_log: Path) -> None:
    """Stage log lines (and a crash's traceback) go to this plan's run.log, appended beside the driver's."""
    root = logging.getLogger("pipeline")
    root.setLevel(logging.DEBUG)
    if _worker_log and _worker_log[0].baseFilename == os.path.abspath(run_log):
        return
    for old in _worker_log:  # the run.log of another plan this worker ran a stage of
        root.removeHandler(old)
        old.close()
    _worker_log.clear()
    fh = logging.FileHandler(run_log, encoding="utf-8")
    fh.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s [ray worker {socket.gethostname()}:{os.getpid()}]: %(message)s"))
    fh.setLevel(logging.DEBUG)
    root.addHandler(fh)
    _worker_log.append(fh)


def remove_attempt_leftovers(run: StageRun) -> list[Path]:
    """Temporary folders of earlier attempts of this run (a worker that died mid-stage). Only one attempt of a
    task runs at a time, so any such folder is dead, whichever machine wrote it (``clean_stale`` leaves another
    host's alone)."""
    removed = []
    for p in tmp_dirs_of(run.dir):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def run_in_worker(plan: Plan, run_id: str, threads: int | None = None) -> dict[str, Any]:
    """The Ray task: one stage run through ``runner.run_stage``; plain data back (status, seconds, error).

    ``threads``: the CPU threads the stage's torch may use. Ray sets ``OMP_NUM_THREADS`` to a task's ``num_cpus``
    (1), which made the CPU side of GPU stages (packing, the checkpoint writer, tokenising) 1.4-2x slower on the
    lent 2 x H200 machine (bench/RESULTS.md, "Ray over two GPUs"); a GPU task gets its node's CPUs per GPU."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:  # a reused worker: the variable is read once, at torch's import
            sys.modules["torch"].set_num_threads(threads)
    from pipeline.runner import run_stage

    run = plan.run(run_id)
    _log_to(plan.root / RUN_LOG)
    for p in remove_attempt_leftovers(run):
        log.info("%s: removed %s, left by an attempt whose worker died", run_id, p.name)
    result = run_stage(plan, run)
    error = None
    if result.error is not None:
        error = {"type": type(result.error).__name__, "message": str(result.error),
                 "exit_code": result.error.exit_code}
    return {"run_id": result.run_id, "status": result.status, "seconds": result.seconds, "error": error}


def probe_storage(probe: str, token: str, inputs: list[str]) -> dict[str, Any]:
    """On one node: read the driver's probe file, write one back, and check the recipe's inputs are there."""
    node = socket.gethostname()
    try:
        seen = Path(probe).read_text()
    except OSError as e:
        return {"node": node, "problem": f"cannot read {probe} ({e.strerror or e})"}
    if seen != token:
        return {"node": node, "problem": f"{probe} holds another file of that name (not the driver's)"}
    try:
        Path(f"{probe}-{uuid.uuid4().hex[:8]}").write_text(node)
    except OSError as e:
        return {"node": node, "problem": f"cannot write into {Path(probe).parent} ({e.strerror or e})"}
    missing = [p for p in inputs if not Path(p).exists()]
    if missing:
        return {"node": node, "problem": f"cannot see {missing[0]}, which the recipe reads"}
    return {"node": node, "problem": None}


# --- in the driver -----------------------------------------------------------------------------------------


def _error_from(wire: dict[str, Any]) -> QuantshipError:
    """A worker's typed error back as its class (from pipeline.errors), else a StageError with its exit code."""
    import pipeline.errors as errors

    cls = getattr(errors, wire["type"], None)
    if isinstance(cls, type) and issubclass(cls, QuantshipError):
        return cls(wire["message"])
    e = StageError(wire["message"])
    e.exit_code = wire["exit_code"]
    return e


class RayExecutor:
    """Ready stage runs as Ray tasks on the cluster at ``address`` (None: a new local one, or RAY_ADDRESS)."""

    def __init__(self, address: str | None = None, max_retries: int = MAX_RETRIES) -> None:
        self.ray = import_ray()
        self.address = address
        self.max_retries = max_retries
        self._owns = False
        self._running: dict[Any, str] = {}  # ObjectRef -> run id
        self._plan: Plan | None = None
        self._plan_ref: Any = None
        self._gpus = 0.0  # the most GPUs one node has: a task's GPUs must all be on one node
        self._cpus_per_gpu = 1.0  # the CPU threads a GPU task's torch may use, per GPU it holds
        self._failed_now: list[Any] = []
        self._pool = None  # GpuPool: the single-GPU runs' actors

    def start(self, plan: Plan) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
            if self.address is None and not os.environ.get("RAY_ADDRESS"):
                kwargs["include_dashboard"] = False
            if self.address:
                _check_reachable(self.address)
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
                raise StageError(
                    f"--executor ray: cannot connect to {where}: {e}. Start one with `ray start --head` on the "
                    "head node (and `ray start --address HEAD:6379` on the others) and pass its address with "
                    "--address, or leave --address out to start a local one."
                ) from None
            self._owns = True
        alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self._gpus = max((r.get("GPU", 0.0) for r in alive), default=0.0)
        self._cpus_per_gpu = min((r.get("CPU", 1.0) / r["GPU"] for r in alive if r.get("GPU")), default=1.0)
        try:
            self._check_shared_storage(plan)
        except BaseException:
            self.close()
            raise
        # Workers may start elsewhere: the recipe's relative paths resolve against its absolute location.
        shipped = dataclasses.replace(plan, recipe=plan.recipe.model_copy(update={"path": plan.recipe.path.resolve()}))
        self._plan, self._plan_ref = plan, ray.put(shipped)
        self._task = ray.remote(run_in_worker)
        # A task that asks for GPUs runs in a worker that exits when it returns (max_calls=1): what the stage left on
        # the GPU (the caching allocator's blocks, a model a module still references) is freed with the process, and
        # no later task runs in a process whose CUDA was initialised for another task's GPU (CUDA reads
        # CUDA_VISIBLE_DEVICES once). Ray 2.60 sets max_calls=1 itself only for a function declared with num_gpus
        # (remote_function.py), and .options() cannot set it, so GPU runs go through a second remote function.
        self._gpu_task = ray.remote(max_calls=1)(run_in_worker)
        self._pool = self._gpu_pool(plan, alive)
        log.info("ray executor: %s, resources %s", self.address or "local cluster", ray.cluster_resources())

    def _check_shared_storage(self, plan: Plan) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        plan.root.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        probe = plan.root / f".probe-{token}"
        probe.write_text(token)
        task = ray.remote(probe_storage)
        inputs = _inputs_to_see(plan)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = [task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(probe), token, inputs) for n in nodes]
            answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.RayError as e:
            raise StageError(
                f"--executor ray: the storage probe did not finish on every Ray node within {PROBE_TIMEOUT_S} s "
                f"({type(e).__name__}: {_first_line(e)}). Each node must run a small task that reads a file in the "
                f"output root ({plan.root}); check that every node is up (`ray status`) and has quantship installed."
            ) from None
        finally:
            for p in plan.root.glob(f".probe-{token}*"):
                p.unlink(missing_ok=True)
        for node, answer in zip(nodes, answers):
            if answer["problem"]:
                raise StageError(
                    f"--executor ray: Ray node {node.get('NodeManagerAddress')} ({answer['node']}) "
                    f"{answer['problem']}. Every Ray worker writes its stage's artifact into the output root "
                    f"({plan.root}) and reads its inputs from the same paths, so on a cluster of several machines "
                    "the output root (and the model, calibration and eval files) must be on a shared filesystem "
                    "mounted at the same path on every node: pass -o /shared/path/outputs, and keep the inputs "
                    "there too."
                )

    def submit(self, plan: Plan, run: StageRun, progress: Callable[..., Any] | None) -> None:
        from pipeline.runner import StageResult

        # No GPU anywhere: ask for none, and the stage does what it does on a machine without one (as locally).
        gpus = gpus_for(plan, run, self._gpus) if self._gpus else 0
        if gpus > self._gpus:
            error = StageError(
                f"{run.id} runs on CUDA and needs {gpus} GPU(s) on one node (compile.tp), but the largest node of the "
                f"Ray cluster has {self._gpus:g}. Lower compile.tp, or add a node with {gpus} GPUs to the cluster."
            )
            self._failed_now.append(StageResult(run.id, "failed", error=error))
            return
        threads = max(1, int(self._cpus_per_gpu * gpus)) if gpus else None
        if gpus == 1 and self._pool is not None:
            self._pool.submit(self._plan_ref, run.id, threads)
            return
        task = self._gpu_task if gpus else self._task
        ref = task.options(num_cpus=1, num_gpus=gpus, max_retries=self.max_retries, retry_exceptions=False,
                           name=run.id).remote(self._plan_ref, run.id, threads)
        self._running[ref] = run.id

    def results(self, block: bool) -> list[Any]:
        from pipeline.runner import StageResult

        out, self._failed_now = self._failed_now, []
        pooled = self._pool.running if self._pool is not None else {}
        refs = list(self._running) + list(pooled)
        if not refs:
            return out
        if block and not out:
            self.ray.wait(refs, num_returns=1)
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            run_id = self._running.pop(ref) if ref in self._running else pooled[ref][0]
            try:
                wire = self._fetch(ref, ref in pooled)
            except self.ray.exceptions.RayTaskError as e:  # raised outside the stage (a stage's own errors return)
                cause = getattr(e, "cause", None) or e
                out.append(StageResult(run_id, "failed", error=StageError(
                    f"{run_id} failed in its Ray worker before or after the stage ran: {type(cause).__name__}: "
                    f"{_first_line(cause)}. The traceback is in the worker's log (Ray's session folder, "
                    "logs/worker-*); a worker whose quantship or ray version differs from the driver's is the usual "
                    "cause."
                )))
                continue
            except self.ray.exceptions.RayError as e:  # the worker died on every attempt, or the task was lost
                remove_attempt_leftovers(self._plan.run(run_id))
                out.append(StageResult(run_id, "failed", error=StageError(
                    f"{run_id}: its Ray worker died on every one of {self.max_retries + 1} attempts "
                    f"({type(e).__name__}: {_first_line(e)}). Nothing of it was kept. Look at the workers' logs "
                    "(Ray's session folder, logs/worker-*) for the cause: out of memory is the usual one."
                )))
                continue
            error = _error_from(wire["error"]) if wire["error"] else None
            out.append(StageResult(run_id, wire["status"], wire["seconds"], error))
        return out

    def _fetch(self, ref: Any, pooled: bool) -> dict[str, Any]:
        """A finished run's answer; a pooled run's actor then takes the next waiting run (or is dropped if it
        died for good: the error still reaches the caller)."""
        if not pooled:
            return self.ray.get(ref)
        try:
            wire = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            self._pool.finished(ref, actor_dead=True)
            raise
        except self.ray.exceptions.RayError:
            self._pool.finished(ref, actor_dead=False)
            raise
        self._pool.finished(ref, actor_dead=False)
        return wire

    def _gpu_pool(self, plan: Plan, alive: list[dict]):
        """The actors for the plan's single-GPU runs, or None (no GPUs, no such run, or a multi-GPU run)."""
        from pipeline.executors.ray_pool import GpuPool

        if not self._gpus:
            return None
        wants = [gpus_for(plan, r, self._gpus) for r in plan.runs]
        gpus_in_cluster = int(sum(r.get("GPU", 0.0) for r in alive))
        if max(wants, default=0) != 1 or not gpus_in_cluster:
            return None
        return GpuPool(self.ray, min(wants.count(1), gpus_in_cluster), self.max_retries)

    def busy(self) -> bool:
        return bool(self._running or self._failed_now or (self._pool is not None and self._pool.busy()))

    def close(self) -> None:
        for ref in list(self._running):  # interrupted: stop what still runs (its temporary folders stay dead)
            self.ray.cancel(ref, force=True)
        self._running.clear()
        if self._pool is not None:  # its actors (and a run still on one) end with it
            self._pool.close()
            self._pool = None
        if self._owns:
            self.ray.shutdown()
            self._owns = False


def _check_reachable(address: str) -> None:
    """A host:port address answers (Ray itself would retry a dead one for minutes); 'auto' and such pass."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise StageError(
            f"--executor ray: nothing answers at {address} ({e.strerror or e}). Pass the address of a running Ray "
            "cluster's head node (`ray start --head` prints it; port 6379 by default), or leave --address out to "
            "start a local cluster."
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
