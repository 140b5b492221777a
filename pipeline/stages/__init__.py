"""Stages: one ``run(ctx) -> dict`` each (the dict is the stage's metrics, stored in its manifest).

A stage is a plain function: its step config, its input artifacts and a (temporary) output folder in, files
in that folder and metrics out. The runner owns caching, temp folders, manifests and progress.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def _no_progress(done: int, total: int | None = None, what: str = "") -> None:
    return None


@dataclass
class StageContext:
    run_id: str  # e.g. "quantize@rtn"
    config: Any  # this stage's typed recipe section (after matrix overrides)
    recipe: Any  # read-only view: .variant (the typed Recipe of this matrix variant), .resolve(path)
    inputs: dict[str, Path]  # upstream stage kind -> its complete artifact folder
    out: Path  # the temporary folder to write into; renamed into place by the runner
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pipeline"))
    progress: Callable[..., None] = _no_progress  # progress(done, total, what)
