"""Executors: where the runner's ready stage runs run. ``runner.execute`` walks the plan (dependency order,
force, skips, gates, progress) and hands each run whose inputs are finished to an executor:

    start(plan)                          connect, check what the executor needs (the local one: nothing)
    submit(plan, run, progress)          start one stage run (``runner.run_stage`` wherever it runs)
    results(block) -> [StageResult]      the runs finished since the last call; block: wait for at least one
    busy() -> bool                       whether a submitted run has not been returned yet
    close()                              release what start took

``local.LocalExecutor`` runs each stage in this process when it is submitted (one after another, in the plan's
order); ``ray_executor.RayExecutor`` runs them as Ray tasks, as many at once as the cluster's resources allow.
"""

from __future__ import annotations

EXECUTORS = ("local", "ray")


def make_executor(name: str, address: str | None = None):
    """The executor called ``name`` ('local' or 'ray'); ``address`` is the Ray cluster's (None: a new local one)."""
    if name == "ray":
        from pipeline.executors.ray_executor import RayExecutor

        return RayExecutor(address)
    from pipeline.executors.local import LocalExecutor

    return LocalExecutor()
