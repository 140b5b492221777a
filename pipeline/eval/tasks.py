"""Task accuracy through lm-eval (the ``[eval]`` extra), run in process on the deployable model.

``run_tasks(model, tokenizer, ["pydocs_cloze", ...])`` evaluates lm-eval tasks against anything
``model(input_ids) -> logits`` (``pipeline.eval.perplexity.model_logits``: a transformers model, or the
logits callable of an engine's runtime that ``pipeline.stages.compile.load_for_eval`` returns) through
``LogitsLM``, an ``lm_eval.api.model.LM`` subclass. Tasks are looked up among lm-eval's own and the shipped
ones in ``data/tasks/`` (``TaskManager(include_path=...)``, plus any ``include_paths`` given); the shipped
``pydocs_cloze`` needs no download.

Request semantics follow lm-eval 0.4.13's ``HFLM`` (lm_eval/models/huggingface.py, ``_encode_pair`` and
``_loglikelihood_tokens``): the continuation's tokens are ``tok(context + continuation)`` minus the
``tok(context)`` prefix (trailing spaces of the context move to the continuation); every request starts with
the prefix token (BOS, else EOS: ``perplexity.prefix_token_id``), as our perplexity stream does; inputs are
left-truncated to ``max_length``; ``(sum of continuation log-probs, all continuation tokens greedy)``.
``loglikelihood_rolling`` scores a whole text with the perplexity protocol's windows
(``perplexity.window_spans``). ``generate_until`` is greedy and only for transformers models.

Returned per task: ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", ..., "n", "chance", "version"}``;
``chance`` is the expected accuracy of a uniform guess (mean over documents of 1/choices) for
multiple-choice tasks. The stderr is lm-eval's (sample standard deviation / sqrt(n) for ``mean``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import RecipeError, StageError
from pipeline.eval.perplexity import iter_window_logprobs, model_device, model_logits, prefix_token_id, window_spans

log = logging.getLogger(__name__)

from pipeline.textdata import SHIPPED_TASKS  # noqa: E402  (one definition, light to import)


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise RecipeError(
            "eval.tasks needs lm-eval, which is not installed (" + str(e) + "). It is part of the [eval] extra: "
            "pip install -e '.[eval]' (it leaves torch alone), or remove eval.tasks from the recipe."
        ) from None
    return LM


def make_lm(model: Any, tokenizer: Any, max_length: int = 2048, batch_size: int = 8) -> Any:
    """An lm-eval ``LM`` over ``model`` (see the module docstring)."""
    LM = _lm_base()

    class LogitsLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.max_length, self.batch_size = max_length, batch_size
            self.prefix = prefix_token_id(tokenizer)
            self.device_ = model_device(model)

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

        def _encode(self, text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False)) if text else []

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
            whole, ctx = self._encode(context + continuation), self._encode(context)
            if whole[: len(ctx)] != ctx:  # the boundary merged into one token: encode the parts apart
                return ctx, self._encode(continuation)
            return ctx, whole[len(ctx):]

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = []
            for req in requests:
                context, continuation = req.args
                ctx, cont = self._encode_pair(context, continuation)
                if not cont:
                    raise StageError(f"lm-eval asked for the likelihood of an empty continuation after {context[-40:]!r}.")
                pre = [self.prefix] if self.prefix is not None else []
                pairs.append((pre + ctx, cont))
            return score_continuations(model, pairs, self.max_length, self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                ids = self._encode(req.args[0])
                if self.prefix is not None:
                    ids.insert(0, self.prefix)
                ids_t = torch.tensor(ids, dtype=torch.long)
                total = 0.0
                for _w, lp, targets in iter_window_logprobs(model, ids_t, window_spans(len(ids), self.max_length), 1):
                    total += float(lp.gather(-1, targets[:, None]).double().sum())
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            if not (hasattr(model, "generate") and hasattr(model, "config")):
                raise StageError(
                    "This task generates text (lm-eval generate_until), which quantship runs only on transformers "
                    f"models; the deployable model here is a {type(model).__name__}. Use a loglikelihood task "
                    "(multiple choice, perplexity) for this target, or evaluate the transformers target."
                )
            out = []
            for req in requests:
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                pre = [self.prefix] if self.prefix is not None else []
                ids = torch.tensor([(pre + self._encode(context))[-self.max_length:]], device=self.device_)
                with torch.no_grad():
                    gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=max_new, pad_token_id=getattr(tokenizer, "pad_token_id", None))
                text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                out.append(text)
            return out

    return LogitsLM()


def score_continuations(model: Any, pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                        batch_size: int = 8) -> list[tuple[float, bool]]:
    """``(sum log P(cont | ctx), every cont token is the argmax)`` per ``(ctx ids, cont ids)`` pair.

    Input ``(ctx + cont)[:-1]`` left-truncated to ``max_length``; right padding (causal models never look
    ahead, so padding after the last real token changes nothing before it); longest first, in batches.
    """
    device = model_device(model)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[:-1][-max_length:] for i in idx]
        width = max(len(s) for s in seqs)
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            batch[r, : len(s)] = torch.tensor(s)
        with torch.no_grad():
            logprobs = torch.log_softmax(model_logits(model, batch.to(device)).float(), dim=-1).cpu()
        for r, i in enumerate(idx):
            cont = pairs[i][1]
            n = len(seqs[r])
            lp = logprobs[r, n - len(cont) : n]
            target = torch.tensor(cont)
            results[i] = (float(lp.gather(-1, target[:, None]).double().sum()), bool((lp.argmax(-1) == target).all()))
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def quiet_lm_eval(*bar_modules: str) -> Iterator[None]:
    """lm-eval's info logs, per-task warnings and tqdm bars stay out of our terminal (they go to debug): the bar
    lm-eval 0.4.13 draws building requests (``lm_eval.api.task``) and those of ``bar_modules`` (e.g. the API
    model's "Requesting API" bar in ``lm_eval.models.api_models``)."""
    import functools
    import importlib

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    modules = [importlib.import_module(n) for n in ("lm_eval.api.task", *bar_modules)]
    bars = [getattr(m, "tqdm", None) for m in modules]
    for m, bar in zip(modules, bars):
        if bar is not None:
            m.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        for m, bar in zip(modules, bars):
            if bar is not None:
                m.tqdm = bar
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 6) if math.isfinite(x) else None
    return x


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], limit: int | None = None,
              include_paths: Sequence[Path | str] = (), max_length: int = 2048, batch_size: int = 8,
              num_fewshot: int | None = None) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on ``model``; ``{task: {metric: value, metric + "_stderr": ..., "n", "chance"}}``."""
    lm = make_lm(model, tokenizer, max_length=max_length, batch_size=batch_size)
    return run_lm_tasks(lm, tasks, limit=limit, include_paths=include_paths, num_fewshot=num_fewshot)


def run_lm_tasks(lm: Any, tasks: Sequence[str], limit: int | None = None, include_paths: Sequence[Path | str] = (),
                 num_fewshot: int | None = None) -> dict[str, dict[str, Any]]:
    """``run_tasks`` on any lm-eval ``LM``: ours in process (``make_lm``), or lm-eval's ``local-completions``
    over a deployed endpoint (``pipeline.eval.endpoint.endpoint_lm``)."""
    _lm_base()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        manager = TaskManager(include_path=[str(SHIPPED_TASKS), *map(str, include_paths)])
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise RecipeError(
                f"eval.tasks names {', '.join(unknown)}, which lm-eval does not know (neither its own tasks nor "
                f"those in {SHIPPED_TASKS}). Check the spelling (`lm-eval ls tasks` lists them) or drop the name."
            )
        results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                  num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=1000,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    out: dict[str, dict[str, Any]] = {}
    for name in tasks:
        row = results["results"].get(name, {})
        scores: dict[str, Any] = {}
        for key, value in row.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, _filter = key.partition(",")
            scores[metric] = _clean(float(value))
        samples = results.get("samples", {}).get(name, [])
        scores["n"] = len(samples) or results.get("n-samples", {}).get(name, {}).get("effective")
        choices = [len(s["arguments"]) for s in samples if s.get("arguments")]
        if choices and results["configs"].get(name, {}).get("output_type") == "multiple_choice":
            scores["chance"] = round(sum(1.0 / c for c in choices) / len(choices), 6)
        scores["version"] = results.get("versions", {}).get(name)
        out[name] = scores
    return out
