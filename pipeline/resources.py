"""Peak host and GPU memory of a stretch of work in this process: ``with measure() as m: ...; m.figures``.

Host: the resident set's high-water mark (``VmHWM`` of /proc/self/status), reset at the start by writing ``5`` to
/proc/self/clear_refs (Linux >= 4.0, ``Documentation/admin-guide/mm/soft-dirty.rst``: "reset the peak resident
set size"), so a stage's figure is its own and not the process's history. Where that reset is refused, a thread
samples ``VmRSS`` every 20 ms instead and the figure says ``sampled``. GPU: torch's caching allocator's peak
(``max_memory_allocated``) and reserved peak, reset at the start; absent when CUDA was never initialised.

The runner wraps every stage function with it and writes ``peak_rss_bytes`` and ``peak_gpu_bytes`` into the
stage's manifest (runner.run_stage; not part of the cache key); the benchmarks wrap stage functions with it too
(bench/scale_gpu.py).
"""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), rss_bytes()
    return hwm is not None and rss is not None and hwm <= rss + (64 << 20)


def _cuda():
    import sys

    torch = sys.modules.get("torch")  # never import torch (or start CUDA) just to measure
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


class Measure:
    def __init__(self) -> None:
        self.figures: dict[str, object] = {}
        self._stop = threading.Event()
        self._sampled = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._sampled = max(self._sampled, rss_bytes() or 0)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._hwm_ok = reset_peak_rss()
        if not self._hwm_ok:
            self._sampled = rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        torch = _cuda()
        if torch is not None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict[str, object]:
        torch = _cuda()
        if torch is not None:
            torch.cuda.synchronize()
            self.figures["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
            self.figures["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.figures["peak_rss_bytes"] = max(self._sampled, rss_bytes() or 0)
            self.figures["peak_rss_how"] = "sampled every 20 ms"
        else:
            self.figures["peak_rss_bytes"] = _status_bytes("VmHWM")
            self.figures["peak_rss_how"] = "VmHWM, reset at start"
        self.figures["seconds"] = round(time.perf_counter() - self._t0, 3)
        return self.figures


@contextmanager
def measure() -> Iterator[Measure]:
    """Peak RSS and GPU memory of the ``with`` block (``.figures`` filled when it ends, also on an error)."""
    m = Measure()
    m.start()
    try:
        yield m
    finally:
        m.stop()


def free_memory() -> None:
    """Collect unreachable objects (reference cycles keep models alive past their last use) and hand the CUDA
    caching allocator's free blocks back to the driver where CUDA is initialised, so the next stage of a long-lived
    process (``pipeline run``) starts from what is really still in use. Stages call it once their models are out
    of scope (``pipeline.stages.evaluate``, ``serve``, ``compile``)."""
    import gc

    gc.collect()
    torch = _cuda()
    if torch is not None:
        torch.cuda.empty_cache()


def drop_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames in ``exc``'s traceback (their line numbers stay, so it
    still prints): an exception kept by the caller (the runner records each stage's error) must not keep the
    failed stage's models alive through its frames."""
    import traceback

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # and the exceptions it was raised from or during
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def releases_models(stage: Callable[[Any], dict]) -> Callable[[Any], dict]:
    """A stage function that, when it returns or raises, references no model it loaded any more and hands the
    freed memory back (:func:`free_memory`): the next stage of ``pipeline run`` runs in this process. Its error's
    frames are cleared first (:func:`drop_frames`), because the runner keeps the error."""

    @functools.wraps(stage)
    def run(ctx: Any) -> dict:
        try:
            return stage(ctx)
        except BaseException as e:
            drop_frames(e)
            raise
        finally:
            free_memory()

    return run
