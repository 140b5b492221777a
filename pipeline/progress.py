"""The run's progress display (rich): one line per stage run, with its own progress bar and timing."""

from __future__ import annotations

from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class RunProgress:
    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _task(self, run, note: str = "", total: float | None = None):
        if run.id not in self.tasks:
            self.tasks[run.id] = self.progress.add_task(f"{run.id:<24}", total=total, note=note)
        return self.tasks[run.id]

    def cached(self, run) -> None:
        t = self._task(run, total=1)
        self.progress.update(t, completed=1, note=f"[dim]cached {run.dir.name}")

    def start(self, run) -> None:
        self._task(run, note=f"[dim]{run.dir.name}")

    def callback(self, run) -> Callable[..., None]:
        def update(done: int, total: int | None = None, what: str = "") -> None:
            self.progress.update(self._task(run), completed=done, total=total, note=what)

        return update

    def finish(self, run, seconds: float) -> None:
        t = self._task(run)
        total = self.progress.tasks[t].total or 1
        self.progress.update(t, total=total, completed=total, note=f"done in {seconds:.1f}s")

    def fail(self, run) -> None:
        self.progress.update(self._task(run), note="[red]failed")
        self.progress.stop_task(self._task(run))
