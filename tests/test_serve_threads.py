"""How the embedded server is set up: the serving model is loaded on a thread that ends (``on_passing_thread``), so
the scheduler thread's OpenMP team is the only one the process keeps (see that function's docstring for the 2-core
slowdown this avoids); the serve stage's smoke test decodes eagerly under ``decode: auto``."""

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


class _Stop(Exception):
    pass


@pytest.mark.parametrize("decode, expected", [("auto", "eager"), ("graphs+compile", "graphs+compile")])
def test_the_smoke_test_decodes_eagerly_under_auto(tmp_path, monkeypatch, decode, expected):
    """A smoke test's few tokens never repay CUDA graphs + torch.compile (10-20 s per 8B variant on an H200): under
    ``decode: auto`` the serve stage's server decodes eagerly; an explicit choice is kept."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from pipeline.recipe import ServeSection
    from pipeline.stages import serve as serve_stage

    seen = {}

    @contextmanager
    def capture(*args, limits=None, **kwargs):
        seen.update(limits)
        raise _Stop
        yield  # pragma: no cover

    monkeypatch.setattr(serve_stage, "running_server", capture)
    ctx = SimpleNamespace(config=ServeSection(decode=decode), inputs={"compile": tmp_path}, out=tmp_path,
                          log=None, progress=lambda *a: None)
    with pytest.raises(_Stop):
        serve_stage.run(ctx)
    assert seen["decode"] == expected
    assert ServeSection(decode=decode).engine_limits()["decode"] == decode  # the recipe's own value is untouched
