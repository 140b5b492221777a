"""Evaluation through a deployed model's OpenAI-compatible endpoint (``eval.through: endpoint``).

Plain functions over a base URL (``http://host:port``, OpenAI routes under ``/v1``), so the figures are those of
what is deployed, the engine's request handling, chat template and detokenizer included:

- **Perplexity** from prompt log-probs: each window of the perplexity protocol (``perplexity.window_spans``) is
  one ``POST /v1/completions`` whose prompt is the window's *token ids* (so tokenization is ours, identical to
  the in-process figure's) plus its last target, with ``echo: true, logprobs: 1, max_tokens: 1,
  temperature: 0`` -- the request lm-eval's ``local-completions`` sends for loglikelihood
  (lm_eval/models/openai_completions.py ``LocalCompletionsAPI._create_payload``, 0.4.13; ``max_tokens: 1``
  because vLLM refuses 0 and llama-cpp-python reads 0 as "no limit"). ``token_logprobs[j]`` is
  ``log P(prompt[j] | prompt[:j])`` (the first is null), so the window's targets are positions
  ``1 + first_scored ..`` of the echo; the NLL is summed in float64 as ``perplexity.perplexity`` does.
- **Sanity**: the prompt set's messages through ``POST /v1/chat/completions`` (the *server's* chat template),
  greedy (``temperature: 0``), ``max_tokens`` = the sanity limit. The reply is text; its tokens are the text
  re-tokenized with the model's tokenizer, plus an EOS when ``finish_reason`` is ``stop`` (no stop strings are
  sent, so ``stop`` means end of sequence). The reference's generations are scored the same way
  (``as_text_tokens``), so an identical deployment scores exactly the reference's figures.
- **Tasks**: lm-eval's own ``local-completions`` model against ``/v1/completions`` with token-id requests
  (``endpoint_lm``), the prefix token (BOS, else EOS) in front of every context as our in-process LM puts it.

A server that refuses token-id prompts or ignores ``echo``/``logprobs`` (llama-cpp-python's server declares
``prompt: str | list[str]``, llama_cpp/server/types.py 0.3.36) raises ``EndpointRefused`` naming the engine;
the evaluate stage then measures perplexity and tasks in process and says so (``eval.through: auto``) or fails
(``eval.through: endpoint``). KL divergence and top-1 agreement need the full distribution at every position,
which no OpenAI endpoint returns (``logprobs`` is capped at 20 and keyed by token *text*): they stay in process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StageError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class EndpointRefused(StageError):
    """The deployed server refused (4xx) or ignored a request form this evaluation needs."""

    def __init__(self, engine: str, what: str, detail: str) -> None:
        self.engine, self.what, self.detail = engine, what, detail
        super().__init__(
            f"The {engine} at the evaluated endpoint does not support {what}: {detail}. Perplexity and task scores "
            "through an endpoint need token-id prompts with echo and logprobs (what lm-eval's local-completions "
            "sends). Set eval.through: auto to measure them in process instead (labelled so in metrics.json), "
            "or serve the model with an engine that accepts them (vLLM, SGLang, the embedded server)."
        )


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: ``base_url`` (``http://host:port``), the model id it serves, its API key and
    what it is, in words, for messages and labels (e.g. "embedded server (transformers)")."""

    base_url: str
    model: str
    api_key: str | None
    engine: str
    timeout_s: float = 600.0

    @property
    def v1(self) -> str:
        return self.base_url.rstrip("/") + "/v1"

    def client(self) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.v1, headers=headers, timeout=self.timeout_s)


def _post(client: Any, ep: Endpoint, route: str, body: dict[str, Any], what: str,
          probe: bool = False) -> dict[str, Any]:
    """POST a JSON body; a 4xx is ``EndpointRefused`` (the server refuses this request form), anything else that
    is not a 200 with a JSON object a StageError (the server failed). With ``probe`` (the first request of its
    form) any HTTP error is a refusal: llama-cpp-python's server answers a request it cannot parse with a 500."""
    import httpx

    try:
        r = client.post(route, json=body)
    except httpx.HTTPError as e:
        raise StageError(f"The {ep.engine} at {ep.base_url} did not answer {route} ({type(e).__name__}: {e}); see "
                         "its log. A server that dies while evaluating is a deployment failure.") from e
    if (probe and r.status_code >= 400 or 400 <= r.status_code < 500) and r.status_code not in (401, 404, 408, 429):
        raise EndpointRefused(ep.engine, what, f"HTTP {r.status_code} from {route}: {_error_text(r)}")
    if r.status_code != 200:
        raise StageError(f"The {ep.engine} at {ep.base_url} answered {route} with HTTP {r.status_code}: "
                         f"{_error_text(r)}. See its log.")
    try:
        data = r.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not data.get("choices"):
        raise StageError(f"The {ep.engine} at {ep.base_url} answered {route} with no choices: {r.text[:300]!r}")
    return data


def _error_text(r: Any, limit: int = 240) -> str:
    """The error message of a server's answer, on one line, at most ``limit`` characters."""
    try:
        data = r.json()
        err = data.get("error")
        msg = err.get("message") if isinstance(err, dict) else err or data.get("detail")
    except (ValueError, AttributeError):
        msg = r.text
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def prompt_logprobs(client: Any, ep: Endpoint, ids: Sequence[int], probe: bool = False) -> list[float]:
    """``log P(ids[j] | ids[:j])`` for ``j = 1 .. len(ids)-1``, from the server's echo of the token-id prompt."""
    body = {"model": ep.model, "prompt": [int(i) for i in ids], "max_tokens": 1, "temperature": 0.0,
            "echo": True, "logprobs": 1}
    what = "prompt log-probs of a token-id prompt (echo with logprobs)"
    data = _post(client, ep, "/completions", body, what, probe)
    choice = data["choices"][0]
    lps = (choice.get("logprobs") or {}).get("token_logprobs")
    if not isinstance(lps, list) or len(lps) < len(ids):
        got = "none" if not isinstance(lps, list) else f"{len(lps)} for a prompt of {len(ids)} tokens"
        raise EndpointRefused(ep.engine, what, f"its answer carries no log-prob per prompt token ({got})")
    counted = (data.get("usage") or {}).get("prompt_tokens")
    if counted is not None and counted != len(ids):
        raise EndpointRefused(ep.engine, what, f"it counted {counted} prompt tokens for our {len(ids)} token ids, "
                                               "so it did not take the prompt as token ids")
    out = lps[1 : len(ids)]
    if any(not isinstance(x, (int, float)) for x in out):
        raise EndpointRefused(ep.engine, what, "a prompt token's log-prob is missing (null) in its answer")
    return [float(x) for x in out]


def check_prompt_logprobs(ep: Endpoint, ids: Sequence[int]) -> None:
    """One probe request (a few token ids of the evaluation stream): raises ``EndpointRefused`` when the server
    refuses token-id prompts or does not echo their log-probs, before any figure depends on it."""
    with ep.client() as client:
        prompt_logprobs(client, ep, list(ids)[:8], probe=True)


def endpoint_perplexity(ep: Endpoint, ids: Any, seq_len: int, progress: Progress | None = None) -> dict[str, Any]:
    """``perplexity.perplexity``'s figures, from the endpoint's prompt log-probs on the same windows and tokens."""
    from pipeline.eval.perplexity import _check_stream, safe_exp, window_spans

    ids = _check_stream(ids, seq_len, 1)
    windows = window_spans(ids.numel(), seq_len)
    nll_sum, tokens = 0.0, 0
    with ep.client() as client:
        for k, w in enumerate(windows):
            # The window's L input tokens and its last target: the echo scores ids[w.start+1 .. w.end].
            lps = prompt_logprobs(client, ep, ids[w.start : w.end + 1].tolist())
            scored = lps[w.first_scored :]
            nll_sum -= math.fsum(scored)
            tokens += len(scored)
            if progress is not None:
                progress(k + 1, len(windows))
    nll_mean = nll_sum / tokens
    return {"ppl": safe_exp(nll_mean), "nll_mean": nll_mean, "nll_sum": nll_sum, "tokens": tokens,
            "windows": len(windows), "seq_len": seq_len}


def _text_tokens(tokenizer: Any, text: str, stopped: bool, eos: int | None) -> list[int]:
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)] if text else []
    return ids + ([eos] if stopped and eos is not None else [])


def chat_generations(ep: Endpoint, tokenizer: Any, prompts: list[dict[str, Any]], max_new_tokens: int,
                     eos_ids: Sequence[int], progress: Progress | None = None) -> list[dict[str, Any]]:
    """Greedy replies to each prompt's messages through ``/v1/chat/completions``: ``[{"id", "tokens", "text",
    "finish_reason", "prompt_tokens", "prompt_tokens_expected"}]``; ``tokens`` is the text re-tokenized, with an
    EOS at the end when the server stopped on its own (module docstring). ``prompt_tokens`` is the server's count
    of its templated prompt, ``prompt_tokens_expected`` the model's chat template's (they differ when the server
    renders another template)."""
    from pipeline.eval.sanity import prompt_ids

    eos = min(eos_ids) if eos_ids else None
    if getattr(tokenizer, "eos_token_id", None) in set(eos_ids):
        eos = int(tokenizer.eos_token_id)
    out = []
    with ep.client() as client:
        for k, p in enumerate(prompts):
            body = {"model": ep.model, "messages": p["messages"], "max_tokens": max_new_tokens, "temperature": 0.0,
                    "seed": 0}
            data = _post(client, ep, "/chat/completions", body, "greedy chat completions")
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
            stopped = choice.get("finish_reason") == "stop"
            out.append({"id": p["id"], "tokens": _text_tokens(tokenizer, text, stopped, eos), "text": text,
                        "finish_reason": choice.get("finish_reason"),
                        "prompt_tokens": (data.get("usage") or {}).get("prompt_tokens"),
                        "prompt_tokens_expected": len(prompt_ids(tokenizer, p["messages"]))})
            if progress is not None:
                progress(k + 1, len(prompts))
    return out


def as_text_tokens(outputs: list[dict[str, Any]], tokenizer: Any, eos_ids: Sequence[int]) -> list[dict[str, Any]]:
    """In-process generations (``sanity.generate_all``) as the endpoint's are scored: their text re-tokenized,
    plus an EOS where the generation reached one, so both sides of an overlap are measured alike."""
    from pipeline.eval.sanity import reached_eos

    eos = min(eos_ids) if eos_ids else None
    if getattr(tokenizer, "eos_token_id", None) in set(eos_ids):
        eos = int(tokenizer.eos_token_id)
    return [{**o, "tokens": _text_tokens(tokenizer, o["text"], reached_eos(o["tokens"], eos_ids), eos)}
            for o in outputs]


def lm_eval_model_args(ep: Endpoint, tokenizer_dir: Path | str, max_length: int, batch_size: int) -> dict[str, Any]:
    """Keyword arguments of lm-eval's ``local-completions`` model for ``ep`` (lm_eval/models/api_models.py
    ``TemplateAPI.__init__``, 0.4.13). ``max_length``: our in-process LM's (inputs of at most ``max_length``
    tokens, ``pipeline.eval.tasks.score_continuations``); lm-eval keeps ``max_length - 1`` prompt tokens including
    the last continuation token, hence + 2. The key goes in a header, never in the environment or a log."""
    args: dict[str, Any] = {
        "model": ep.model, "base_url": ep.v1 + "/completions", "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir), "tokenized_requests": True, "max_length": int(max_length) + 2,
        "batch_size": int(batch_size), "num_concurrent": 1, "max_retries": 1, "seed": 0,
        "timeout": int(ep.timeout_s),
    }
    if ep.api_key:
        args["header"] = {"Authorization": f"Bearer {ep.api_key}"}
    return args


def endpoint_lm(ep: Endpoint, tokenizer_dir: Path | str, max_length: int, batch_size: int) -> Any:
    """lm-eval's ``local-completions`` LM over ``ep``, with the prefix token (BOS, else EOS) in front of every
    context, as ``pipeline.eval.tasks.make_lm`` and the perplexity stream put it (lm-eval's own adds it only to
    empty contexts, or through the tokenizer's ``add_special_tokens``, which many tokenizers ignore)."""
    from pipeline.eval.tasks import _lm_base

    import importlib.util

    from pipeline.errors import RecipeError

    _lm_base()  # the RecipeError naming the [eval] extra when lm-eval is missing
    missing = [m for m in ("aiohttp", "requests", "tenacity", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        raise RecipeError(
            f"eval.tasks through the endpoint uses lm-eval's local-completions model, which needs {', '.join(missing)} "
            "(not installed). They are part of the [eval] extra: pip install -e '.[eval]' (it leaves torch alone), "
            "or set eval.through: in_process."
        )
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from pipeline.eval.tasks import quiet_lm_eval

    class PrefixedLocalCompletions(LocalCompletionsAPI):
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            ctx, cont = super()._encode_pair(context, continuation)
            prefix = self.prefix_token_id
            return ([prefix] if prefix is not None else []) + list(ctx), list(cont)

    with quiet_lm_eval("lm_eval.models.api_models"):
        return PrefixedLocalCompletions(**lm_eval_model_args(ep, tokenizer_dir, max_length, batch_size))


def endpoint_tasks(ep: Endpoint, tokenizer_dir: Path | str, tasks: Sequence[str], *, limit: int | None = None,
                   include_paths: Sequence[Path | str] = (), max_length: int = 2048,
                   batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """``pipeline.eval.tasks.run_tasks``'s scores, through the endpoint (``endpoint_lm``)."""
    from pipeline.eval.tasks import quiet_lm_eval, run_lm_tasks

    lm = endpoint_lm(ep, tokenizer_dir, max_length, batch_size)
    with quiet_lm_eval("lm_eval.models.api_models"):
        return run_lm_tasks(lm, tasks, limit=limit, include_paths=include_paths)
