"""One long-lived Ray actor per GPU that runs the plan's single-GPU stage runs one after another.

Why not a task per run: a Ray task that asks for a GPU gets a fresh worker process (``max_calls=1``, so that what
a stage leaves on the GPU goes with it and CUDA never sees a second task's GPU). On the lent 2 x H200 machine that
made the 8B four-variant plan *slower* than one GPU (214.6 s against 127.9 s, bench/RESULTS.md): every GPU stage
paid the imports of torch and transformers, CUDA's start and cold kernel caches again (a smoke-served variant
33-37 s in its own process against 2.5-16 s in the local executor's). An actor is Ray's long-lived worker: it
holds its GPU for its life, so CUDA's view of the device never changes, and it pays the start once (``warm``,
while download and calibrate still run). Between runs it drops what the stage left (``gc``, then the CUDA caching
allocator's free blocks), as the local executor's single process does between its stages.

Retries: an actor that dies mid-stage is restarted by Ray and the run is retried on it (``max_restarts``,
``max_task_retries``); the new attempt first removes the earlier attempt's temporary folder
(``ray_executor.run_in_worker``). An actor that cannot be restarted is dropped and a new one started for the runs
still waiting.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any


class StageWorker:
    """The actor (made remote by ``GpuPool``): runs stage runs on the GPU Ray gave it, one at a time."""

    def warm(self) -> int:
        """Import what every GPU stage imports and start CUDA and cuBLAS, before the first run arrives (on the
        lent H200's image ``from transformers import AutoTokenizer`` alone took 7.6 s); the pid back."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - imported for the stages

        import pipeline.engines.transformers_engine  # noqa: F401
        import pipeline.runner  # noqa: F401

        if torch.cuda.is_available():
            a = torch.ones(8, 8, device="cuda")
            (a @ a).sum().item()  # the context, the caching allocator and a cuBLAS handle
        return os.getpid()

    def run(self, plan, run_id: str, threads: int | None) -> dict[str, Any]:
        from pipeline.executors.ray_executor import run_in_worker
        from pipeline.resources import free_memory

        try:
            return run_in_worker(plan, run_id, threads)
        finally:
            free_memory()  # what the stage left: collected, the CUDA caching allocator's free blocks returned


class GpuPool:
    """Up to ``size`` ``StageWorker`` actors of one GPU each; runs wait in order for a free one."""

    def __init__(self, ray: Any, size: int, max_retries: int) -> None:
        self.ray, self.size, self.max_retries = ray, size, max_retries
        self._actor_class = ray.remote(StageWorker)
        self._idle: deque = deque()
        self._actors: list = []
        self._waiting: deque = deque()  # (plan_ref, run_id, threads)
        self.running: dict[Any, tuple[str, Any]] = {}  # ObjectRef -> (run id, actor)
        for _ in range(size):
            self._add_actor()

    def _add_actor(self) -> None:
        actor = self._actor_class.options(num_cpus=1, num_gpus=1, max_restarts=self.max_retries,
                                          max_task_retries=self.max_retries).remote()
        actor.warm.remote()  # queued before any run: the imports and CUDA's start overlap the CPU stages
        self._actors.append(actor)
        self._idle.append(actor)

    def submit(self, plan_ref: Any, run_id: str, threads: int | None) -> None:
        self._waiting.append((plan_ref, run_id, threads))
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiting and not self._idle and len(self._actors) < self.size:
            self._add_actor()  # one was dropped (died for good): replace it for the runs still waiting
        while self._waiting and self._idle:
            plan_ref, run_id, threads = self._waiting.popleft()
            actor = self._idle.popleft()
            self.running[actor.run.remote(plan_ref, run_id, threads)] = (run_id, actor)

    def finished(self, ref: Any, actor_dead: bool) -> None:
        """``ref``'s run came back: its actor takes the next waiting run, or is dropped if it died for good."""
        _, actor = self.running.pop(ref)
        if actor_dead:
            self._actors.remove(actor)
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        else:
            self._idle.append(actor)
        self._dispatch()

    def busy(self) -> bool:
        return bool(self.running or self._waiting)

    def close(self) -> None:
        self.running.clear()  # killing an actor ends the run on it (Ray cannot force-cancel an actor's call)
        self._waiting.clear()
        for actor in self._actors:
            self.ray.kill(actor)
        self._actors.clear()
        self._idle.clear()
