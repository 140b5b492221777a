"""Chat generation for the embedded server: chat template -> ``model.generate`` -> text, token counts, finish reason.

Concurrent requests are continuously batched by :class:`pipeline.serve.batching.Scheduler` (a thread that owns
the model): :meth:`GenerationEngine.submit` hands it a prompt, :meth:`GenerationEngine.chat` waits for the result.
``GenerationEngine(..., batching=False)`` keeps the earlier path, one ``model.generate`` at a time under a lock
(:meth:`GenerationEngine._generate`), as the sequential baseline to measure batching against.

Sampling does not use ``generate``'s own sampler, which draws from torch's global RNG: the last logits processor
(:func:`sample_next_token`) draws with a per-request ``torch.Generator`` seeded from the request's ``seed`` and
leaves only the drawn token finite, so ``generate`` runs greedily on a one-hot and the reply depends only on the
seed, not on what other requests did before.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import ModelFolderError, RecipeError
from pipeline.serve.protocol import RequestError

log = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (sample_next_token)
RETRY_AFTER_S = 1  # what a 429 at the queue cap tells the client to wait
DEFAULT_DECODE_MAX_LEN = 4096  # positions per slot of the static KV cache (decode="graphs"), unless given


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the reply, stop string (and EOS) excluded
    prompt_tokens: int  # tokens of the templated prompt
    completion_tokens: int  # tokens generated, a final EOS included (as vLLM and OpenAI count)
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)


# ------------------------------------------------------------------------------------- pure tensor functions


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits [batch, vocab] with every token outside the nucleus set to -inf.

    The nucleus is the smallest set of most probable tokens whose probability mass reaches ``top_p``
    (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", §3.1): a token is dropped when the
    mass of the tokens ranked above it already reaches ``top_p``; the most probable token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token id per row of ``logits`` [batch, vocab], drawn from softmax(logits / temperature) within top-p.

    A temperature below ``GREEDY_BELOW`` decodes greedily (logits / 1e-107 overflow to inf and the softmax to
    NaN); vLLM does the same below its ``_SAMPLING_EPS`` (1e-5, vllm/sampling_params.py)."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    scaled = top_p_mask(logits.float() / temperature, top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index in ``text`` where the earliest of ``stops`` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


# ------------------------------------------------------------------------------------- transformers hooks


@functools.cache
def _hooks() -> tuple[type, type]:
    """The logits processor and stopping criterion classes (transformers imported only when generating)."""
    from transformers import LogitsProcessor, StoppingCriteria

    class SeededSampler(LogitsProcessor):
        """Last processor: keep only a token drawn with this request's generator finite (greedy then picks it)."""

        def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
            self.temperature, self.top_p, self.seed = temperature, top_p, seed
            self.generator: torch.Generator | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.generator is None:  # on the logits' device, so the draw happens where the logits are
                self.generator = torch.Generator(device=scores.device)
                if self.seed is None:
                    self.generator.seed()
                else:
                    self.generator.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int, as OpenAI allows
            token = sample_next_token(scores, self.temperature, self.top_p, self.generator)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(-1, token[:, None], 0.0)

    class StopOnStrings(StoppingCriteria):
        """Stop once the decoded reply contains a stop string (the text is decoded as the reply will be)."""

        def __init__(self, decode: Any, prompt_len: int, stops: list[str]) -> None:
            self.decode, self.prompt_len, self.stops = decode, prompt_len, stops

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            texts = [self.decode(row[self.prompt_len :].tolist()) for row in input_ids]
            done = [first_stop(text, self.stops) is not None for text in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return SeededSampler, StopOnStrings


# ------------------------------------------------------------------------------------- the engine


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in [gen_eos, tokenizer.eos_token_id]:
        for i in x if isinstance(x, (list, tuple)) else [x]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _on_cuda(model: Any) -> bool:
    return next(model.parameters()).device.type == "cuda"


class GenerationEngine:
    """Turns OpenAI chat messages into a reply with a Hugging Face causal LM and its tokenizer.

    ``max_context`` caps prompt + reply tokens; by default the model's ``max_position_embeddings``. The batch
    holds at most ``max_batch_size`` sequences reserving ``max_batch_tokens`` (prompt + max_tokens each); at
    most ``max_queued`` more sequences (None: no cap), reserving ``max_queued_tokens``, wait to join it, and a
    request past those caps is refused with a 429 (:meth:`check_capacity`). ``step`` replaces the decode step
    (:class:`pipeline.serve.batching.DynamicCacheStep`, the contract in :class:`~pipeline.serve.batching.BatchState`).

    ``decode`` picks the step when ``step`` is not given: ``"eager"`` (the default step), ``"graphs"`` (a static
    KV cache of ``max_batch_size`` slots x ``decode_max_len`` positions, default
    ``min(max_context, DEFAULT_DECODE_MAX_LEN)``, replayed through one CUDA graph per batch bucket on CUDA and run
    eagerly elsewhere), ``"graphs+compile"`` (also ``torch.compile`` per layer, CUDA only); ``max_context`` is
    then lowered to that length. ``"auto"`` is ``"graphs+compile"`` on CUDA (falling back to ``"eager"`` where
    the model is refused or does not compile; :meth:`_auto_step`) and ``"eager"`` elsewhere.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_context: int | None = None,
        *,
        batching: bool = True,
        max_batch_size: int = 16,
        max_batch_tokens: int = 65536,
        max_queued: int | None = 256,
        max_queued_tokens: int | None = None,
        step: Any = None,
        decode: str = "auto",
        decode_max_len: int | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelFolderError(
                f"The tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '') or 'in memory'}) "
                "has no chat template, so chat messages cannot be turned into a prompt the way the model was "
                "trained. Serve a model whose folder has one (a 'chat_template' in tokenizer_config.json or a "
                "chat_template.jinja file), or add the model family's template there."
            )
        model_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_context is None:
            max_context = model_context
        if max_context is None:
            raise RecipeError(
                "The model's config has no max_position_embeddings, so the server cannot tell how long a prompt "
                "may be. Set the serve section's max_context to the model's context length."
            )
        if int(max_context) < 2:
            raise RecipeError(f"max_context must be at least 2 tokens (a prompt and a reply); got {max_context}.")
        if model_context is not None and max_context > model_context:
            log.warning("max_context %d exceeds the model's max_position_embeddings %d", max_context, model_context)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = int(max_context)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        if not self.eos_token_ids:
            log.warning("neither the model nor the tokenizer names an EOS token: replies end at max_tokens or stop")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        # Encode control tokens typed by a user as text when this transformers can (5.x), so a message cannot
        # close its own turn with "<|im_end|>"; older versions encode the rendered prompt as-is.
        params = inspect.signature(tokenizer.apply_chat_template).parameters
        self._template_kwargs = {"sanitize_control_tokens": True} if "sanitize_control_tokens" in params else {}
        self._lock = threading.Lock()  # one generation at a time (the batching seam, module docstring)
        # A fast tokenizer's Rust object is mutably borrowed while it encodes, so two request threads encoding at
        # once can fail with "Already borrowed"; each tokenizer call takes this lock (never a whole generation).
        self._tokenizer_lock = threading.Lock()
        self.batching = batching
        from pipeline.serve.batching import Scheduler

        step = self._decode_step(step, decode, decode_max_len, max_batch_size)
        cleans_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.scheduler = Scheduler(
            self.model, self.decode, self.eos_token_ids, max_batch_size, max_batch_tokens, hold_space=cleans_spaces,
            max_queued=max_queued, max_queued_tokens=max_queued_tokens, step=step,
        )  # fmt: skip

    def _decode_step(self, step: Any, decode: str, max_len: int | None, max_batch: int) -> Any:
        """The scheduler's decode step for ``decode`` (class docstring); lowers ``max_context`` to a static
        cache's ``max_len`` so check_budget refuses (400) what the cache cannot hold."""
        from pipeline.serve.graph_step import make_step

        if step is not None:
            self.decode_mode = "custom"
            return step
        if decode == "auto":
            return self._auto_step(max_len, max_batch)
        self.decode_mode = decode
        if decode not in ("auto", "eager") and not self.batching:
            raise RecipeError(
                f"decode={decode!r} needs the continuous-batching scheduler (its decode step is the static-cache "
                "one), but batching is off. Turn batching on, or use decode='eager' for the sequential baseline."
            )
        max_len = min(self.max_context, max_len or DEFAULT_DECODE_MAX_LEN)
        step = make_step(decode, self.model, max_batch, max_len)
        if step is None:
            return None
        if max_len < self.max_context:
            log.warning("decode=%s: max_context lowered from %d to the static KV cache's %d positions",
                        decode, self.max_context, max_len)  # fmt: skip
            self.max_context = max_len
        step.warmup()  # captures every bucket's graph now (CUDA), not during the first requests
        log.info("decode=%s: static KV cache of %d slots x %d positions, CUDA graphs %s", decode, max_batch,
                 max_len, "on" if step.graphs_enabled else "off (not on CUDA)")  # fmt: skip
        return step

    def _auto_step(self, max_len: int | None, max_batch: int) -> Any:
        """``decode="auto"``: ``graphs+compile`` where the model is on CUDA and batching is on (measured through
        this scheduler on an H200, Llama-3-8B shape: bf16 19 -> 171 tok/s, INT4 16 -> 270 tok/s at batch 1;
        bench/RESULTS.md), the eager step elsewhere, and the eager step with a warning where the static-cache
        step refuses the model (another family, a short sliding window) or cannot compile."""
        if not (_on_cuda(self.model) and self.batching):
            self.decode_mode = "eager"
            return None
        context = self.max_context
        try:
            return self._decode_step(None, "graphs+compile", max_len, max_batch)
        except Exception as e:  # noqa: BLE001 - any refusal or compile failure falls back to the measured-slow path
            self.max_context = context
            log.warning("decode=auto: the CUDA-graph step is not usable for this model (%s: %s); decoding eagerly",
                        type(e).__name__, e)  # fmt: skip
            self.decode_mode = "eager"
            return None

    # -- prompt

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids: the tokenizer's chat template with the assistant's turn opened."""
        import jinja2

        try:
            with self._tokenizer_lock:
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False, **self._template_kwargs
                )
        except jinja2.TemplateError as e:  # e.g. a template that raises "System role not supported"
            raise RequestError(f"The model's chat template rejected the messages: {e}", param="messages") from e
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- generation

    def chat(
        self,
        messages: list[dict[str, str]],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> GenerationResult:
        """Generate the assistant's reply to ``messages`` (dicts with ``role`` and ``content``).

        ``temperature == 0`` decodes greedily; otherwise tokens are sampled with a generator seeded from
        ``seed``. ``max_tokens=None`` allows the rest of the context. Raises :class:`RequestError` (400) when the
        prompt, or prompt + ``max_tokens``, does not fit in ``max_context``.
        """
        prompt = self.encode_chat(messages)
        max_tokens = self.check_budget(prompt, max_tokens, "messages")
        stops = list(stop or [])
        if not self.batching:
            with self._lock:
                new_ids = self._generate(prompt, max_tokens, temperature, top_p, stops, seed)
            return self._result(prompt, new_ids, max_tokens, stops)
        from pipeline.serve.batching import SamplingParams

        params = SamplingParams(max_tokens, temperature, top_p, stops, seed)
        done = self.run(prompt, params)
        return GenerationResult(done.text, done.prompt_tokens, len(done.token_ids), done.finish_reason)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the scheduler thread; running sequences end with an error event (call after the server stops)."""
        self.scheduler.shutdown(timeout_s)

    def check_budget(self, prompt: list[int], max_tokens: int | None, param: str = "messages") -> int:
        """``max_tokens`` (None: the rest of the context) once the prompt and it fit in ``max_context``; else a 400."""
        if not prompt:  # e.g. "" with a tokenizer that adds no BOS: there is nothing to condition on
            raise RequestError(
                f"The {param} encode to zero tokens, so there is nothing to continue. Send a non-empty {param}.",
                param=param,
                code="invalid_value",
            )
        room = self.max_context - len(prompt)
        if room < 1 and not (max_tokens == 0 and room == 0):
            raise RequestError(
                f"This model's maximum context length is {self.max_context} tokens, but the {param} take "
                f"{len(prompt)} tokens, leaving no room for a reply. Shorten the {param}.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise RequestError(
                f"This model's maximum context length is {self.max_context} tokens, but {len(prompt) + max_tokens} "
                f"were requested ({len(prompt)} in the {param}, {max_tokens} for the reply). Lower max_tokens to "
                f"at most {room} or shorten the {param}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def check_capacity(self, n: int, tokens: int) -> None:
        """A 429 (OpenAI's rate-limit error, with ``Retry-After``) when ``n`` more sequences reserving ``tokens``
        would pass the queue caps (``max_queued``, ``max_queued_tokens``); the client's retry comes later."""
        why = self.scheduler.capacity_error(n, tokens)
        if why is not None:
            raise RequestError(
                f"The server is at capacity: {why}. Retry after {RETRY_AFTER_S} s (the openai client retries "
                "429s by itself), or start the server with a larger max_queued / max_queued_tokens.",
                status_code=429,
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def encode_text(self, text: str) -> list[int]:
        """A completions prompt's ids: the tokenizer's own special tokens (e.g. BOS) added, as vLLM does."""
        with self._tokenizer_lock:
            return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def token_text(self, token_id: int) -> str:
        """One token as text (for logprobs): decoded alone, special tokens kept."""
        with self._tokenizer_lock:
            return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def submit(self, prompt: list[int], params: Any, sink: Any) -> Any:
        """Queue ``prompt`` on the batch; ``sink(event, payload)`` gets its tokens (see batching). Returns the
        sequence (call its ``cancel()`` to drop it)."""
        from pipeline.serve.batching import Sequence

        return self.scheduler.submit(Sequence(prompt, params, sink))

    def run(self, prompt: list[int], params: Any) -> Any:
        """Submit and wait for the :class:`~pipeline.serve.batching.FinishedSequence`."""
        box: list[Any] = []
        done = threading.Event()

        def sink(event: str, payload: Any) -> None:
            if event in ("done", "error"):
                box.append((event, payload))
                done.set()

        self.submit(prompt, params, sink)
        done.wait()
        event, payload = box[0]
        if event == "error":
            raise payload
        return payload

    def _generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stops: list[str],
        seed: int | None,
    ) -> list[int]:
        """The new token ids for one prompt (the batching seam: one prompt in, its continuation out)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        sampler_cls, stop_cls = _hooks()
        config = self.model.generation_config.__class__.from_dict(self.model.generation_config.to_dict())
        # Greedy search always: sampling, when asked, is done by the last logits processor (module docstring).
        config.update(
            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
            max_new_tokens=max_new_tokens, max_length=None, min_new_tokens=None, min_length=0,
            eos_token_id=self.eos_token_ids or None, pad_token_id=self.pad_token_id,
        )  # fmt: skip
        processors = LogitsProcessorList([sampler_cls(temperature, top_p, seed)] if temperature > 0 else [])
        criteria = StoppingCriteriaList([stop_cls(self.decode, len(prompt), stops)] if stops else [])
        device = self.model.device
        input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=criteria,
            )
        return out[0, len(prompt) :].tolist()

    def _result(self, prompt: list[int], new_ids: list[int], max_tokens: int, stops: list[str]) -> GenerationResult:
        completion_tokens = len(new_ids)
        ended_on_eos = bool(new_ids) and new_ids[-1] in self.eos_token_ids
        text = self.decode(new_ids[:-1] if ended_on_eos else new_ids)
        cut = first_stop(text, stops) if stops else None
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif ended_on_eos:
            reason = "stop"
        elif completion_tokens >= max_tokens:
            reason = "length"
        else:  # generate ended early for a reason of its own (e.g. a stop criterion in the generation config)
            reason = "stop"
        return GenerationResult(text, len(prompt), completion_tokens, reason)
