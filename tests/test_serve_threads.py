"""The serving model is loaded on a thread that ends (``on_passing_thread``), so the scheduler thread's OpenMP team
is the only one the process keeps (see that function's docstring for the 2-core slowdown this avoids)."""

from __future__ import annotations

import threading

import pytest

from pipeline.errors import ModelFolderError
from pipeline.stages.serve import build_app, on_passing_thread, stop_engine
from tests.conftest import TINY_MODEL


def test_runs_on_another_thread_that_has_ended():
    seen = []
    value = on_passing_thread(lambda x, y=0: seen.append(threading.current_thread()) or x + y, 2, y=3)
    assert value == 5
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_an_exception_reaches_the_caller_as_itself():
    def fail():
        raise ModelFolderError("no config.json in /x")

    with pytest.raises(ModelFolderError, match="no config.json in /x"):
        on_passing_thread(fail)


def test_build_app_loads_the_model_off_the_calling_thread(monkeypatch):
    from pipeline.engines import transformers_engine

    threads = []
    real = transformers_engine.load_model

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers_engine, "load_model", recording)
    app = build_app(TINY_MODEL, api_key=None, model_name="t")
    try:
        assert len(threads) == 1 and threads[0] is not threading.current_thread()
        assert threads[0].name == "quantship-load" and not threads[0].is_alive()
    finally:
        stop_engine(app)
