"""The local executor: each stage run runs in this process as soon as it is submitted."""

from __future__ import annotations

from typing import Any, Callable

from pipeline.plan import Plan, StageRun
from pipeline.runner import StageResult, run_stage


class LocalExecutor:
    """One stage at a time, in the driver: the runner's walk then keeps the plan's order exactly."""

    def __init__(self) -> None:
        self._done: list[StageResult] = []

    def start(self, plan: Plan) -> None:
        return None

    def submit(self, plan: Plan, run: StageRun, progress: Callable[..., Any] | None) -> None:
        self._done.append(run_stage(plan, run, progress))

    def results(self, block: bool) -> list[StageResult]:
        out, self._done = self._done, []
        return out

    def busy(self) -> bool:
        return False

    def close(self) -> None:
        return None
